#!/usr/bin/env bash
# Everything a lent GPU is used for, in one call (device time is short and each start costs minutes):
#   1. the CUDA tests (tests/test_cuda.py: graphs, forms, parity with the CPU engine) and FDFE's;
#   2. the engines benchmark on CUDA: naive baseline, torch bf16/fp16 at batch 1 and 8 with CUDA
#      graphs, each scale alone (fp32 is left out: see step 2 below); it runs first;
#   3. fp16 accuracy on real data: a model trained on CUDA with the demo's settings on the shipped
#      sample, evaluated on the whole magnetic_tile test set in fp32 and fp16 (CUDA).
# Usage, from the repository root on the GPU machine:  bash benchmarks/gpu_checks.sh
# Needs: PyTorch with CUDA; the Python packages the GPU image lacks as wheels in .whl/ (pydantic,
# pydantic-core, pydantic-settings, python-dotenv, annotated-types, typing-inspection, redis: imported
# by the CLI group; the device tool's notes say how to fetch them), and for step 3 the magnetic_tile
# test set resized to 96 px: `python benchmarks/resized_test_set.py ../shared/datasets/magnetic_tile
# .devdata/magnetic_tile --size 96` here, then carry .whl and .devdata.
# Results: benchmarks/results/*cuda*; logs and a tar of the results under $OUT (default /tmp/gpu-checks).
# On an H200 the whole script took 6.6 minutes and step 2 was cut by its limit after the bf16 rows
# (benchmarks/README.md: Engines, On a GPU); the benchmark's JSON is rewritten after every configuration.
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

# ustudents importable without pip: its package layout (pyproject's package-dir) as links.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/ustudents
ln -s "$REPO"/ustudents/* /tmp/pkg/ustudents/
for room in engines train worker; do ln -s "$REPO/$room" "/tmp/pkg/ustudents/$room"; done
export PYTHONPATH=/tmp/pkg:/tmp/site
# From /tmp: a Python started in the repository root would import its ustudents/ folder, which lacks
# the rooms, instead of the package above.
ustudents() { (cd /tmp && python3 -c "from ustudents.cli import main; main()" "$@"); }
# after each step, so that a call cut short by its time limit still returns what was measured
STAMP=$(date -u +%Y%m%d_%H%M)  # result names of this run: a benchmark never replaces a committed result
keep() { tar -cf "$OUT/results.tar" benchmarks/results/*cuda* 2>/dev/null; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

echo "== 2. engines benchmark"
# fp32 is left out: with cuDNN's algorithm search over every form its first batch took 75 s at
# batch 1 and batch 8 did not finish in 3 minutes (engines_cuda_h200_first_try.log).
(cd benchmarks && timeout 250 python3 engines.py --device cuda --backends torch --batches 1,8 \
    --precisions bf16,fp16 --repeats 200 --seconds 3 --name engines_cuda_$STAMP) > "$OUT/engines.log" 2>&1
echo "engines exit $?"; keep

echo "== 1. CUDA tests"
(cd /tmp && timeout 80 python3 -m pytest -q -o addopts=-ra -p no:cacheprovider "$REPO/tests/test_cuda.py" "$REPO/tests/test_fdfe.py") \
    > "$OUT/pytest_cuda.log" 2>&1
echo "pytest exit $?"; tail -6 "$OUT/pytest_cuda.log"

echo "== 3. fp16 accuracy on magnetic_tile"
if [ -d .devdata/magnetic_tile ]; then
    timeout 60 bash -c "$(declare -f ustudents); ustudents train magnetic_tile --data-root $REPO/ustudents/demo_data \
        --out /tmp/demo_model --image-size 96 --scales 17 --students 3 --epochs 20 --crop 16 --batch 4 --lr 1e-4 \
        --max-minutes 0 --device cuda --amp off --no-evaluate" > "$OUT/train_cuda.log" 2>&1
    echo "train exit $?"; tail -3 "$OUT/train_cuda.log"
    (cd benchmarks && timeout 60 python3 precision_accuracy.py --precision fp16 --device cuda --model /tmp/demo_model \
        --data-root ../.devdata --image-size 96 --name fp16_accuracy_cuda_demo_model_magnetic_tile_$STAMP) \
        > "$OUT/fp16_accuracy.log" 2>&1
    echo "fp16 accuracy exit $?"
fi

keep
echo "== tables"
tail -20 "$OUT/engines.log"
tail -6 "$OUT/fp16_accuracy.log" 2>/dev/null
