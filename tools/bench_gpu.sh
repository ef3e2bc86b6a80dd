#!/usr/bin/env bash
# The GPU half of the speed measurements, as one script (about 5 minutes on one H100):
#   bash tools/bench_gpu.sh [OUT_DIR]                 # default runs/bench_gpu
# For each configuration, MAE and DS-MAE training steps in bf16 with torch.compile, timed interleaved:
# images/s, achieved FLOP/s and MFU against the bf16 torch.mm ceiling measured in the same process, peak
# memory, and the real data path (uint8 images on the GPU, data.augment there) as a fraction of the rate
# on a fixed batch. A configuration whose compiled run fails or hangs is rerun uncompiled, so a broken
# compiler still leaves numbers. Writes OUT_DIR/gpu_<config>.{json,md,log} and gpu.txt (the device).
# DEVICE=cpu CONFIGS="tiny:8" COMPILE= bash tools/bench_gpu.sh   checks the script itself on a CPU in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."                   # the repository root: relative paths as in the docs
OUT=${1:-runs/bench_gpu}
DEVICE=${DEVICE:-cuda}
CONFIGS=${CONFIGS:-"C3:256 C2:512"}        # the paper's STL-10 (ViT-S/6, 96 px) and CIFAR (ViT-T/2, 32 px) settings
COMPILE=${COMPILE---compile}
LIMIT=${LIMIT:-210}                        # seconds per configuration, compilation included
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
for item in $CONFIGS; do
    config=${item%%:*} batch=${item##*:}
    run() {
        timeout "$1" python tools/bench.py --config "$config" --batch-size "$batch" --device "$DEVICE" --precision bf16 \
            --data-path --warmup 3 --steps 5 --rounds 5 --log-every 20 --out "$OUT/gpu_$config.json" "${@:2}"
    }
    echo "== $config, batch $batch ${COMPILE:+(compiled)}"
    if ! run "$LIMIT" $COMPILE > "$OUT/gpu_$config.log" 2>&1; then
        tail -5 "$OUT/gpu_$config.log"
        echo "== $config: the compiled run failed or ran out of time; again without torch.compile"
        run $((LIMIT / 2)) >> "$OUT/gpu_$config.log" 2>&1 || tail -5 "$OUT/gpu_$config.log"
    fi
    cat "$OUT/gpu_$config.md" 2>/dev/null
done
