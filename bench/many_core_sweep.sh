#!/usr/bin/env bash
# The many-core run behind docs/benchmarks.md's thread sweep (issue 17): run from the
# repository root on a machine with 16 cores, where fastbn is built in place. It writes
# few files (a device machine returns at most 8): $OUT/info.txt (lscpu, fastbn info),
# $OUT/log.txt (every command's output), and one results file per part:
#   $OUT/many_core.json           kernels and modules (BatchNorm2d, GroupNorm, LayerNorm
#                                 training on issue 17's grids) and a MobileNetV2 training
#                                 step (112 px, N = 8) at 1, 2, 4, 8 and 16 threads;
#   $OUT/many_core_networks.json  MobileNetV2 at 224 px, N = 2, 8 and 32 (and ResNet-50 at
#                                 N = 8 with NETWORKS_RESNET50=1) on 4, 8 and 16 threads.
# Copy both to docs/benchmarks/ and run `python -m fastbn docs`.
#
#   OUT=/tmp/sweep bash bench/many_core_sweep.sh
set -uo pipefail
OUT=${OUT:-bench-results/many-core}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
{ lscpu; "$PYTHON" setup.py build_ext --inplace > /dev/null 2>&1 || echo "BUILD FAILED"
  "$PYTHON" -m fastbn info; } > "$OUT/info.txt" 2>&1

part() {  # part NAME TIMEOUT ARGS...: one bench run; its results.json becomes $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" -m fastbn bench --no-costs --output "$OUT/$name" "$@" >> "$LOG" 2>&1
    echo "$name exit $?" >> "$LOG"
    mv "$OUT/$name/results.json" "$OUT/$name.json" 2>/dev/null
    rm -rf "${OUT:?}/$name"
}
part many_core 150 --threads 1 2 4 8 16 ${BACKENDS:+--backends $BACKENDS} --repeats ${REPEATS:-12}
networks="mobilenet_v2:training:2 mobilenet_v2:training:8 mobilenet_v2:training:32"
[ "${NETWORKS_RESNET50:-0}" = 1 ] && networks="$networks resnet50:training:8"
part many_core_networks 240 --threads 4 8 16 --no-kernels --no-modules --networks $networks \
    --image-size ${IMAGE_SIZE:-224} --repeats ${REPEATS_NETWORKS:-6}
grep -E "^\| (kernel|module|network) |exit" "$LOG"
