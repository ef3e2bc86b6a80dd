"""Training curves of one or more runs side by side, from their log.jsonl, as one PNG (Pillow only):
a panel per logged number (loss branches, lr, EMA momentum, k-NN, accuracy, Dice), one line per run.

    python plot.py runs/dsmae_synthetic_vit_micro                          # -> its curves.png
    python plot.py runs/mask75 runs/mask90 --labels 0.75,0.9 --out masks.png --keys loss,knn_cls
pretrain.py, finetune.py and segment.py draw their own run's curves.png at the end of a run.
"""
import argparse
import os

from models import plot_curves, read_log


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
