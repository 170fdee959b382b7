"""The data layer: load and validate Step-DPO records, render prompts, tokenize with truncation."""
from fasttrain.data.records import MODES, RecordSet, StepRecord, load_records, records_from_rows
from fasttrain.data.templates import TEMPLATES, render_prompt
from fasttrain.data.tokenize import (
    TokenizedPairs,
    TruncationStats,
    dataset_fingerprint,
    prepare_dataset,
    tokenize_records,
)
from fasttrain.errors import DataError

__all__ = [
    "DataError",
    "MODES",
    "RecordSet",
    "StepRecord",
    "TEMPLATES",
    "TokenizedPairs",
    "TruncationStats",
    "dataset_fingerprint",
    "load_records",
    "prepare_dataset",
    "records_from_rows",
    "render_prompt",
    "tokenize_records",
]
