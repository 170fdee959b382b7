"""Build the demo's small Step-DPO set from GSM8K reference solutions.

GSM8K solutions have one reasoning step a line, with calculator annotations such as
``16 - 3 - 4 = <<16-3-4=9>>9 duck eggs``. For a step k with an annotation:

- prompt = the question; initial_reason_steps = "Let's think step by step.\\nStep 1: ...\\nStep k:"
- chosen = " " + line k as written (annotation kept)
- rejected = line k with the number shown after ">>" replaced by a wrong one, the annotation left
  intact: the slip is visible because the shown result disagrees with the annotation, which a tiny
  model can learn to detect by copying. About 15% of the prompts get a second rejected variant (a
  different wrong number) as its own record, so the demo has shared prefixes with several continuations.
- full_chosen / full_rejected (for the plain-DPO mode): the step plus the rest of the solution.

Train and eval are split by problem. Deterministic (fixed seed).

    python tools/demo/make_demo_data.py [--gsm8k ../shared/data/gsm8k_test.jsonl]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
DEFAULT_OUT = REPO_ROOT / "fasttrain" / "demo" / "data"

SEED = 20240
TRAIN_PROBLEMS = 1000
MAX_STEPS_PER_TRAIN_PROBLEM = 2
MAX_TRAIN_RECORDS = 2500
MAX_EVAL_RECORDS = 200
SECOND_REJECTED_FRACTION = 0.15

# "<<expr=result>>shown": the shown number is what a wrong step changes. Commas as in "130,000".
ANNOTATION = re.compile(r"<<[^<>]*=[^<>]*>>(\d[\d,]*(?:\.\d+)?)")


@dataclass
class Problem:
    idx: str
    question: str
    steps: list[str]  # solution lines without the final "#### answer"
    answer: str


def read_problems(path: Path) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            lines = [text.strip() for text in row["output"].split("\n") if text.strip()]
            if not lines or not lines[-1].startswith("####"):
                continue
            problems.append(Problem(row["idx"], row["instruction"].strip(), lines[:-1],
                                    lines[-1].removeprefix("####").strip()))
    return problems


def wrong_number(shown: str, rng: random.Random, avoid: set[str]) -> str:
    """A plausible wrong value for ``shown``, formatted like it (commas kept), never negative."""
    for _ in range(100):
        digits = shown.replace(",", "")
        if "." not in digits and rng.random() < 0.5:
            value = int(digits) + rng.choice([-1, 1]) * rng.randint(1, 9)
            if value < 0:
                continue
            candidate = f"{value:,}" if "," in shown else str(value)
        else:
            # Change one digit; a leading digit never becomes 0 (that would read as a shorter number).
            positions = [i for i, ch in enumerate(shown) if ch.isdigit()]
            position = rng.choice(positions)
            low = 1 if position == 0 and len(positions) > 1 else 0
            replacement = str(rng.choice([d for d in range(low, 10) if str(d) != shown[position]]))
            candidate = shown[:position] + replacement + shown[position + 1:]
        if candidate != shown and candidate not in avoid:
            return candidate
    raise RuntimeError(f"could not find a wrong number for {shown!r}")


def corrupt_step(line: str, rng: random.Random, avoid: set[str]) -> tuple[str, str]:
    """Replace the number shown after the last annotation of ``line`` (the step's result)."""
    match = list(ANNOTATION.finditer(line))[-1]
    wrong = wrong_number(match.group(1), rng, avoid)
    return line[: match.start(1)] + wrong + line[match.end(1):], wrong


def prefix_text(steps: list[str], k: int) -> str:
    """initial_reason_steps for step k (1-based): earlier steps, ending with the label "Step k:"."""
    lines = ["Let's think step by step."] + [f"Step {i + 1}: {steps[i]}" for i in range(k - 1)] + [f"Step {k}:"]
    return "\n".join(lines)


def rest_of_solution(problem: Problem, k: int) -> str:
    later = "".join(f"\nStep {i + 1}: {problem.steps[i]}" for i in range(k, len(problem.steps)))
    return later + f"\nThe answer is: {problem.answer}"


def records_for_step(problem: Problem, k: int, rng: random.Random) -> list[dict]:
    line = problem.steps[k - 1]
    rejected_variants = []
    wrong_shown: set[str] = set()
    count = 2 if rng.random() < SECOND_REJECTED_FRACTION else 1
    for _ in range(count):
        rejected, wrong = corrupt_step(line, rng, wrong_shown)
        wrong_shown.add(wrong)
        rejected_variants.append(rejected)
    records = []
    for variant, rejected in enumerate(rejected_variants, start=1):
        records.append({
            "id": f"{problem.idx}-step{k}" + (f"-r{variant}" if variant > 1 else ""),
            "dataset": "gsm8k",
            "prompt": problem.question,
            "initial_reason_steps": prefix_text(problem.steps, k),
            "chosen": " " + line,
            "rejected": " " + rejected,
            "full_chosen": " " + line + rest_of_solution(problem, k),
            "full_rejected": " " + rejected + rest_of_solution(problem, k),
            "answer": problem.answer,
        })
    return records


def annotated_steps(problem: Problem) -> list[int]:
    return [k for k in range(1, len(problem.steps) + 1) if ANNOTATION.search(problem.steps[k - 1])]


def build(problems: list[Problem], max_steps: int, max_records: int, rng: random.Random) -> list[dict]:
    records: list[dict] = []
    for problem in problems:
        steps = annotated_steps(problem)
        chosen_steps = sorted(rng.sample(steps, min(max_steps, len(steps))))
        for k in chosen_steps:
            new = records_for_step(problem, k, rng)
            if len(records) + len(new) > max_records:
                return records
            records += new
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    rng = random.Random(SEED)
    problems = [p for p in read_problems(args.gsm8k) if annotated_steps(p)]
    rng.shuffle(problems)
    # Split by problem before building anything, so no question appears in both files.
    train = build(problems[:TRAIN_PROBLEMS], MAX_STEPS_PER_TRAIN_PROBLEM, MAX_TRAIN_RECORDS, rng)
    evaluation = build(problems[TRAIN_PROBLEMS:], 1, MAX_EVAL_RECORDS, rng)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    for name, records in (("train", train), ("eval", evaluation)):
        print(f"{name}: {len(records)} records from {len({r['prompt'] for r in records})} problems")


if __name__ == "__main__":
    main()
