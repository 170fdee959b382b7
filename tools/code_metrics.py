"""Layout metrics of a checkout (issue 16's before/after): Python lines per top-level folder, the longest
functions, and how a run's config travels through the files while the run is set up. (Import circles are
tests/test_layout.py's job: CI fails on one.)

    python tools/code_metrics.py                 # this checkout
    python tools/code_metrics.py --repo /tmp/old # another checkout (e.g. a `git worktree` of an older commit)

The config trace runs ``fasttrain.trainer.train`` on the demo config (64 training pairs, 1 step, CPU) and
follows every call of a function in fasttrain/ or kernels/ that receives the config or one of its sections
as an argument, until the first DPO loss. A *visit* is control entering a file through such a call from another
file; a *climb back* is such a call returning into a different file (the reader has to go back up to go on).
It also counts the files any code of the set-up runs in, and the distinct calls from a function of one file into a
function of another.
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

FOLDERS = ("fasttrain", "kernels", "benchmarks", "tests", "tools")


def python_files(repo: Path, folder: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", folder], capture_output=True, text=True, check=True)
    return [repo / f for f in out.stdout.split() if f.endswith(".py")]


def lines_per_folder(repo: Path) -> dict[str, int]:
    return {f: sum(len(p.read_text().splitlines()) for p in python_files(repo, f)) for f in FOLDERS}


def longest_functions(repo: Path, n: int = 8) -> list[tuple[int, str]]:
    found = []
    for folder in ("fasttrain", "kernels"):
        for path in python_files(repo, folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(repo)}:{node.name}"))
    return sorted(found, reverse=True)[:n]


TRACE = r'''
import json, sys, tempfile
from pathlib import Path
repo = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(repo), str(repo / "kernels")]
from fasttrain.config import load_config
from fasttrain import trainer
work = Path(tempfile.mkdtemp())
demo = repo / "fasttrain" / "demo"
for split, n in (("train", 64), ("eval", 16)):
    lines = (demo / "data" / f"{split}.jsonl").read_text().splitlines()[:n]
    (work / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
cfg = load_config(str(demo / "demo.yaml"), [f"train.output_dir={work / 'run'}", f"data.cache_dir={work / 'cache'}",
      f"data.train={work / 'train.jsonl'}", f"data.eval={work / 'eval.jsonl'}", "train.max_steps=1",
      "train.progress_bar=false", "train.plot=false", "train.tensorboard=false"])
carried = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "__dataclass_fields__")]
roots = (str(repo / "fasttrain"), str(repo / "kernels"))
stack, visits, climbs, touched, edges = [], {}, 0, set(), set()
class Done(Exception):
    pass
def profile(frame, event, arg):
    global climbs
    if event not in ("call", "return"):
        return
    code = frame.f_code
    if not code.co_filename.startswith(roots):
        return
    if event == "call" and code.co_name == "dpo_pair_losses":
        raise Done
    file = str(Path(code.co_filename).relative_to(repo))
    touched.add(file)
    up = frame.f_back.f_code if frame.f_back else None
    if event == "call" and up and up.co_filename.startswith(roots) and up.co_filename != code.co_filename:
        edges.add((up.co_filename, up.co_name, code.co_filename, code.co_name))
    if event == "call":
        args = [frame.f_locals.get(a) for a in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(a is c for a in args for c in carried):
            if not stack or stack[-1][1] != file:
                visits[file] = visits.get(file, 0) + 1
            stack.append((frame, file))
    elif stack and stack[-1][0] is frame:
        stack.pop()
        if stack and stack[-1][1] != file:
            climbs += 1
sys.setprofile(profile)
try:
    trainer.train(cfg)
except Done:
    pass
finally:
    sys.setprofile(None)
print(json.dumps({"visits": visits, "climbs": climbs, "touched": len(touched), "edges": len(edges)}))
'''


def config_trace(repo: Path) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TRACE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, f.name, str(repo)], capture_output=True, text=True, env=env, cwd=repo)
    os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"the config trace failed in {repo}:\n{out.stderr[-3000:]}")
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    repo = Path(ap.parse_args(argv).repo).resolve()
    print("Python lines per folder:", ", ".join(f"{k} {v:,}" for k, v in lines_per_folder(repo).items()))
    print("longest functions:", ", ".join(f"{name} {n}" for n, name in longest_functions(repo)))
    trace = config_trace(repo)
    visits = Counter(trace["visits"])
    print(f"setting up a run runs code in {trace['touched']} files ({trace['edges']} distinct calls from one file's "
          f"function into another's); the config enters {len(visits)} of them, "
          f"{sum(visits.values())} times, and climbs back {trace['climbs']} times; most entered: "
          + ", ".join(f"{f} {n}" for f, n in visits.most_common(4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
