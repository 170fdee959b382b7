"""``python -m fasttrain.eval --model DIR --data FILE.jsonl --out DIR`` -- greedy math evaluation.

See :mod:`fasttrain.eval.evaluate` for the data format and the files written. Errors in the
arguments, model or data end the run with one line on stderr and exit code 2 (fasttrain/cli.py), before
``--out`` is created.
"""
from __future__ import annotations

import argparse
import sys
import time

from fasttrain.data.templates import TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    from fasttrain.eval.evaluate import DEFAULT_PREFILL

    p = argparse.ArgumentParser(prog="python -m fasttrain.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", required=True, help="JSONL with instruction/prompt/question and answer")
    p.add_argument("--out", required=True, help="output directory (outputs.jsonl, summary.json)")
    p.add_argument("--template", default="qwen2-boxed", choices=TEMPLATES)
    p.add_argument("--prefill", default=DEFAULT_PREFILL,
                   help="text the assistant turn starts with (default: the paper's %(default)r)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"))
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fasttrain.cli import run_command

    return run_command("fasttrain.eval", lambda: _evaluate(args))


def _evaluate(args) -> int:
    from fasttrain.errors import DataError, UserError
    from fasttrain.eval.evaluate import check_out_dir, evaluate, load_problems, prepare_out_dir
    from fasttrain.eval.generate import make_generator

    t0 = time.perf_counter()
    try:
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        problems = load_problems(args.data, limit=args.limit)
        if not problems:
            raise DataError(f"{args.data}: no problems")
        check_out_dir(args.out, args.overwrite)
        gen = make_generator(args.model, backend=args.backend, batch_size=args.batch_size,
                             progress=not args.no_progress)
        out = prepare_out_dir(args.out, args.overwrite)  # created only once the model has loaded
    except (ValueError, FileExistsError, RuntimeError, OSError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    meta = {"model": str(args.model), "data": str(args.data), "limit": args.limit,
            "load_seconds": time.perf_counter() - t0}
    s = evaluate(gen, problems, out, template=args.template, prefill=args.prefill,
                 max_new_tokens=args.max_new_tokens, meta=meta)
    per = ", ".join(f"{k} {v['accuracy']:.4f} ({v['correct']}/{v['total']})" for k, v in s["per_source"].items())
    tps = s["generation_tokens_per_s"]
    print(f"accuracy {s['accuracy']:.4f} ({s['correct']}/{s['total']}); {per}; "
          f"{tps:.1f} generated tokens/s; wall {s['wall_seconds']:.1f}s; wrote {out}" if tps is not None else
          f"accuracy {s['accuracy']:.4f} ({s['correct']}/{s['total']}); {per}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
