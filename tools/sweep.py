"""Does a pretraining setting help? One row per run: pretrain.py at a fixed lab configuration, then
linprobe.py on held-out images (linear probe on the class token and on the mean of the patch
tokens, k-NN), appended to a results table kept in the repository.

    python data.py download cifar10                                    # once: data/cifar-10-batches-py/
    python tools/sweep.py --name dsmae -- --method dsmae               # flags after -- go to pretrain.py
    python tools/sweep.py --name mae -- --method mae
    python tools/sweep.py --name random --epochs 0                     # random initialisation
    python tools/sweep.py --name noise3 --epochs 10 --seed 1 -- --noise-std 3
    python tools/sweep.py --show                                       # the table, as Markdown

The configuration is the CPU lab one (vit_micro, 32 px, patch 4, batch 128, blr 1e-3, decoder 128 wide x 2
blocks) on real images: CIFAR-10's 50,000 training images, probed on its 10,000 test images, or with --data an
npz of images (x (N, H, W, C) uint8, y), whose last 10% of each class data.py holds out as the test split. Either
way the probe and the k-NN are measured on images pretraining never saw. The rows in tools/results/ were measured
on an npz: a JPEG copy of CIFAR-10's training set, 45,000 pretrained on, 5,000 held out. Every row uses the same
command apart from its own flags; rows are not timed fairly if something else runs meanwhile. This script only
runs the stage scripts as programs; it imports neither.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository: the scripts run there
sys.path.insert(0, ROOT)
import data  # noqa: E402

LAB = ["--model", "vit_micro", "--img-size", "32", "--patch-size", "4", "--batch-size", "128",
       "--blr", "1e-3", "--warmup-epochs", "1", "--decoder-dim", "128", "--decoder-depth", "2", "--device", "cpu",
       "--knn-every", "0", "--vis-every", "0"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="row name (the run folder is runs/sweep/<name>_e<epochs>_s<seed>)")
    p.add_argument("--data", default=None, help="an npz of images instead of CIFAR-10 (default: CIFAR-10 in "
                   "--data-dir, `python data.py download cifar10`)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"), help="where CIFAR-10 is")
    p.add_argument("--epochs", type=data.NONNEG_INT, default=3, help="0: no pretraining, the random-initialisation row")
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--keys", default="teacher,student", help="encoders to probe when the checkpoint has a teacher")
    p.add_argument("--results", default=os.path.join(ROOT, "tools", "results", "sweep_cifar10.jsonl"))
    p.add_argument("--show", action="store_true", help="print the results table and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    data.finish_parser(p)
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.show and not args.name:
        p.error("--name is required (or --show)")
    return args, extra


def run(cmd, log):
    """Run a stage script, its output to a log file; stop with the log's tail when it fails."""
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = open(log).read().splitlines()[-5:]
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); the end of {log}:\n" + "\n".join(tail))


def source(args):
    """The dataset flags of both scripts: the npz given, or CIFAR-10 with its own test split."""
    return ["--dataset", "npz", "--data-dir", args.data] if args.data else ["--dataset", "cifar10", "--data-dir",
                                                                            args.data_dir]


def probe(args, out, ckpt, key):
    """Linear top-1 (cls, mean) and k-NN top-1 (cls, mean) of one encoder; features cached in out."""
    res = {}
    os.makedirs(out, exist_ok=True)
    for pool in ("cls", "mean"):
        cmd = ["linprobe.py", *source(args), "--output-dir", out, "--pool", pool,
               "--device", "cpu", "--seed", str(args.seed)]
        cmd += ["--checkpoint", ckpt, "--checkpoint-key", key] if ckpt else \
            ["--model", "vit_micro", "--img-size", "32", "--patch-size", "4"]
        run(cmd, os.path.join(out, f"linprobe_{pool}.log"))
        last = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))][-1]
        res[f"lin_{pool}"], res[f"knn_{pool}"] = round(last["linear_top1"], 2), round(last["knn_top1"], 2)
    return res


def show(path):
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    print("| # | name | pretrain.py flags | ep | seed | s | img/s | L_y | L_z | encoder | linear cls / mean "
          "| k-NN cls / mean |\n" + "| --- " * 12 + "|")
    for i, r in enumerate(rows, 1):
        f = lambda v, d=3: "" if v is None else f"{v:.{d}g}" if isinstance(v, float) else str(v)
        for key, res in r["probes"].items():
            print(f"| {i} | {r['name']} | `{' '.join(r['flags']) or '-'}` | {r['epochs']} | {r['seed']} | "
                  f"{f(r['seconds'], 4)} | {f(r['img_per_s'])} | {f(r['loss_y'])} | {f(r['loss_z'])} | {key} | "
                  f"{res['lin_cls']:.1f} / {res['lin_mean']:.1f} | {res['knn_cls']:.1f} / {res['knn_mean']:.1f} |")


def main(args, extra):
    if args.show:
        return show(args.results)
    if args.data and not os.path.isfile(args.data):
        raise SystemExit(f"error: --data {args.data}: no such file (an npz with x (N, H, W, C) uint8 and y)")
    out = os.path.join(ROOT, "runs", "sweep", f"{args.name}_e{args.epochs}_s{args.seed}")
    os.makedirs(out, exist_ok=True)
    row = dict(name=args.name, flags=extra, epochs=args.epochs, seed=args.seed, seconds=None, img_per_s=None,
               loss_y=None, loss_z=None, data=os.path.basename(args.data) if args.data else "cifar10",
               date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cpus")
    if args.epochs == 0:
        row["probes"] = {"random": probe(args, out, None, None)}
    else:
        cmd = ["pretrain.py", *LAB, *source(args), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--output-dir", out, *extra]
        run(cmd, os.path.join(out, "pretrain.log"))
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        epochs = [e for e in log if e.get("epoch", 0) > 0]
        seconds = sum(e["seconds"] for e in epochs)
        row.update(seconds=round(seconds, 1), img_per_s=round(sum(e["img_per_s"] * e["seconds"] for e in epochs)
                                                             / seconds, 1),
                   loss_y=epochs[-1].get("loss_y", epochs[-1]["loss"]), loss_z=epochs[-1].get("loss_z"))
        ckpt = os.path.join(out, "ckpt.pt")
        has_teacher = epochs[-1].get("loss_z") is not None
        keys = [k for k in args.keys.split(",") if has_teacher or k == "student"]
        row["probes"] = {k: probe(args, os.path.join(out, k), ckpt, k) for k in keys}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main(*get_args())
