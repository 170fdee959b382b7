"""``python -m fasttrain.datagen --model DIR --data problems.jsonl --out DIR`` -- make Step-DPO pairs.

Problems use the eval format (instruction/prompt/question + answer). Resumable: rerun the same
command to continue; finished problems are skipped and no record is written twice.
Errors in the arguments, model or data end the run with one line on stderr and exit code 2 (fasttrain/cli.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from fasttrain.data.templates import TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    from fasttrain.eval.evaluate import DEFAULT_PREFILL

    p = argparse.ArgumentParser(prog="python -m fasttrain.datagen", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (the policy that samples)")
    p.add_argument("--data", required=True, help="problems JSONL (instruction/prompt/question + answer)")
    p.add_argument("--out", required=True, help="output directory (records.jsonl, progress.jsonl, ...)")
    p.add_argument("--template", default="qwen2-boxed", choices=TEMPLATES)
    p.add_argument("--prefill", default=DEFAULT_PREFILL)
    p.add_argument("--samples", type=int, default=8, help="solutions sampled per problem (error collection)")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per step prefix (localization)")
    p.add_argument("--rectify", type=int, default=20, help="continuations sampled from the correct prefix")
    p.add_argument("--threshold", type=float, default=0.0, help="success rate <= this counts as 'cannot succeed'")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-wrong-per-problem", type=int, default=4, help="wrong solutions localized per problem")
    p.add_argument("--max-steps", type=int, default=12, help="skip wrong solutions with more steps")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="grade texts without an explicit final answer (\\boxed, 'answer is', ####) by their last "
                        "number instead of treating them as unfinished (truncated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch (HF backend)")
    p.add_argument("--problems-per-call", type=int, default=16,
                   help="problems sampled together, one generate call per stage; records and progress are "
                        "written per such chunk")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"))
    p.add_argument("--judge", default="rollout", choices=("rollout", "openai"))
    p.add_argument("--judge-base-url", default=None, help="e.g. http://host:8000/v1 (for --judge openai)")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-api-key-env", default=None, help="name of the env variable holding the API key")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fasttrain.cli import run_command

    return run_command("fasttrain.datagen", lambda: _datagen(args))


def _datagen(args) -> int:
    from fasttrain.datagen.judge import OpenAICompatibleJudge
    from fasttrain.datagen.pipeline import DatagenConfig, run_datagen
    from fasttrain.errors import DataError, UserError
    from fasttrain.eval.evaluate import load_problems
    from fasttrain.eval.generate import make_generator

    try:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        cfg = DatagenConfig(template=args.template, prefill=args.prefill, samples=args.samples,
                            rollouts=args.rollouts, rectify=args.rectify, threshold=args.threshold,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            max_wrong_per_problem=args.max_wrong_per_problem, max_steps=args.max_steps,
                            require_final_answer=not args.allow_unfinished, seed=args.seed,
                            source_model=str(args.model),
                            problems_per_call=args.problems_per_call)
        judge = None
        if args.judge == "openai":
            if not args.judge_base_url or not args.judge_model:
                raise ValueError("--judge openai needs --judge-base-url and --judge-model")
            key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
            judge = OpenAICompatibleJudge(args.judge_base_url, args.judge_model, api_key=key)
        problems = load_problems(args.data, limit=args.limit)
        if not problems:
            raise DataError(f"{args.data}: no problems")
        gen = make_generator(args.model, backend=args.backend, batch_size=args.batch_size)
        s = run_datagen(gen, problems, args.out, cfg, judge=judge, tokenizer=getattr(gen, "tokenizer", None),
                        progress=not args.no_progress)
    except (ValueError, RuntimeError, OSError) as e:  # arguments, files, a resume with other settings
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    print(f"{s['problems_done']}/{s['problems_total']} problems done, {s['records']} records in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
