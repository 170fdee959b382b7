"""Load Step-DPO records (DESIGN §2) from JSON Lines, JSON, Parquet or a saved `datasets` dataset, and
validate every field.

Every problem is reported as a DataError that names the file, the row and the field. Rows are
counted the way an editor shows them: JSON Lines by 1-based line number, JSON arrays and Parquet
by 0-based index (the message says which).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.errors import DataError

MODES = ("step", "full")

# Which record fields hold the two responses in each mode. "full" is the plain-DPO ablation of
# the paper: whole continuations from step k instead of the single step k.
RESPONSE_FIELDS = {"step": ("chosen", "rejected"), "full": ("full_chosen", "full_rejected")}


@dataclass
class StepRecord:
    record_id: str  # "<file name>:<row>" or the record's own "id" field
    prompt: str
    initial_reason_steps: str
    chosen: str
    rejected: str
    dataset: str | None = None


@dataclass
class RecordSet:
    records: list[StepRecord]
    path: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record_id, reason)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.records)


@dataclass(frozen=True)
class RowLocation:
    """Where a row came from, for error messages and default record ids."""

    source: str  # the path as the user gave it
    row: int
    row_kind: str  # "line" (1-based) or "row" (0-based index)

    def describe(self) -> str:
        if self.row_kind == "line":
            return f"{self.source}, line {self.row}"
        return f"{self.source}, row {self.row} (0-based index)"

    def default_id(self) -> str:
        return f"{Path(self.source).name}:{self.row}"


def load_records(path: str | Path, mode: str = "step", skip_bad_rows: bool = False) -> RecordSet:
    """Read and validate a Step-DPO data file (.jsonl, .json or .parquet) or a directory written by
    ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package).

    With ``skip_bad_rows`` a row with a missing, empty or mistyped field is skipped and listed in
    ``RecordSet.skipped``; a file that cannot be read or parsed as a whole still raises.
    """
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; choose one of {', '.join(MODES)}")
    source = str(path)
    path = Path(path)
    if path.is_dir():
        return records_from_rows(_read_saved_dataset(path, source), source, mode=mode, skip_bad_rows=skip_bad_rows)
    if not path.is_file():
        raise DataError(f"{source}: data file not found (or not a regular file)")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(
            f"{source}: unknown data file extension {path.suffix!r}; expected .jsonl, .json or .parquet"
        )
    rows = readers[suffix](path, source)
    return records_from_rows(rows, source, mode=mode, skip_bad_rows=skip_bad_rows)


def records_from_rows(
    rows: Iterable[tuple[RowLocation, Any]] | Iterable[dict],
    source: str,
    mode: str = "step",
    skip_bad_rows: bool = False,
) -> RecordSet:
    """Validate already-parsed rows: (RowLocation, obj) pairs, or plain dicts (e.g. a `datasets`
    Dataset), which are then numbered as 0-based rows of ``source``."""
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; choose one of {', '.join(MODES)}")
    records: list[StepRecord] = []
    skipped: list[tuple[str, str]] = []
    for index, item in enumerate(rows):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], RowLocation):
            location, obj = item
        else:
            location, obj = RowLocation(source, index, "row"), item
        try:
            records.append(_validate_row(obj, location, mode))
        except DataError as error:
            if not skip_bad_rows:
                raise
            skipped.append((_best_effort_id(obj, location), str(error)))
    if not records:
        detail = f" ({len(skipped)} bad rows skipped; first: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{source}: no usable records{detail}")
    return RecordSet(records=records, path=source, skipped=skipped)


# ---------------------------------------------------------------- file readers


def _read_text(path: Path, source: str) -> str:
    try:
        # utf-8-sig: a leading byte-order mark (as Windows tools write) is dropped, not a JSON error.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        column = error.start - (error.object.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{source}, line {line}: not valid UTF-8 text ({error.reason} at byte {column} of the line, "
                        f"byte {error.start} of the file)") from None
    except OSError as error:
        raise DataError(f"{source}: cannot read the file ({error.strerror or error})") from None


def _read_jsonl(path: Path, source: str) -> list[tuple[RowLocation, Any]]:
    rows = []
    # split("\n"), not splitlines(): the latter also breaks at U+2028 and friends, which JSON
    # writers emit raw inside strings (ensure_ascii=False), and line numbers would drift.
    for line_number, line in enumerate(_read_text(path, source).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no record
        location = RowLocation(source, line_number, "line")
        try:
            rows.append((location, json.loads(line)))
        except json.JSONDecodeError as error:
            # A broken line means the file is damaged, so it is fatal even with skip_bad_rows.
            raise DataError(f"{location.describe()}: not valid JSON ({error.msg} at column {error.colno})") from None
        except (ValueError, RecursionError) as error:  # e.g. a 5000-digit number, arrays nested 10^5 deep
            raise DataError(f"{location.describe()}: cannot parse the JSON ({_parse_problem(error)})") from None
    if not rows:
        raise DataError(f"{source}: no usable records (the file is empty or has only blank lines)")
    return rows


def _parse_problem(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


def _read_json(path: Path, source: str) -> list[tuple[RowLocation, Any]]:
    try:
        document = json.loads(_read_text(path, source))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    except (ValueError, RecursionError) as error:  # e.g. a 5000-digit number, arrays nested 10^5 deep
        raise DataError(f"{source}: cannot parse the JSON ({_parse_problem(error)})") from None
    if isinstance(document, dict) and "data" in document:
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f'{source}: expected a JSON array of records or an object {{"data": [...]}}')
    return [(RowLocation(source, index, "row"), obj) for index, obj in enumerate(document)]


def _read_parquet(path: Path, source: str) -> list[tuple[RowLocation, Any]]:
    try:
        import pyarrow.parquet as parquet  # lazy: only Parquet users need pyarrow
    except ImportError:
        raise DataError(
            f"{source}: reading Parquet needs pyarrow; install it with `pip install pyarrow`"
        ) from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for damaged files
        raise DataError(f"{source}: cannot read as Parquet ({type(error).__name__}: {error})") from None
    return [(RowLocation(source, index, "row"), obj) for index, obj in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, source: str) -> list[tuple[RowLocation, Any]]:
    """Rows of a ``Dataset.save_to_disk`` directory (one split: a DatasetDict is refused with its splits)."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{source}: a saved DatasetDict with splits {splits}; point at one split's directory, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(f"{source}: a directory, but not one written by datasets' save_to_disk (no state.json); "
                        "expected a .jsonl, .json or .parquet file or a saved dataset")
    try:
        import datasets  # lazy: only users of saved datasets need it
    except ImportError:
        raise DataError(f"{source}: reading a saved dataset needs the datasets package "
                        "(`pip install datasets`)") from None
    try:
        table = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several unrelated types for damaged directories
        raise DataError(f"{source}: cannot load the saved dataset ({type(error).__name__}: {error})") from None
    return [(RowLocation(source, index, "row"), dict(obj)) for index, obj in enumerate(table)]


# ---------------------------------------------------------------- row validation


def _validate_row(obj: Any, location: RowLocation, mode: str) -> StepRecord:
    if not isinstance(obj, dict):
        raise DataError(f"{location.describe()}: expected a JSON object (a record), got {_type_name(obj)}")
    chosen_field, rejected_field = RESPONSE_FIELDS[mode]
    prompt = _text_field(obj, "prompt", location, allow_empty=False)
    initial_reason_steps = _text_field(obj, "initial_reason_steps", location, allow_empty=True)
    chosen = _text_field(obj, chosen_field, location, allow_empty=False, mode=mode)
    rejected = _text_field(obj, rejected_field, location, allow_empty=False, mode=mode)
    dataset = obj.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise DataError(f"{location.describe()}: field 'dataset' must be a string, got {_type_name(dataset)}")
    return StepRecord(
        record_id=_record_id(obj, location),
        prompt=prompt,
        initial_reason_steps=initial_reason_steps,
        chosen=chosen,
        rejected=rejected,
        dataset=dataset,
    )


def _text_field(obj: dict, name: str, location: RowLocation, allow_empty: bool, mode: str | None = None) -> str:
    mode_note = f" (needed in data mode {mode!r})" if mode == "full" else ""
    if name not in obj or obj[name] is None:
        raise DataError(f"{location.describe()}: missing field {name!r}{mode_note}; expected a string")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{location.describe()}: field {name!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{location.describe()}: field {name!r} is empty; expected a non-empty string")
    return value


def _record_id(obj: dict, location: RowLocation) -> str:
    own_id = obj.get("id")
    if own_id is None:
        return location.default_id()
    # bool is an int subclass, but True as an id is almost certainly a mistake.
    if isinstance(own_id, bool) or not isinstance(own_id, (str, int)):
        raise DataError(f"{location.describe()}: field 'id' must be a string or an integer, got {_type_name(own_id)}")
    return str(own_id)


def _best_effort_id(obj: Any, location: RowLocation) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        return str(obj["id"])
    return location.default_id()


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
