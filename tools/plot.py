"""Training curves of one or more runs side by side, from their log.jsonl, as one PNG (Pillow only): a panel per
logged number (loss branches, lr, EMA momentum, k-NN, accuracy, Dice), one line per run.

    python tools/plot.py runs/dsmae_synthetic_vit_micro                    # -> runs/dsmae_synthetic_vit_micro/curves.png
    python tools/plot.py runs/mask75 runs/mask90 --labels 0.75,0.9 --out masks.png --keys loss,knn_cls

Drawn with Pillow, which the project needs anyway: matplotlib would be one more package for every student to
install, for a few line plots.
"""
import argparse
import json
import math
import os

CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def plot_curves(runs, path, keys=None, size=(300, 190)):
    """Training curves as one PNG, drawn with Pillow: a panel per logged number (the loss branches,
    lr, EMA momentum, k-NN, accuracy, Dice ...), epochs on x, one coloured line per run.

    runs: {label: rows of a log.jsonl}; keys: which numbers (default: every one any run logged,
    except bookkeeping). Each panel's y range is its own, printed at its corners."""
    from PIL import Image, ImageDraw
    skip = {"epoch", "step", "seconds", "img_per_s", "per_class"}
    runs = {k: [r for r in v if isinstance(r, dict)] for k, v in runs.items()}
    keys = keys or list(dict.fromkeys(k for rows in runs.values() for r in rows for k, v in r.items()
                                      if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)))
    W, H = size
    cols = min(3, max(len(keys), 1))
    img = Image.new("RGB", (W * cols, H * math.ceil(len(keys) / cols) + 18 * len(runs) + 6), "white")
    draw = ImageDraw.Draw(img)
    for n, key in enumerate(keys):
        x0, y0 = (n % cols) * W, (n // cols) * H
        pts = {lab: [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "epoch" in r
                     and math.isfinite(r[key])] for lab, rows in runs.items()}
        xs = [x for p in pts.values() for x, _ in p] or [0, 1]
        ys = [y for p in pts.values() for _, y in p] or [0, 1]
        (xa, xb), (ya, yb) = (min(xs), max(xs) or 1), (min(ys), max(ys))
        xb, yb = (xb if xb > xa else xa + 1), (yb if yb > ya else ya + abs(ya) * 0.1 + 1e-9)
        left, top, right, bottom = x0 + 46, y0 + 20, x0 + W - 10, y0 + H - 24
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((x0 + 8, y0 + 4), key, fill="black")
        draw.text((x0 + 2, top - 2), f"{yb:.3g}", fill=(90, 90, 90))
        draw.text((x0 + 2, bottom - 10), f"{ya:.3g}", fill=(90, 90, 90))
        draw.text((left, bottom + 4), f"{xa:g}", fill=(90, 90, 90))
        draw.text((right - 40, bottom + 4), f"epoch {xb:g}", fill=(90, 90, 90))
        for c, p in enumerate(pts.values()):
            xy = [(left + (x - xa) / (xb - xa) * (right - left), bottom - (y - ya) / (yb - ya) * (bottom - top))
                  for x, y in sorted(p)]
            colour = CURVE_COLOURS[c % len(CURVE_COLOURS)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for c, label in enumerate(runs):
        y = img.height - 18 * (len(runs) - c) - 2
        draw.rectangle([8, y + 4, 24, y + 10], fill=CURVE_COLOURS[c % len(CURVE_COLOURS)])
        draw.text((30, y), label, fill="black")
    img.save(path)
    return path


def read_log(path):
    """The rows of a log.jsonl (a run folder or the file itself)."""
    path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or log.jsonl files)")
    p.add_argument("--labels", default=None, help="comma-separated, one per run (default: the folder names)")
    p.add_argument("--keys", default=None, help="comma-separated numbers to plot (default: all that were logged)")
    p.add_argument("--out", default=None, help="default: <the single run>/curves.png, else curves.png")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} --labels for {len(args.runs)} runs")
    runs = {}
    for label, run in zip(labels, args.runs):
        try:
            runs[label] = read_log(run)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {run}: no readable log.jsonl ({e})")
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                       else "curves.png")
    print(plot_curves(runs, out, args.keys.split(",") if args.keys else None))


if __name__ == "__main__":
    main()
