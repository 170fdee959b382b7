#!/usr/bin/env bash
# Download the wheels that the GPU machine's image lacks, into .whl/: trl / datasets for the TRL comparison
# (bench_vs_trl.py) and liger-kernel for the LM-head benchmark's Liger row (the GPU machine has no network; the
# wheels travel with the working tree as a carried, git-ignored folder). benchmarks/gpu_check.py installs them
# there itself, into /tmp, in the stages that use them.
#
#   bash benchmarks/fetch_wheels.sh                 # trl, datasets, liger-kernel + the missing deps (~2 MiB)
#   WITH_PYARROW=1 bash benchmarks/fetch_wheels.sh  # also pyarrow (~45 MiB), only if the image's is < 24
#
# The image already has accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, psutil, jinja2, tqdm,
# requests, torch and triton (the device tool's KINDS.md, "Python packages already there"), so only these come:
#   trl 1.16.0       needs accelerate, datasets, huggingface_hub, jinja2, numpy, packaging, pandas, psutil,
#                    pyarrow, pyyaml, transformers
#   datasets 5.2.0   needs dill<0.4.2, multiprocess<0.70.20, pyarrow>=24, xxhash, fsspec<=2026.9.0, ...
#   dill 0.4.1, multiprocess 0.70.19 (pure Python; the versions datasets 5.2.0 accepts)
#   liger-kernel 0.8.5 (pure Python + Triton; for the trl_liger variant)
# All are pure-Python wheels, so the platform flags below only matter for pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)
if [[ "${WITH_PYARROW:-0}" == "1" ]]; then
    PACKAGES+=(pyarrow==26.0.1)
fi

# .whl/ must never be committed (git-ignored through the local exclude file, as the device tool's README says).
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

PYTHON=python3
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
mkdir -p .whl
# One version of each package only: two wheels of one name stop the whole install there.
for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    rm -f .whl/"${name//-/_}"-*.whl .whl/"${name}"-*.whl
done

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"

echo "wheels in .whl/:"
ls -1 .whl
du -ch .whl/*.whl | tail -1
cat <<'EOF'

On the GPU machine (device tool `run`, carry [".whl"]), the GPU check installs them itself:
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --commit <hash>
A benchmark on its own: start the command with
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
e.g. the whole comparison:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -c "import pyarrow, fsspec; print('pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__)"; PYTHONUNBUFFERED=1 python3 benchmarks/bench_vs_trl.py --json-out $OUT/bench_vs_trl.json --md-out $OUT/bench_vs_trl.md 2>&1 | tee $OUT/bench_vs_trl.log
EOF
