#!/usr/bin/env bash
# What this project measures on a GPU, as one command (about 12 minutes on one H200, half of it compiling):
#   bash tools/bench_gpu.sh [OUT_DIR]                 # default runs/bench_gpu; PARTS="speed" or "learn" for one half
# 1. speed (tools/bench.py): MAE and DS-MAE at the paper's STL-10 (C3: ViT-S/6, 96 px) and CIFAR (C2: ViT-T/2, 32 px)
#    settings in bf16, uncompiled and then with torch.compile, each timed interleaved with timm-based peers where timm
#    is installed: images/s, FLOP/s and MFU against the matmul ceiling measured in the same process, peak memory, and
#    the real data path (uint8 images on the GPU, data.augment there) as a fraction of the rate on a fixed batch.
# 2. learning: MAE and DS-MAE pretrained on CIFAR-10's training set less its last 10% of each class, for the same
#    training time each (LEARN_S seconds, compilation aside: the epochs follow from part 1's rate through the data
#    path; a SIGTERM at the limit is the safety net: the run saves and stops), then k-NN and a linear probe on the 5,000
#    held-out images, beside a random initialisation.
# Each part runs under its own timeout and writes OUT_DIR/<part>.{json,md,log}; OUT_DIR/summary.md gathers them. A part
# that fails leaves the others' numbers (a compiler that breaks: the uncompiled ones, and pretraining without it).
# The CIFAR-10 training set comes from CIFAR_NPZ (x, y, class_names) if present, else from CIFAR_JPEG (a 46 MB JPEG
# copy: jpeg, offsets, y, class_names) decoded into CIFAR_NPZ, else from data.py's download (needs the internet).
# The script's own check on a CPU (about 3 minutes; tests/test_bench.py runs a smaller one):
#  DEVICE=cpu CONFIGS="tiny:8" COMPILE= LEARN_S=15 LEARN_MODEL="--model vit_nano --patch-size 4" bash tools/bench_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."                   # the repository root: relative paths as in the docs
OUT=${1:-runs/bench_gpu}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-"speed learn"}
CONFIGS=${CONFIGS:-"C3:256 C2:512"}        # config:batch; the last one is the learning part's (same model and batch)
COMPILE=${COMPILE---compile}
LIMIT_EAGER=${LIMIT_EAGER:-60}             # seconds per speed configuration, uncompiled
LIMIT=${LIMIT:-180}                        # seconds per speed configuration, compiled: compilation included
LEARN_S=${LEARN_S:-90}                     # seconds of training per method
LEARN_MODEL=${LEARN_MODEL:-"--model vit_tiny --patch-size 2"}
CIFAR_NPZ=${CIFAR_NPZ:-data/cifar10_train.npz}
CIFAR_JPEG=${CIFAR_JPEG:-data/cifar10_train_jpeg.npz}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/device.txt"
cat "$OUT/device.txt"
last=${CONFIGS##* } config=${last%%:*} batch=${last##*:}

if [[ " $PARTS " == *" speed "* ]]; then
    peers=$(python -c "import timm" 2>/dev/null && echo ",timm-mae,timm-dsmae")   # lightly is rarely installed
    for item in $CONFIGS; do
        c=${item%%:*} b=${item##*:}
        # eager first: seconds, and numbers even where the compiler breaks; then compiled, whose first steps compile
        # (measured on an H200: 30-90 s per model with an empty cache, ViT-S's two models over 80 s together)
        for mode in eager ${COMPILE:+compiled}; do
            echo "== speed $c, batch $b, $mode"
            timeout "$([ $mode = eager ] && echo "$LIMIT_EAGER" || echo "$LIMIT")" python tools/bench.py --config "$c" \
                --batch-size "$b" --device "$DEVICE" --precision bf16 --methods "mae,dsmae$peers" --data-path \
                --warmup 3 --steps 5 --rounds 5 --out "$OUT/speed_${c}_$mode.json" \
                $([ $mode = eager ] || echo "$COMPILE") > "$OUT/speed_${c}_$mode.log" 2>&1 \
                && cat "$OUT/speed_${c}_$mode.md" \
                || { tail -3 "$OUT/speed_${c}_$mode.log"; echo "== $c $mode: failed or out of time (log above)"; }
        done
    done
fi

if [[ " $PARTS " == *" learn "* ]]; then
    echo "== learning: CIFAR-10, $LEARN_S s of training per method"
    timeout 120 python - "$CIFAR_NPZ" "$CIFAR_JPEG" <<'EOF' || exit 1
# CIFAR-10's training set as one npz (x, y, class_names); data.py's npz loader holds out the last 10% of each class
import io, os, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
dst, jpeg = sys.argv[1:]
if not os.path.exists(dst):
    if os.path.exists(jpeg):                      # the JPEG copy: quality-95 JPEGs of the training images
        d = np.load(jpeg)
        buf, off = d["jpeg"], d["offsets"]
        decode = lambda i: np.asarray(Image.open(io.BytesIO(buf[off[i]:off[i + 1]].tobytes())).convert("RGB"))
        with ThreadPoolExecutor() as pool:
            x = np.stack(list(pool.map(decode, range(len(off) - 1), chunksize=512)))
        y, names = d["y"], d["class_names"]
    else:
        import data
        s = data.build_dataset("cifar10", "train", download=True)
        x, y, names = s.x.permute(0, 2, 3, 1).numpy(), s.y.numpy(), np.array(s.classes)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    np.savez(dst + ".part.npz", x=x, y=y, class_names=names)
    os.replace(dst + ".part.npz", dst)
print(dst, np.load(dst)["x"].shape)
EOF
    # epochs that fill LEARN_S seconds at the rate part 1 measured through the data path, compiled where that ran
    read -r e_mae e_dsmae compile <<< "$(python - "$OUT" "$config" "$LEARN_S" "$CIFAR_NPZ" <<'EOF'
import json, os, sys
import numpy as np
out, config, seconds, npz = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
n = int(len(np.load(npz)["y"]) * 0.9)                # the training share: data.py holds out 10% of each class
for mode, flag in (("compiled", "--compile"), ("eager", "--no-compile")):
    f = os.path.join(out, f"speed_{config}_{mode}.json")
    if os.path.exists(f):
        rows = json.load(open(f))["rows"]
        rate = [max(r["img_per_s"] for r in rows if r["name"].startswith(m + " ") and r["name"].endswith("+data"))
                for m in ("mae", "dsmae")]
        print(*(max(1, int(seconds * r / n)) for r in rate), flag)
        break
else:
    print(20, 8)                                     # nothing measured: a guess, at pretrain.py's default
EOF
)"
    args="--dataset npz --data-dir $CIFAR_NPZ --img-size 32 $LEARN_MODEL --batch-size $batch --device $DEVICE $compile
          --knn-every 0 --vis-every 0 --log-every 50 --save-every 1000"
    for m in mae dsmae; do
        e=$([ $m = mae ] && echo "$e_mae" || echo "$e_dsmae")
        echo "== pretrain $m: $e epochs ${compile:-}"
        rm -rf "$OUT/$m" "$OUT/probe_$m" "$OUT/probe_random"
        # warm-up: 10% of the epochs, as the npz default (10 of 100); SIGTERM at the limit saves the run where it is
        timeout -s TERM $((LEARN_S + 60)) python pretrain.py $args --method $m --epochs "$e" \
            --warmup-epochs $(( (e + 9) / 10 )) --output-dir "$OUT/$m" > "$OUT/pretrain_$m.log" 2>&1
        echo "exit status $? (124: stopped at the limit, saved)" >> "$OUT/pretrain_$m.log"
        tr '\r' '\n' < "$OUT/pretrain_$m.log" | grep -v '%|' | tail -3      # without the progress bars
    done
    for enc in random mae dsmae; do
        ckpt=$([ $enc = random ] && echo "" || echo "--checkpoint $OUT/$enc/ckpt.pt")
        [ $enc = random ] || [ -f "$OUT/$enc/ckpt.pt" ] || continue
        echo "== k-NN and linear probe: $enc"
        timeout 90 python linprobe.py --dataset npz --data-dir "$CIFAR_NPZ" --img-size 32 $LEARN_MODEL \
            --device "$DEVICE" --no-compile $ckpt --output-dir "$OUT/probe_$enc" > "$OUT/probe_$enc.log" 2>&1
        tr '\r' '\n' < "$OUT/probe_$enc.log" | grep -v '%|' | tail -1
    done
fi

python - "$OUT" <<'EOF'
# summary.md and summary.json: the speed tables as measured, and the learning results side by side
import glob, json, os, sys
out = sys.argv[1]
lines, summary = [open(os.path.join(out, "device.txt")).read().strip(), ""], dict(speed={}, learning={})
for f in sorted(glob.glob(os.path.join(out, "speed_*.json"))):
    summary["speed"][os.path.basename(f)[6:-5]] = json.load(open(f))
    lines += [open(f[:-5] + ".md").read().strip(), ""]
rows = []
for enc in ("random", "mae", "dsmae"):
    res = os.path.join(out, f"probe_{enc}", "results.jsonl")
    if not os.path.exists(res):
        continue
    r = json.loads(open(res).read().splitlines()[-1])
    log = os.path.join(out, enc, "log.jsonl")
    epochs = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    epochs = [e for e in epochs if "seconds" in e]                 # the epochs' lines, not k-NN at initialisation
    r.update(epochs=len(epochs), train_seconds=sum(e["seconds"] for e in epochs),
             img_per_s=epochs[-1]["img_per_s"] if epochs else None)
    summary["learning"][enc] = r
    r["first_epoch_seconds"] = epochs[0]["seconds"] if epochs else 0      # compilation happens there
    rows.append(f"| {enc} | {r['epochs']} | {r['train_seconds']:.0f} | {r['first_epoch_seconds']:.0f} | "
                f"{r['knn_top1']:.2f} | {r['linear_top1']:.2f} |")
if rows:
    lines += ["Held out: the last 10% of each class of the training set (CIFAR-10: 5,000 images)", "",
              "| encoder | epochs | training s | of which epoch 1 (compiles) | k-NN top-1 | linear top-1 |",
              "|---|---|---|---|---|---|"] + rows
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\n".join(lines))
EOF
