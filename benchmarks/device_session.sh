#!/usr/bin/env bash
# Every GPU check and benchmark of the repo, in parts meant to fit one 10-minute device command each (the
# device tool lends 30 minutes per session: run the parts in this order, stop where the budget ends). The
# times below are estimates: no part has run on a GPU yet.
#
#   bash benchmarks/device_session.sh preflight     # versions, CUDA allocator, wheel imports (~1 min; carry .whl)
#   bash benchmarks/device_session.sh correctness   # gpu-marked tests: attention backends, bf16 LM-head kernels,
#                                                    # whole-model packed vs unpacked, 72B layers (~5 min)
#   bash benchmarks/device_session.sh kernels       # bench_logprob (N x D grid, 5 implementations; carry .whl for
#                                                    # Liger) (~6 min)
#   bash benchmarks/device_session.sh step          # bench_step: 1.5B and 8B shapes, precomputed + live (~8 min);
#                                                    # the 8B runs all use 9 of its 32 layers (what fits with a live
#                                                    # reference on 80 GB), so eager / compile / profile compare
#   bash benchmarks/device_session.sh trl           # bench_vs_trl, all variants (~8 min; carry .whl, see below)
#   bash benchmarks/device_session.sh rest          # project_72b + bench_generate (~5 min)
#   bash benchmarks/device_session.sh sweep         # tile / chunk sweep of both LM-head kernels (~5 min)
#
# The GPU image has torch, triton and transformers but not this package: it runs from the tree through
# PYTHONPATH. trl / datasets / liger-kernel travel as wheels: run benchmarks/fetch_wheels.sh here first, carry
# ".whl", and the parts that need them install them into /tmp/site. Logs and JSON go to $OUT (the device tool's
# folder). The estimates add up to about the 30-minute budget: expect "trl" or "rest" to need a second session.
set -uo pipefail
part=${1:?usage: device_session.sh preflight|correctness|kernels|step|trl|rest|sweep}
OUT=${OUT:-/tmp/fasttrain-device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}

header() {
    "$PY" - <<'EOF'
import datetime, subprocess, torch, triton, transformers
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {card}  "
      f"torch {torch.__version__}  triton {triton.__version__}  transformers {transformers.__version__}  "
      f"commit {commit or 'n/a'}")
EOF
}

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log, keep going on failure, remember the status
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

install_wheels() {  # install_wheels required|optional: trl, datasets, liger-kernel from the carried .whl/
    if [ ! -d .whl ]; then
        echo "no .whl/: run benchmarks/fetch_wheels.sh here and carry .whl"
        [ "$1" = required ] && exit 2
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

header | tee -a "$OUT/summary.txt"
case "$part" in
preflight)
    install_wheels optional
    # reset_peak_memory_stats needs the CUDA allocator initialised (the benchmarks call torch.cuda.init first)
    run preflight "$PY" -c "
import importlib, torch
torch.cuda.init(); torch.cuda.reset_peak_memory_stats(0)
x = torch.randn(1024, 1024, device='cuda', dtype=torch.bfloat16); (x @ x).sum().item()
print('cuda ok:', torch.cuda.get_device_name(), 'peak', torch.cuda.max_memory_allocated() // 2**20, 'MiB')
print('aten::mm.dtype bf16->fp32:', torch.mm(x, x, out_dtype=torch.float32).dtype)
for name in ('trl', 'datasets', 'pyarrow', 'fsspec', 'peft', 'liger_kernel', 'accelerate', 'flash_attn'):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', '?'))
    except Exception as e:
        print(name, 'not importable:', type(e).__name__, str(e)[:100])
"
    ;;
correctness)
    # the kernel and attention files whole (their small tests run compiled on the GPU), then every gpu test
    run gpu_kernel_tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_lm_head_kernel.py \
        tests/test_attention_gpu.py --junitxml "$OUT/gpu_kernel_tests.xml"
    run gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests --junitxml "$OUT/gpu_tests.xml" \
        --ignore tests/test_lm_head_kernel.py --ignore tests/test_attention_gpu.py  # run whole just above
    ;;
kernels)
    install_wheels optional  # Liger's row needs liger-kernel
    run bench_logprob "$PY" benchmarks/bench_logprob.py
    ;;
step)
    run step_1p5b "$PY" benchmarks/bench_step.py --shape qwen2-1.5b --reference both --json "$OUT/step_1p5b.json"
    # one layer count for every 8B run (the automatic choice differs with and without a live reference)
    run step_8b "$PY" benchmarks/bench_step.py --shape llama3-8b --layers 9 --reference both \
        --json "$OUT/step_8b.json"
    run step_8b_compile "$PY" benchmarks/bench_step.py --shape llama3-8b --layers 9 --reference precomputed \
        --compile --json "$OUT/step_8b_compile.json"
    run step_8b_profile "$PY" benchmarks/bench_step.py --shape llama3-8b --layers 9 --reference precomputed \
        --steps 2 --profile
    ;;
trl)
    install_wheels required
    run bench_vs_trl "$PY" benchmarks/bench_vs_trl.py --json-out "$OUT/bench_vs_trl.json" --md-out "$OUT/bench_vs_trl.md"
    ;;
rest)
    run project_72b "$PY" benchmarks/project_72b.py --json "$OUT/project_72b.json"
    run bench_generate "$PY" benchmarks/bench_generate.py --json "$OUT/bench_generate.json"
    ;;
sweep)
    run sweep "$PY" benchmarks/bench_logprob.py --sweep
    ;;
*)
    echo "unknown part $part"; exit 2
    ;;
esac
cat "$OUT/summary.txt"
