"""benchmarks/gpu_check.py: the one GPU command. Its orchestration is tested with stand-in stages (a hang is
cut at its budget with its process group, a crash reported by its first error line, the next stages still
run, never more than 8 files), and the real stages end to end as the CPU rehearsal, so a typo, a missing
import or a wrong file count is found here and not on the device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
gpu_check = load_benchmark("gpu_check")

STAND_INS = '''
import os, subprocess, sys, time

def ok(ctx):
    ctx.table("numbers", ["a", "b"]).add(1, "x")
    ctx.summary("fine")

def hang(ctx):
    ctx.table("before the hang", ["what"]).add("measured")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker it started
    ctx.set(grandchild=child.pid)
    time.sleep(600)

def crash(ctx):
    ctx.note("about to fail")
    raise ValueError("boom on line one\\nline two")

def hard_crash(ctx):
    print("Traceback (most recent call last):", flush=True)
    print("torch.OutOfMemoryError: CUDA out of memory", flush=True)
    os._exit(3)  # no result written: as after an abort in native code

def checks(ctx):
    ctx.check(True, "fine")
    ctx.check(False, "dW over tolerance")
    ctx.table("after the failed check", ["what"]).add("still ran")

def skipped(ctx):
    ctx.skip("trl is not importable")
'''


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stages(tmp_path: Path, names_budgets):
    module = tmp_path / "stand_ins.py"
    module.write_text(STAND_INS)
    return [gpu_check.Stage(name, f"stage {name}", f"{module}:{name}", budget, budget)
            for name, budget in names_budgets]


def _run(tmp_path, stages, budget_s):
    work = tmp_path / "work"
    work.mkdir()
    context = {"rehearsal": True, "commit": "test", "peak_tflops": None, "peak_source": None}
    return gpu_check.run_stages(stages, budget_s, True, context, work, gpu_check.Log(None))


def test_a_hanging_stage_is_cut_at_its_budget_and_the_rest_still_run(tmp_path):
    stages = _stages(tmp_path, [("hang", 3), ("ok", 10), ("crash", 10), ("hard_crash", 10), ("checks", 10),
                                ("skipped", 10), ("ok", 10)])
    budget = 63 + gpu_check.REPORT_RESERVE_S  # exactly the stage budgets + the report's reserve
    t0 = time.time()
    results = _run(tmp_path, stages, budget)
    by = [(r["key"], r["status"], r["reason"]) for r in results]
    assert [r["key"] for r in results] == ["hang", "ok", "crash", "hard_crash", "checks", "skipped", "ok"], by

    hang, ok, crash, hard, checks, skipped, last = results
    # the hang: killed at its budget, reported, the rows it saved before kept
    assert hang["status"] == "timed out" and hang["reason"] == "timed out after 3 s", hang
    assert 2.5 <= hang["limit_s"] <= 3 and hang["seconds"] < 3 + 5, hang
    assert hang["tables"][0]["rows"] == [["measured"]]
    grandchild = hang["data"]["grandchild"]
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's own worker survived the kill (process group not killed)"
    # a Python exception: its first line; a process that died without a result: its exit and last error line
    assert crash["status"] == "failed" and crash["reason"] == "ValueError: boom on line one", crash
    assert crash["notes"] == ["about to fail"]
    assert hard["status"] == "failed" and hard["reason"] == (
        "exit code 3; torch.OutOfMemoryError: CUDA out of memory"), hard
    # a failed check fails the stage, after the stage ran to its end
    assert checks["status"] == "failed" and checks["reason"] == "1 check(s) failed; first: dW over tolerance"
    assert checks["tables"][0]["rows"] == [["still ran"]]
    assert skipped["status"] == "skipped" and skipped["reason"] == "trl is not importable"
    assert ok["status"] == "ok" and ok["summary"] == "fine" and ok["tables"][0]["rows"] == [[1, "x"]]
    # what the quick stages left unused went to the ones after them, never less than their own budget
    assert last["status"] == "ok" and last["limit_s"] > 10 + 20, last
    assert time.time() - t0 < budget


def test_a_stage_without_time_left_is_skipped_not_started(tmp_path):
    results = _run(tmp_path, _stages(tmp_path, [("ok", 10)]), budget_s=gpu_check.REPORT_RESERVE_S)
    assert results[0]["status"] == "skipped" and results[0]["reason"].startswith("global deadline"), results


def test_stage_budgets_fill_the_global_deadline_and_keep_the_later_stages_budgets():
    gpu = gpu_check.stage_budgets(gpu_check.STAGES, 480, rehearsal=False)
    assert sum(gpu) == pytest.approx(480 - gpu_check.REPORT_RESERVE_S)
    assert [round(b) for b in gpu] == [s.gpu_s for s in gpu_check.STAGES]  # the table is written for 480 s
    assert sum(gpu_check.stage_budgets(gpu_check.STAGES, 240, rehearsal=False)) == pytest.approx(230)
    # the device runs one command for at most 600 s; the default must leave room for start-up and the report
    assert gpu_check.DEFAULT_BUDGET_S["gpu"] + 60 <= 540
    assert gpu_check.DEFAULT_BUDGET_S["rehearsal"] < 180


def test_out_never_holds_more_than_8_files(tmp_path):
    out = tmp_path / "out"
    gpu_check.check_out_dir(out)
    # many stages, several with a profile: still the same 4 files
    results = []
    for i in range(12):
        profile = tmp_path / f"profile{i}.txt"
        profile.write_text(f"top 15 of stage {i}")
        results.append({"key": f"s{i}", "title": f"stage {i}", "status": "ok", "reason": "", "seconds": 1.0,
                        "limit_s": 2.0, "summary": "", "tables": [{"title": "t", "columns": ["a"], "rows": [[1]]}],
                        "notes": [], "data": {}, "artifacts": {"profile": str(profile)}})
    meta = {"rehearsal": True, "commit": "abc", "commit_source": "--commit", "command": "c", "date": "2026-01-01",
            "budget_s": 10, "wall_s": 1, "finished": True}
    gpu_check.write_report(out, meta, results)
    (out / "gpu_check.log").write_text("log")
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
    assert len(gpu_check.OUT_FILES) <= gpu_check.MAX_OUT_FILES
    assert "top 15 of stage 11" in (out / "gpu_check_profile.txt").read_text()
    gpu_check.check_out_dir(out)  # its own files: replaced, not refused
    (out / "something_else.txt").write_text("x")
    with pytest.raises(SystemExit, match="holds other files"):
        gpu_check.check_out_dir(out)


def test_without_a_gpu_the_gpu_mode_refuses_before_doing_anything(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--commit", "abc"]) == 2
    assert "--cpu-rehearsal" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert gpu_check.main(["--cpu-rehearsal", "--stages", "env,warp_drive"]) == 2


def test_commit_comes_from_the_flag_first():
    assert gpu_check.benchlib.resolve_commit("abc1234") == ("abc1234", "--commit")


def test_cpu_rehearsal_runs_every_stage_within_its_budget(tmp_path):
    """The CI run of the real stages: tiny shapes on the CPU, Triton under the interpreter."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}  # the script sets its own
    t0 = time.time()
    # Twice the default 170 s deadline (every stage budget scales with it): alone on CI's 2 cores the rehearsal
    # takes 66-75 s, but with another process busy on one core two stages ran past their 170-s share once.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--budget-s", "340", "--out", str(out),
                           "--commit", "test"], capture_output=True, text=True, timeout=500, env=env, cwd=REPO)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert wall < 350, f"the rehearsal took {wall:.0f} s"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES), files  # 4 <= 8: what the device returns

    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["key"]: s for s in report["stages"]}
    assert list(stages) == [s.key for s in gpu_check.STAGES]
    for key, s in stages.items():
        assert s["status"] in ("ok", "skipped"), (key, s["status"], s["reason"])
        if s["status"] == "ok":
            assert s["tables"] and all(t["rows"] for t in s["tables"]), (key, s["tables"])
    assert report["commit"] == "test" and report["finished"]
    env_stage = stages["env"]["data"]
    assert env_stage["bf16_tflops"] > 0 and env_stage["copy_gbps"] > 0
    assert stages["demo"]["status"] == "ok"  # first loss ln 2, the steps logged, the export loads
    tests = {row[0]: row for row in stages["correctness"]["tables"][0]["rows"]}  # the GPU tests, through pytest
    assert len(tests) == 9 and sum(row[1] == "skipped" for row in tests.values()) == 8, tests
    attention = tests["test_prefix_shared_attention_bf16_against_float64_truth[random_groups-8-64-reference]"]
    assert attention[1] == "passed" and "dv error / bf16 dense error" in attention[2], attention
    assert stages["step_1p5b"]["status"] == "ok" and len(stages["step_1p5b"]["tables"][0]["rows"]) == 3
    assert "top 15" in (out / "gpu_check_profile.txt").read_text()
    components = stages["step_1p5b"]["tables"][1]  # measured / predicted per component, both references
    assert "PREDICTED" in components["title"] and len(components["rows"]) == 2 * 6
    assert all(row[3] != "–" for row in components["rows"]), components["rows"]  # --predict-for h100

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("### gpu_check: CPU rehearsal") and "- commit: test (--commit)" in md
    for stage in gpu_check.STAGES:
        assert f"#### {stage.title}" in md
    # the compact table prints last: the device returns only the end of the output
    tail = proc.stdout.rstrip().splitlines()
    assert tail[-1] == "== all stages ok or skipped", tail[-12:]
    table_rows = tail[-1 - len(gpu_check.STAGES):-1]
    assert [row.split("  ")[0] for row in table_rows] == [s.title for s in gpu_check.STAGES], tail[-12:]
    assert (out / "gpu_check.log").read_text().rstrip().endswith("== all stages ok or skipped")
