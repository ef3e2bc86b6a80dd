"""Linear probe and k-NN of a frozen encoder, MAE's protocol: a BatchNorm without affine
parameters and one linear layer, on the class token, the mean of the patch tokens, or both.

    python linprobe.py --checkpoint runs/dsmae_synthetic_vit_micro/ckpt.pt   # after `python pretrain.py`
    python linprobe.py --dataset synthetic --model vit_micro                 # random init: the baseline
    python linprobe.py --dataset cifar10 --checkpoint runs/dsmae_cifar10_vit_tiny/ckpt.pt --pool both

By default the features are extracted once, without augmentation, cached in --output-dir (keyed
by checkpoint, encoder and dataset), and the probe trains on the cached tensors: seconds on a
GPU, minutes on a CPU. --augment re-encodes random crops and flips every epoch instead. The
k-NN (cosine, k=20, DINO's weighted votes) uses the same un-augmented features. One process:
the encoder only runs forward, once, so there is nothing for DDP to share.
"""
import argparse
import hashlib
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from models import (MODELS, Preemption, autocast, extract_features, knn_predict, load_encoder, output_dir,
                    per_class_accuracy,
                    read_checkpoint, resolve_device, reuse_freed_memory, save_checkpoint)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--output-dir", default=None, help="default: runs/linprobe_<dataset>_<checkpoint folder>")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=data.POS_INT, default=90, help="MAE: 90 (ImageNet); plenty on cached features")
    p.add_argument("--batch-size", type=data.Number(int, "[2, inf)"), default=1024, help="the probe's BatchNorm "
                   "needs two")
    p.add_argument("--model", default=None, choices=MODELS, help="default: the checkpoint's, else per dataset")
    p.add_argument("--img-size", type=data.POS_INT, default=None, help="default: the checkpoint's")
    p.add_argument("--patch-size", type=data.POS_INT, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--max-train", type=data.NONNEG_INT, default=0, help="a label budget: only this many training "
                   "images, evenly spaced (about as many of each class); 0: all")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the encoder (pays only with --augment)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4)
    p.add_argument("--checkpoint", default=None, help="pretrain.py checkpoint; none: random initialisation")
    p.add_argument("--checkpoint-key", default="auto", choices=["auto", "teacher", "student"],
                   help="teacher: the EMA encoder (DS-MAE), student; auto: the teacher where there is one, else "
                   "the student (MAE checkpoints have only the student)")
    p.add_argument("--pool", default="cls", choices=["cls", "mean", "both"], help="class token, mean of the "
                   "patch tokens, or both concatenated")
    p.add_argument("--blr", type=data.POS, default=0.1, help="lr = blr * batch / 256 (MAE: 0.1 with LARS)")
    p.add_argument("--weight-decay", type=data.NONNEG, default=0.0, help="MAE's probe uses none")
    p.add_argument("--warmup-epochs", type=data.NONNEG, default=10)
    p.add_argument("--augment", action="store_true", help="re-encode random crops + flips every epoch")
    p.add_argument("--save-every", type=data.NONNEG, default=10, help="--augment: minutes between checkpoints (and one "
                   "whenever the run is signalled to stop)")
    p.add_argument("--knn-k", type=data.POS_INT, default=20)
    p.add_argument("--knn-t", type=data.POS, default=0.07)
    data.add_data_args(p)
    data.finish_parser(p)
    return p.parse_args(argv)


def cosine_lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def pooled(cls, avg, pool):
    return cls if pool == "cls" else avg if pool == "mean" else torch.cat([cls, avg], dim=1)


def cache_key(args, encoder, train):
    """Changes whenever the features could: checkpoint file (path, size, mtime), key, encoder
    geometry, dataset, data folder, its options (X-ray labels, classes, variant...) and normalisation."""
    parts = [args.dataset, os.path.abspath(args.data_dir), args.checkpoint_key, encoder.config(), train.mean, train.std,
             sorted(data.data_options(args).items()), len(train)]
    if args.checkpoint:
        st = os.stat(args.checkpoint)
        parts += [os.path.abspath(args.checkpoint), st.st_size, st.st_mtime_ns]
    else:
        parts += ["scratch", args.seed]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def main(args):
    # ---- setup
    device = resolve_device(args.device)
    reuse_freed_memory(device)          # on a CPU; else every step faults its activations in again
    amp = autocast(args.precision, device)[0]
    torch.manual_seed(args.seed)

    # ---- frozen encoder: geometry from the checkpoint, else per dataset (the random-init baseline)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    model, img_size, patch_size = data.GEOMETRY[args.dataset]
    if args.checkpoint:
        model = img_size = patch_size = None
    try:
        encoder = load_encoder(args.checkpoint, args.checkpoint_key, model=args.model or model,
                               img_size=args.img_size or img_size, patch_size=args.patch_size or patch_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    encoder.requires_grad_(False).eval().to(device)
    features = torch.compile(encoder.forward_features) if args.compile else encoder.forward_features

    # ---- data: labelled train and test splits, at the encoder's image size
    try:
        train = data.load_split(args, "train", encoder.img_size, args.download)
        test = data.load_split(args, "test", encoder.img_size)
        train = train.first(args.max_train)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if train.y is None or test.y is None or len(test) == 0:
        raise SystemExit(f"error: {args.dataset} has no labels (or no test images) here; a probe needs a labelled "
                         f"train and test split")
    if len(train) < 2:
        raise SystemExit(f"error: {len(train)} training image: the probe's BatchNorm needs 2 or more (--max-train)")
    if train.x.shape[1] != encoder.in_chans:
        raise SystemExit(f"error: the encoder takes {encoder.in_chans} channels, {args.dataset} has {train.x.shape[1]}")
    num_classes = len(train.classes)
    tag = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) if args.checkpoint \
        else f"scratch_{args.model or model}"
    out_dir = output_dir(args.output_dir or os.path.join("runs", f"linprobe_{args.dataset}_{tag}"))
    transform = lambda x: data.preprocess(x, encoder.img_size, train.mean, train.std)

    # ---- features: from the cache, or extracted once and cached (atomically)
    t0 = time.time()
    cache = os.path.join(out_dir, f"features_{cache_key(args, encoder, train)}.pt")
    if os.path.exists(cache):
        feats = torch.load(cache, map_location=device, weights_only=True)
        print(f"features from {cache}")
    else:
        feats = {}
        for split, ds in (("train", train), ("test", test)):
            feats[split] = extract_features(encoder, ds.x, transform, device=device, amp=amp)
        torch.save(feats, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        print(f"features extracted in {time.time() - t0:.1f}s, cached in {cache}")
    x_train, x_test = pooled(*feats["train"], args.pool), pooled(*feats["test"], args.pool)
    y_train, y_test = train.y.to(device), test.y.to(device)

    # ---- probe: BatchNorm without affine parameters (MAE) + linear, SGD, warm-up + cosine
    probe = nn.Sequential(nn.BatchNorm1d(x_train.shape[1], affine=False, eps=1e-6),
                          nn.Linear(x_train.shape[1], num_classes)).to(device)
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    lr = args.blr * args.batch_size / 256
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    n = len(train)
    steps_per_epoch = max(n // args.batch_size, 1)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    print(f"probe on {args.pool} features ({x_train.shape[1]} dims) of {tag} | {n} train, {len(test)} test | "
          f"lr {lr:.3g} | {args.epochs} epochs{' | augmented' if args.augment else ''}")

    # ---- resume: a checkpoint of this very probe (features, pool, schedule, seed) where an earlier run stopped
    settings = [cache_key(args, encoder, train), args.pool, args.epochs, args.batch_size, args.blr, args.weight_decay,
                args.warmup_epochs, args.augment, args.seed]
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]
    ckpt_file, step = os.path.join(out_dir, f"probe_{key}.running.pt"), 0
    if os.path.exists(ckpt_file):
        try:
            ckpt = read_checkpoint(ckpt_file)
            probe.load_state_dict(ckpt["probe"])
            opt.load_state_dict(ckpt["opt"])
        except (ValueError, RuntimeError, KeyError) as e:
            raise SystemExit(f"error: cannot resume from {ckpt_file} ({str(e).splitlines()[0]}); delete it to start "
                             f"over")
        step = ckpt["step"]
        print(f"resumed from {ckpt_file} at step {step}")
    save = lambda: save_checkpoint(dict(probe=probe.state_dict(), opt=opt.state_dict(), step=step), ckpt_file)

    # ---- loop (random crops with --augment depend on (seed, step) alone: exact resumes)
    t_train, t_saved = time.time(), time.time()
    with Preemption() as stop:              # SIGTERM, SIGUSR1, SIGINT: save at this step, exit
        for epoch in tqdm(range(step // steps_per_epoch, args.epochs), desc="probe", dynamic_ncols=True, leave=False):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            for i in range(step % steps_per_epoch, steps_per_epoch):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                if args.augment:                 # a new random view of each image, through the frozen encoder
                    torch.manual_seed(args.seed * 1_000_003 + step)
                    x = data.augment(train.x[idx].to(device), encoder.img_size, train.mean, train.std)
                    with torch.no_grad(), amp:
                        z = features(x)
                    feat = pooled(z[:, 0].float(), z[:, 1:].float().mean(dim=1), args.pool)
                else:
                    feat = x_train[idx.to(device)]
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, total, warmup, lr)
                loss = F.cross_entropy(probe(feat), y_train[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if stop() and step < total:
                    save()
                    stop.exit(f"step {step}", ckpt_file)
                if args.augment and time.time() - t_saved >= 60 * args.save_every:   # a kill loses minutes
                    save()
                    t_saved = time.time()
    t_train = time.time() - t_train

    # ---- evaluate: linear probe and k-NN on the un-augmented test features
    probe.eval()
    with torch.no_grad():
        pred = probe(x_test).argmax(dim=1)
    knn = knn_predict(x_train, y_train, x_test, num_classes, k=args.knn_k, T=args.knn_t)
    res = dict(checkpoint=args.checkpoint, key=args.checkpoint_key if args.checkpoint else None, pool=args.pool,
               dataset=args.dataset, linear_top1=(pred == y_test).float().mean().item() * 100,
               knn_top1=(knn == y_test).float().mean().item() * 100,
               mean_per_class=per_class_accuracy(pred, y_test, num_classes).mean().item() * 100,
               per_class=[round(v * 100, 2) for v in per_class_accuracy(pred, y_test, num_classes).tolist()],
               epochs=args.epochs, augment=args.augment, train_images=len(train), probe_seconds=round(t_train, 2))
    print(f"| encoder | pool | linear top-1 | k-NN top-1 | mean per-class | probe time |\n"
          f"| --- | --- | --- | --- | --- | --- |\n"
          f"| {tag} | {args.pool} | {res['linear_top1']:.2f} | {res['knn_top1']:.2f} | "
          f"{res['mean_per_class']:.2f} | {t_train:.1f}s |")
    save_checkpoint(dict(probe=probe.state_dict(), args=vars(args), results=res), os.path.join(out_dir, "probe.pt"))
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    if os.path.exists(ckpt_file):                 # finished: the next run of the same command starts afresh
        os.remove(ckpt_file)
    return res


if __name__ == "__main__":
    main(get_args())
