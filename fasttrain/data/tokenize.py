"""Turn Step-DPO records into token ids (DESIGN §2), with truncation, counts and an on-disk cache.

The rules:
- prompt text = render_prompt(template, prompt, initial_reason_steps); BOS in front only if the
  tokenizer has one and the text does not already start with it; never an EOS after a step (a step is
  not the end of an answer); ``add_special_tokens=False`` everywhere else.
- Reference behaviour: tokenize ``prompt + step`` jointly and split at the prompt-alone length, so the
  ids are what the model would see for the concatenated text. When BPE merged across the boundary (the
  joint ids do not start with the prompt-alone ids) we fall back to prompt-alone ids + the step
  tokenized alone and count it, because packing (DESIGN §3) needs chosen and rejected to share one
  identical prompt.
- A prompt longer than ``max_prompt_length`` keeps its end (left truncation; a leading BOS is kept);
  then each step keeps its beginning so ``len(prompt) + len(step) <= max_length``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fasttrain.data.records import RecordSet, StepRecord, load_records
from fasttrain.data.templates import render_prompt
from fasttrain.errors import DataError, UserError

# Bump when the tokenization rules or the .npz layout change, so old cache files are not reused.
CACHE_FORMAT_VERSION = 2  # 2: records whose text holds a special-token string are refused (or skipped)


@dataclass
class TruncationStats:
    num_records: int = 0  # records in the output
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    boundary_merges: int = 0  # steps (chosen or rejected) that fell back to being tokenized alone
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record_id, reason)

    def summary(self) -> str:
        text = (
            f"{self.num_records} records tokenized; truncated: {self.prompts_truncated} prompts (kept the end), "
            f"{self.chosen_truncated} chosen / {self.rejected_truncated} rejected steps (kept the beginning); "
            f"{self.boundary_merges} steps tokenized apart from the prompt (BPE merged across the boundary)"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} bad records skipped (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        return text

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> TruncationStats:
        values = json.loads(text)
        values["skipped"] = [tuple(item) for item in values["skipped"]]
        return cls(**values)


@dataclass(eq=False)
class TokenizedPairs:
    prompts: list[np.ndarray]  # int64 ids, BOS included where the tokenizer has one
    chosens: list[np.ndarray]
    rejecteds: list[np.ndarray]
    record_ids: list[str]
    stats: TruncationStats

    def __len__(self) -> int:
        return len(self.record_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenizedPairs):
            return NotImplemented
        same_arrays = all(
            len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))
            for mine, theirs in ((self.prompts, other.prompts), (self.chosens, other.chosens),
                                 (self.rejecteds, other.rejecteds))
        )
        return same_arrays and self.record_ids == other.record_ids and self.stats == other.stats

    def save(self, path: str | Path) -> None:
        """One .npz: per field a flat concatenation plus offsets (no pickles, loads fast)."""
        arrays = {"format_version": np.asarray(CACHE_FORMAT_VERSION)}
        for name in ("prompts", "chosens", "rejecteds"):
            arrays[f"{name}_flat"], arrays[f"{name}_offsets"] = _flatten(getattr(self, name))
        arrays["record_ids"] = np.asarray(self.record_ids, dtype=np.str_)
        arrays["stats_json"] = np.asarray(self.stats.to_json())
        # A file handle, because np.savez would append ".npz" to a path that lacks it.
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> TokenizedPairs:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format_version"]) != CACHE_FORMAT_VERSION:
                raise ValueError(f"{path}: tokenized-data format {int(data['format_version'])}, "
                                 f"expected {CACHE_FORMAT_VERSION}")
            fields = {name: _unflatten(data[f"{name}_flat"], data[f"{name}_offsets"])
                      for name in ("prompts", "chosens", "rejecteds")}
            return cls(**fields, record_ids=data["record_ids"].tolist(),
                       stats=TruncationStats.from_json(str(data["stats_json"])))


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, dtype=np.int64)
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    # Slices are views into one buffer; fine since nobody mutates token ids in place.
    return np.split(flat, offsets[1:-1]) if len(offsets) > 1 else []


# ---------------------------------------------------------------- tokenization


def tokenize_records(
    records: RecordSet | list[StepRecord],
    tokenizer,
    template: str,
    max_length: int,
    max_prompt_length: int,
    skip_bad_rows: bool = False,
) -> TokenizedPairs:
    _check_lengths(max_length, max_prompt_length)
    stats = TruncationStats()
    if isinstance(records, RecordSet):
        stats.skipped.extend(records.skipped)  # one report for load-time and tokenize-time skips
        records = records.records
    if not records:
        raise DataError("no records to tokenize")
    _check_tokenizer(tokenizer)
    records = _without_special_token_text(records, tokenizer, skip_bad_rows, stats)

    prompt_texts = [render_prompt(template, r.prompt, r.initial_reason_steps, tokenizer) for r in records]
    # Many rows share a prompt (several steps of one problem, several continuations): tokenize each once.
    unique_texts = list(dict.fromkeys(prompt_texts))
    unique_ids = dict(zip(unique_texts, _encode(tokenizer, unique_texts)))
    joint_chosen = _encode_unique(tokenizer, [text + r.chosen for text, r in zip(prompt_texts, records)])
    joint_rejected = _encode_unique(tokenizer, [text + r.rejected for text, r in zip(prompt_texts, records)])

    chosen_steps, chosen_merged = _split_steps(prompt_texts, unique_ids, joint_chosen)
    rejected_steps, rejected_merged = _split_steps(prompt_texts, unique_ids, joint_rejected)
    _retokenize_alone(tokenizer, chosen_steps, chosen_merged, [r.chosen for r in records])
    _retokenize_alone(tokenizer, rejected_steps, rejected_merged, [r.rejected for r in records])
    stats.boundary_merges = len(chosen_merged) + len(rejected_merged)

    bos_id = getattr(tokenizer, "bos_token_id", None)
    prompts, chosens, rejecteds, record_ids = [], [], [], []
    for index, record in enumerate(records):
        text = prompt_texts[index]
        prompt = with_bos(tokenizer, text, unique_ids[text])
        try:
            prompt, chosen, rejected = _truncate(
                record.record_id, prompt, chosen_steps[index], rejected_steps[index], bos_id,
                max_length, max_prompt_length, stats,
            )
        except DataError as error:
            if not skip_bad_rows:
                raise
            stats.skipped.append((record.record_id, str(error)))
            continue
        prompts.append(prompt)
        chosens.append(chosen)
        rejecteds.append(rejected)
        record_ids.append(record.record_id)

    if not record_ids:
        raise DataError(f"no usable records after tokenization ({len(stats.skipped)} skipped; "
                        f"first: {stats.skipped[0][1]})")
    stats.num_records = len(record_ids)
    return TokenizedPairs(prompts, chosens, rejecteds, record_ids, stats)


TEXT_FIELDS = ("prompt", "initial_reason_steps", "chosen", "rejected")


def _without_special_token_text(records: list[StepRecord], tokenizer, skip_bad_rows: bool,
                                stats: TruncationStats) -> list[StepRecord]:
    """Data text that spells a special token ("<|im_end|>", "<|endoftext|>", ...) would be encoded as that
    control token, not as the characters: the model would train on a turn end or EOS in the middle of a
    step. Such a record is refused with its id and field (or skipped with data.skip_bad_rows)."""
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
                      | set(_added_special_tokens(tokenizer)), key=len, reverse=True)
    specials = [t for t in specials if t]
    if not specials:
        return records
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    kept = []
    for record in records:
        hit = next(((name, m.group(0)) for name in TEXT_FIELDS
                    if (m := pattern.search(getattr(record, name) or ""))), None)
        if hit is None:
            kept.append(record)
            continue
        message = (f"{record.record_id}: field '{hit[0]}' contains {hit[1]!r}, a special token of this tokenizer; "
                   "it would be encoded as that control token, not as text. Remove it from the data, or set "
                   "data.skip_bad_rows=true to skip such records")
        if not skip_bad_rows:
            raise DataError(message)
        stats.skipped.append((record.record_id, message))
    if not kept:
        raise DataError(f"no usable records: all {len(records)} contain special-token text "
                        f"(first: {stats.skipped[-len(records)][1]})")
    return kept


def _added_special_tokens(tokenizer):
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [str(tok.content) for tok in decoder.values() if getattr(tok, "special", False)]


def _check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that turns ordinary text into nothing. transformers builds one without an
    error from a directory that has tokenizer_config.json but lost tokenizer.json (a vocabulary of only
    the special tokens); every step would then be "empty after tokenization", blaming the data."""
    if not _encode(tokenizer, [_TOKENIZER_PROBE])[0]:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise UserError(
            f"tokenizer {name}: it turns ordinary text ({_TOKENIZER_PROBE!r}) into no tokens (vocabulary of "
            f"{len(tokenizer)} tokens); its files look incomplete: is tokenizer.json (or vocab.json + "
            "merges.txt) missing?"
        )


_TOKENIZER_PROBE = "Step 1: The answer is 42."


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int)):
        raise ValueError("data.max_length and data.max_prompt_length must be integers")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < data.max_prompt_length < data.max_length (got max_prompt_length={max_prompt_length}, "
            f"max_length={max_length}): the step needs room after the prompt"
        )


def with_bos(tokenizer, text: str, ids: list[int]) -> list[int]:
    """``ids`` (the text encoded without special tokens) with the tokenizer's BOS in front, once: not when the
    tokenizer has none (Qwen2), nor when the text already spells it (a chat template that writes
    ``<|begin_of_text|>`` itself). Training and generation both build prompts this way, so a model is
    evaluated on exactly the prompt tokens it was trained on."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos_id is None or (bos_text and text.startswith(bos_text)):
        return list(ids)
    return [bos_id, *ids]


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompt token ids as training builds them: encoded without special tokens, then ``with_bos``."""
    return [with_bos(tokenizer, text, ids) for text, ids in zip(texts, _encode(tokenizer, texts))]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """One batched call (the fast tokenizer runs it in Rust, on all cores); ids as plain lists."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The same ids as tokenizer(texts, add_special_tokens=False) (a test checks it), about twice
        # as fast: it skips computing character offsets, which we never use.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: the model_max_length warning is noise here, we truncate ourselves.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
    return encoded["input_ids"]


def _encode_unique(tokenizer, texts: list[str]) -> list[list[int]]:
    """_encode for lists with repeats (rows sharing a prompt or a continuation): each text once."""
    unique = list(dict.fromkeys(texts))
    ids = dict(zip(unique, _encode(tokenizer, unique)))
    return [ids[text] for text in texts]


def _split_steps(prompt_texts: list[str], unique_ids: dict[str, list[int]],
                 joint: list[list[int]]) -> tuple[list[list[int] | None], list[int]]:
    """Step ids = joint ids minus the prompt-alone prefix; indices where the prefix differs are
    returned for the fallback. List slicing/compare runs in C, not a per-token Python loop."""
    steps: list[list[int] | None] = []
    merged: list[int] = []
    for index, (text, ids) in enumerate(zip(prompt_texts, joint)):
        prompt = unique_ids[text]
        if ids[: len(prompt)] == prompt:
            steps.append(ids[len(prompt):])
        else:
            steps.append(None)
            merged.append(index)
    return steps, merged


def _retokenize_alone(tokenizer, steps: list, merged: list[int], step_texts: list[str]) -> None:
    for index, ids in zip(merged, _encode(tokenizer, [step_texts[i] for i in merged])):
        steps[index] = ids


def _truncate(record_id: str, prompt: list[int], chosen: list[int], rejected: list[int], bos_id: int | None,
              max_length: int, max_prompt_length: int, stats: TruncationStats):
    """Cut one record to the limits; the counts change only for records that are kept."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        # Keep the end: the problem's last sentence and the earlier steps matter most for step k.
        # A leading BOS stays, since models are trained to always see it first.
        keep_bos = bos_id is not None and prompt[0] == bos_id and max_prompt_length > 1
        head = prompt[:1] if keep_bos else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
    budget = max_length - len(prompt)
    for name, step in (("chosen", chosen), ("rejected", rejected)):
        if not step:
            raise DataError(f"record {record_id}: the {name} step is empty after tokenization "
                            f"(the tokenizer produced no tokens for its text)")
        if budget <= 0:
            # Unreachable while max_prompt_length < max_length is enforced; kept as the last guard
            # so a record with an empty step can never reach the trainer.
            raise DataError(
                f"record {record_id}: the prompt cannot fit with its {name} step (prompt {len(prompt)} tokens "
                f"after truncation, step {len(step)} tokens; max_length={max_length}, "
                f"max_prompt_length={max_prompt_length}): raise data.max_length or lower "
                f"data.max_prompt_length, or set data.skip_bad_rows to skip such records"
            )
    stats.prompts_truncated += prompt_cut
    stats.chosen_truncated += len(chosen) > budget
    stats.rejected_truncated += len(rejected) > budget
    # Keep the beginning of each step: the tokens right after the prompt decide chosen vs rejected.
    return (np.asarray(prompt, dtype=np.int64), np.asarray(chosen[:budget], dtype=np.int64),
            np.asarray(rejected[:budget], dtype=np.int64))


# ---------------------------------------------------------------- cache


def dataset_fingerprint(path, tokenizer, template: str, max_length: int, max_prompt_length: int,
                        mode: str, skip_bad_rows: bool = False) -> str:
    """sha256 over everything the tokenized output depends on: file bytes and name (default record
    ids contain it), the tokenizer's full definition, the template and the settings."""
    digest = hashlib.sha256()
    digest.update(f"fasttrain-tokenized-v{CACHE_FORMAT_VERSION}\0{Path(path).name}\0".encode())
    # a saved dataset is a directory: every file in it, in a fixed order, with its relative name
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    try:
        for file in files:
            if file != Path(path):
                digest.update(f"\0{file.relative_to(path)}\0".encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023 - the lambda is used at once, in this iteration
                    digest.update(chunk)
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from None
    digest.update(_tokenizer_identity(tokenizer).encode())
    settings = {"template": template, "max_length": max_length, "max_prompt_length": max_prompt_length,
                "mode": mode, "skip_bad_rows": skip_bad_rows}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else (
        f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}:{len(tokenizer)}")
    # BOS handling and the chat template live outside the backend's JSON but change the output.
    extras = {"bos_token": getattr(tokenizer, "bos_token", None),
              "bos_token_id": getattr(tokenizer, "bos_token_id", None),
              "chat_template": getattr(tokenizer, "chat_template", None)}
    return definition + "\0" + json.dumps(extras, sort_keys=True, default=str)


def prepare_dataset(path, tokenizer, template: str, max_length: int, max_prompt_length: int,
                    mode: str = "step", skip_bad_rows: bool = False,
                    cache_dir: str | None = None) -> TokenizedPairs:
    """load_records + tokenize_records, cached as ``cache_dir/<fingerprint>.npz`` when cache_dir is set."""
    def build() -> TokenizedPairs:
        records = load_records(path, mode=mode, skip_bad_rows=skip_bad_rows)
        return tokenize_records(records, tokenizer, template, max_length, max_prompt_length, skip_bad_rows)

    if cache_dir is None:
        return build()
    _check_lengths(max_length, max_prompt_length)
    fingerprint = dataset_fingerprint(path, tokenizer, template, max_length, max_prompt_length, mode,
                                      skip_bad_rows)
    cache_path = Path(cache_dir) / f"{fingerprint}.npz"
    if cache_path.is_file():
        try:
            return TokenizedPairs.load(cache_path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # damaged or from another format version: rebuild and overwrite it
    pairs = build()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: os.replace is atomic, so a crash never leaves half a file
        # under the real name, and concurrent ranks each write their own temp file.
        handle, temp_name = tempfile.mkstemp(dir=cache_path.parent, prefix=f".{fingerprint}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"data.cache_dir {cache_dir}: cannot create the tokenized-data cache there "
                        f"({error.strerror or error}); choose another data.cache_dir") from None
    os.close(handle)
    try:
        pairs.save(temp_name)
        os.replace(temp_name, cache_path)
    except OSError as error:
        raise UserError(f"data.cache_dir {cache_dir}: cannot write {cache_path.name} "
                        f"({error.strerror or error})") from None
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)
    return pairs
