"""Text generation backends for evaluation and data generation.

A :class:`Generator` turns a list of prompts (already templated text) into ``n`` completions each:

    gen.generate(prompts, max_new_tokens=512, temperature=0.0, top_p=1.0, n=1, seed=0)
        -> list[list[str]]     # one list of n completions per prompt, in input order

Backends:

* :class:`HFGenerator` -- ``transformers`` ``AutoModelForCausalLM.generate``: prompts sorted by
  token length and batched (``batch_size``) with LEFT padding and an attention mask, KV cache,
  greedy when ``temperature == 0`` else sampling with ``temperature`` / ``top_p``, stopping at EOS
  (the tokenizer's and the generation config's EOS ids, plus ``<|im_end|>`` / ``<|eot_id|>`` when
  they are single tokens of the vocabulary). The checkpoint's other generation defaults
  (repetition penalty, top_k, ...) are not used: only the arguments given decide the decoding.
  Prompts are tokenized as training tokenizes them (no special tokens, BOS once: ``with_bos``).
  bf16 on CUDA, fp32 on CPU; ``torch.inference_mode``; one host sync per batch for the results (plus
  the ones per decoding step that ``generate`` itself does: its stopping check and, with padding, its
  mask check). A tokenizer without
  a pad token gets ``pad = eos`` in memory only (no file is touched). Sampling is seeded: the same
  prompts, seed and batch size on the same machine give the same text. ``ignore_eos=True`` makes every
  sequence exactly ``max_new_tokens`` long (EOS is masked until then): for throughput benchmarks with
  random weights, never for evaluation.
* :class:`VLLMGenerator` -- vLLM's offline ``LLM.generate``. **Untested here** (no vLLM / GPU in CI):
  it is kept deliberately thin.

:func:`make_generator` picks one: ``auto`` = vLLM when it is importable and CUDA is available, else HF.

Both count generated tokens (up to and including the stop token), prompt tokens (without padding) and
generation wall time in ``gen.stats`` (for tokens/s reports).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from fasttrain.data.tokenize import encode_prompts
from fasttrain.errors import UserError

__all__ = ["GenStats", "Generator", "HFGenerator", "VLLMGenerator", "make_generator", "vllm_available"]

EXTRA_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int = 0) -> list[list[str]]:
        ...


@dataclass
class GenStats:
    generated_tokens: int = 0
    seconds: float = 0.0
    sequences: int = 0
    prompt_tokens: int = 0  # real prompt tokens of every generated sequence, padding excluded

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _check_args(max_new_tokens, temperature, top_p, n):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


class HFGenerator:
    """Batched generation with ``transformers`` (see the module docstring)."""

    def __init__(self, model_dir: str, batch_size: int = 32, device: str | None = None, dtype=None,
                 progress: bool = False, ignore_eos: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.progress = progress
        self.ignore_eos = bool(ignore_eos)
        self.stats = GenStats()
        self.backend = "hf"

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"{self.model_dir}: tokenizer has neither a pad nor an EOS token")
            tok.pad_token = tok.eos_token  # in memory only
        # left padding: every row's last prompt token sits in the last column, so each decoding step
        # appends one column for the whole batch; the attention mask hides the pads
        tok.padding_side = "left"
        self.tokenizer = tok
        import transformers

        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, **{dtype_kw: dtype}).to(self.device)
        self.model.eval()
        self.stop_ids = self._stop_ids()
        # generate() fills every field its GenerationConfig leaves unset from the model's own (transformers
        # 5.x: _prepare_generation_config, defaults_only=True), so a checkpoint's generation_config.json
        # (Qwen2 instruct: repetition_penalty 1.05, top_k 20, ...) would leak into "plain" greedy decoding.
        # In memory only: a config that holds nothing but the stop and pad ids.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids,
                                                        pad_token_id=self.tokenizer.pad_token_id)

    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        stop: list[int] = []
        gc_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for ids in (gc_eos, tok.eos_token_id):
            if ids is None:
                continue
            stop.extend([ids] if isinstance(ids, int) else list(ids))
        vocab = tok.get_vocab()
        for t in EXTRA_STOP_TOKENS:
            if t in vocab:
                stop.append(vocab[t])
        stop_ids = sorted({int(i) for i in stop})
        if not stop_ids:
            raise ValueError(f"{self.model_dir}: no EOS token id in the tokenizer or generation config")
        return stop_ids

    def _generation_config(self, max_new_tokens, temperature, top_p):
        """A fresh config: the checkpoint's own sampling defaults (repetition penalty, top_k, ...) are
        deliberately NOT inherited, so results depend only on the arguments given here."""
        from transformers import GenerationConfig

        kw = {"do_sample": False} if temperature == 0 else {
            "do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
        if self.ignore_eos:
            kw["min_new_tokens"] = int(max_new_tokens)  # stop ids get -inf logits until the length is reached
        return GenerationConfig(max_new_tokens=int(max_new_tokens), eos_token_id=self.stop_ids,
                                pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **kw)

    def _left_pad(self, seqs: list[list[int]]):
        """(input_ids, attention_mask) on the device, padded on the left to the longest sequence."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            if s:
                ids[j, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[j, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _cut(self, toks: list[int], stop_set: set[int]) -> list[int]:
        """The new tokens up to and including the first stop token (after it come only pads)."""
        if not self.ignore_eos:
            for k, t in enumerate(toks):
                if t in stop_set:
                    return toks[:k + 1]
        return toks

    def generate(self, prompts: list[str], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int = 0) -> list[list[str]]:
        import torch

        _check_args(max_new_tokens, temperature, top_p, n)
        if not prompts:
            return []
        greedy = temperature == 0
        reps = 1 if greedy else n  # greedy: one decode, copied n times
        enc = encode_prompts(self.tokenizer, list(prompts))  # BOS once, exactly as training builds prompts
        # every (prompt, repeat) is one sequence; sorted by length so a batch holds similar lengths
        # (little padding), longest first so the first batch shows an OOM early
        jobs = sorted(((i, r) for i in range(len(prompts)) for r in range(reps)),
                      key=lambda ir: (-len(enc[ir[0]]), ir[0], ir[1]))
        out: list[list[str | None]] = [[None] * reps for _ in prompts]
        batches = [jobs[s:s + self.batch_size] for s in range(0, len(jobs), self.batch_size)]
        bar = _progress(len(jobs), "generate", self.progress)
        t0 = time.perf_counter()
        stop_set = set(self.stop_ids)
        gcfg = self._generation_config(max_new_tokens, temperature, top_p)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for b, batch in enumerate(batches):
                seqs = [enc[i] for i, _ in batch]
                ids, mask = self._left_pad(seqs)
                torch.manual_seed(int(seed) * 1_000_003 + b)
                with torch.inference_mode():
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg)
                new = gen[:, ids.shape[1]:].tolist()  # the one host sync of the batch
                for (i, r), s, toks in zip(batch, seqs, new):
                    toks = self._cut(toks, stop_set)
                    self.stats.generated_tokens += len(toks)
                    self.stats.prompt_tokens += len(s)
                    self.stats.sequences += 1
                    out[i][r] = self.tokenizer.decode(toks, skip_special_tokens=True)
                bar.update(len(batch))
        self.stats.seconds += time.perf_counter() - t0
        bar.close()
        return [list(o) * n if greedy else list(o) for o in out]


class VLLMGenerator:
    """vLLM backend (untested in CI: needs a GPU and the ``vllm`` package)."""

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, ignore_eos: bool = False, **_):
        if not vllm_available():
            raise RuntimeError("backend 'vllm' requested but the vllm package is not installed "
                               "(pip install vllm, or use --backend hf)")
        from vllm import LLM

        self.model_dir = str(model_dir)
        self.backend = "vllm"
        self.stats = GenStats()
        self.ignore_eos = bool(ignore_eos)  # as in HFGenerator: exactly max_new_tokens, for benchmarks
        kw = {"model": self.model_dir, "dtype": "bfloat16", "tensor_parallel_size": tensor_parallel_size,
                  "gpu_memory_utilization": gpu_memory_utilization}
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, seed: int = 0) -> list[list[str]]:
        from vllm import SamplingParams

        _check_args(max_new_tokens, temperature, top_p, n)
        if not prompts:
            return []
        greedy = temperature == 0
        sp = SamplingParams(n=1 if greedy else n, temperature=float(temperature),
                            top_p=1.0 if greedy else float(top_p), max_tokens=int(max_new_tokens),
                            seed=int(seed), ignore_eos=self.ignore_eos)
        # token prompts built as training builds them: vLLM would add its own BOS in front of a chat template's
        token_prompts = [{"prompt_token_ids": ids} for ids in encode_prompts(self.tokenizer, list(prompts))]
        t0 = time.perf_counter()
        res = self.llm.generate(token_prompts, sp)
        self.stats.seconds += time.perf_counter() - t0
        out = []
        for r in res:
            texts = [o.text for o in r.outputs]
            self.stats.generated_tokens += sum(len(o.token_ids) for o in r.outputs)
            self.stats.sequences += len(r.outputs)
            self.stats.prompt_tokens += len(r.prompt_token_ids or []) * len(r.outputs)
            out.append(texts * n if greedy else texts)
        return out


_LOGGED: set = set()


def make_generator(model_dir: str, backend: str = "auto", batch_size: int = 32, progress: bool = False,
                   **kw) -> Generator:
    """``backend``: ``auto`` (vLLM if importable and CUDA available, else HF), ``hf`` or ``vllm``."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, hf or vllm")
    if backend == "auto":
        import torch

        backend = "vllm" if (vllm_available() and torch.cuda.is_available()) else "hf"
        why = "vllm importable and CUDA available" if backend == "vllm" else (
            "vllm not installed" if not vllm_available() else "no CUDA device")
    else:
        why = "requested"
    if backend not in _LOGGED:
        _LOGGED.add(backend)
        print(f"[fasttrain] generation backend: {backend} ({why})", file=sys.stderr)
    if backend == "vllm" and not vllm_available():
        raise UserError("backend 'vllm' requested but the vllm package is not installed "
                        "(pip install vllm, or use --backend hf)")
    check_model_dir(model_dir)
    try:
        if backend == "vllm":
            return VLLMGenerator(model_dir, **kw)
        return HFGenerator(model_dir, batch_size=batch_size, progress=progress, **kw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers/vLLM raise many types while loading; name the model
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise UserError(f"--model {model_dir}: cannot load the model ({type(e).__name__}: {first})") from None


def check_model_dir(model_dir: str) -> None:
    """The model directory exists, has a config.json, and its safetensors files (if any) are readable: a missing
    or truncated file is named here, before any output directory is created."""
    from fasttrain.model.hf_checkpoint import INDEX_FILE, SINGLE_FILE, check_model_files

    d = Path(model_dir)
    if not (d / "config.json").is_file() and (d / "adapter_config.json").is_file():
        merged = d.with_name(d.name + "_merged")
        hint = (f"evaluate {merged}, its merged export" if (merged / "config.json").is_file() else
                "train with train.merge_lora=true for a merged export beside it, or merge it with peft")
        raise UserError(f"--model {model_dir}: a LoRA adapter directory (PEFT), not a whole model; {hint}")
    if not (d / "config.json").is_file():
        raise UserError(f"--model {model_dir}: expected a Hugging Face model directory with a config.json")
    if (d / INDEX_FILE).is_file() or (d / SINGLE_FILE).is_file():
        try:
            check_model_files(d)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {model_dir}: {e}") from None


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
