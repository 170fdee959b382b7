"""benchmarks/bench_optimizer.py on a tiny shape: every variant steps, and the bytes per parameter it reports are
measured from the tensors (16 for fp32 state, 10 for compact)."""
from cli_runner import load_benchmark


def test_smoke_reports_each_state(capsys):
    bench = load_benchmark("bench_optimizer")
    assert bench.main(["--smoke", "--warmup", "0", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(bench.VARIANTS)
    assert [r.rstrip(" |").rsplit(" | ", 1)[1] for r in rows] == ["16.00", "16.00", "10.00"]
