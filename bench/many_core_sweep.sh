#!/usr/bin/env bash
# The many-core run behind docs/benchmarks.md's thread sweep (issue 17): run from the
# repository root on a machine with 16 cores, where fastbn is built in place; everything
# goes to $OUT (default bench-results/many-core). About 6 minutes on 16 Xeon cores.
#
#   OUT=/tmp/sweep bash bench/many_core_sweep.sh
#
# Then copy $OUT/sweep/results.json to docs/benchmarks/many_core.json and
# $OUT/networks/results.json to docs/benchmarks/many_core_networks.json, and run
# `python -m fastbn docs`.
set -uo pipefail
OUT=${OUT:-bench-results/many-core}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
lscpu > "$OUT/lscpu.txt" 2>&1
"$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
"$PYTHON" -m fastbn info > "$OUT/info.txt" 2>&1
"$PYTHON" -c "import importlib.util as u; print('missing:', [m for m in ('tqdm', 'matplotlib', 'threadpoolctl', 'numba', 'torchvision') if u.find_spec(m) is None])" >> "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

# 1. Kernels and modules (BatchNorm2d, GroupNorm, LayerNorm training on issue 17's grids)
#    and a MobileNetV2 training step (112 px, N = 8) at every thread count.
timeout 240 "$PYTHON" -m fastbn bench --threads 1 2 4 8 16 ${BACKENDS:+--backends $BACKENDS} \
    --repeats 12 --output "$OUT/sweep" > "$OUT/sweep.txt" 2>&1
echo "sweep exit $?"; tail -40 "$OUT/sweep.txt"

# 2. The networks at torchvision's 224 px: MobileNetV2 at N = 2, 8, 32 and ResNet-50 at N = 8
#    on 4, 8 and 16 threads; then MobileNetV2 at N = 2 and 8 on 1 and 2 threads.
timeout 200 "$PYTHON" -m fastbn bench --threads 4 8 16 --no-kernels --no-modules \
    --networks mobilenet_v2:training:2 mobilenet_v2:training:8 mobilenet_v2:training:32 \
    resnet50:training:8 --image-size 224 --repeats 8 --output "$OUT/networks" \
    > "$OUT/networks.txt" 2>&1
echo "networks exit $?"; tail -25 "$OUT/networks.txt"
timeout 120 "$PYTHON" -m fastbn bench --threads 1 2 --no-kernels --no-modules \
    --networks mobilenet_v2:training:2 mobilenet_v2:training:8 --image-size 224 --repeats 6 \
    --output "$OUT/networks_few_threads" > "$OUT/networks_few_threads.txt" 2>&1
echo "networks (1, 2 threads) exit $?"; tail -12 "$OUT/networks_few_threads.txt"
