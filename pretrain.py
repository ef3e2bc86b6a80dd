"""Pretrain a ViT encoder without labels: DS-MAE (denoising self-distillation MAE, the paper's
method) or MAE (its baseline).

    python pretrain.py                                     # synthetic shapes, CPU, a few minutes
    python pretrain.py --dataset cifar10 --download        # one GPU, the paper's CIFAR setting
    torchrun --standalone --nproc_per_node=8 pretrain.py --dataset stl10 --download

Writes to --output-dir: ckpt.pt (the latest state; rerunning the command resumes from it),
args.json, log.jsonl (one JSON line per epoch) and recon_XXXX.png (noisy | reconstructed |
original, like the paper's Fig. 2). Defaults depend on --dataset (the table below); --help
shows the ones that apply to the --dataset given with it.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import (DSMAE, MAE, MODELS, TEACHER_TARGETS, Preemption, ViT, autocast, ema_momentum, extract_features,
                    knn_predict, output_dir, param_groups, patchify, read_checkpoint, resolve_device, reuse_freed_memory,
                    save_checkpoint, unpatchify)

# the paper's Table 1 for CIFAR and STL-10 (its batch 2048; 1024 for ViT-B on STL-10). For
# synthetic, a laptop-CPU lab: a small model, a small batch, and a base lr that moves the weights
# within 390 steps (the paper's 1.5e-4 gives lr 7.5e-5 at batch 128)
PAPER = dict(epochs=500, batch_size=2048, blr=1.5e-4, warmup_epochs=20, decoder_dim=256, decoder_depth=4)
DEFAULTS = {
    "synthetic": dict(epochs=10, warmup_epochs=1, batch_size=128, blr=1e-3, decoder_dim=128, decoder_depth=2,
                      knn_every=5),
    "cifar10": {}, "cifar100": {},
    "stl10": dict(split="train+unlabeled"),
    "npz": dict(batch_size=256, epochs=100, warmup_epochs=10),
    "folder": dict(batch_size=256, epochs=100, warmup_epochs=10),
    # chest X-rays, after the notes: 90% of patches masked, crops no smaller than half the image
    "dicom": dict(batch_size=256, epochs=100, warmup_epochs=10, mask_ratio=0.9, crop_scale=0.5),
}


def dataset_defaults(name):
    """The defaults a run on dataset `name` uses: the paper's, the dataset's geometry, its overrides."""
    model, img_size, patch_size = data.GEOMETRY[name]
    return dict(PAPER, model=model, img_size=img_size, patch_size=patch_size, **DEFAULTS[name])


def get_args(argv=None):
    pre = data.finish_parser(argparse.ArgumentParser(add_help=False))
    pre.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    dataset = pre.parse_known_args(argv)[0].dataset
    table = "\n".join(f"  {k:10s} " + ", ".join(f"{a}={v}" for a, v in dataset_defaults(k).items()
                                                 if a not in PAPER or PAPER[a] != v) for k in DEFAULTS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"defaults per --dataset (the rest: {PAPER}):\n{table}")
    # common flags, spelled the same in every script
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data", help="folder holding the dataset (a .npz file for npz)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR / STL-10 if missing (needs the internet)")
    p.add_argument("--output-dir", default=None, help="default: runs/<method>_<dataset>_<model>")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/ckpt.pt if present)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--epochs", type=data.POS_INT)
    p.add_argument("--max-steps", type=data.NONNEG_INT, default=0, help="stop after this many optimiser steps (0: no "
                   "limit); the schedule still spans --epochs, so a stopped run resumes exactly")
    p.add_argument("--batch-size", type=data.POS_INT, help="global batch, split over the DDP ranks")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--img-size", type=data.POS_INT)
    p.add_argument("--patch-size", type=data.POS_INT)
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (None: on for CUDA, off for CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast; auto: bf16 where it is fast (CUDA, CPUs with AMX/AVX512-BF16)")
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4, help="threads decoding a folder dataset")
    p.add_argument("--split", default="train", help="split to pretrain on (STL-10: train+unlabeled)")
    # method
    p.add_argument("--method", default="dsmae", choices=["dsmae", "mae"])
    p.add_argument("--noise-ratio", type=data.Number(float, "(0, 1]"), default=0.9, help="DS-MAE: fraction of patches "
                   "noised (paper: 0.9-0.95)")
    p.add_argument("--noise-std", type=data.NONNEG, default=1.0, help="DS-MAE: noise std, in normalised pixel units")
    p.add_argument("--noise-mode", default="add", choices=["add", "replace"], help="DS-MAE: x + std * eps, or eps "
                   "alone")
    p.add_argument("--lam", type=data.Number(float, "[0, 1]"), default=0.6, help="DS-MAE: L = lam * L_y + (1 - lam) * "
                   "L_z; 1: decoder only, 0: regressor only")
    p.add_argument("--per-token-cos", action="store_true", help="DS-MAE: L_z as a mean of per-token cosines, "
                   "instead of Eq. 2's one cosine per image")
    p.add_argument("--target", default="final", choices=TEACHER_TARGETS, help="DS-MAE: what the regressor predicts "
                   "(models.teacher_target): the teacher's final tokens, centred, LayerNorm'd, or data2vec's average")
    p.add_argument("--target-blocks", type=data.POS_INT, default=1, help="DS-MAE --target avg: how many last teacher "
                   "blocks")
    p.add_argument("--decoder-input", default="encoder", choices=["encoder", "regressor"], help="DS-MAE: the "
                   "decoder reads the student's tokens (SPEC), or the regressor's predicted teacher tokens (CAE)")
    p.add_argument("--mask-ratio", type=data.Number(float, "(0, 1)"), default=0.75, help="MAE: fraction of patches "
                   "masked (0.9 for X-rays)")
    p.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=True, help="pixel targets "
                   "normalised per patch (MAE's norm_pix_loss; the best measured for both methods, see "
                   "docs/dsmae.md); --no-norm-pix: the normalised pixels themselves")
    p.add_argument("--decoder-dim", type=data.Number(int, "[4, inf)", multiple=4))
    p.add_argument("--decoder-depth", type=data.POS_INT)
    p.add_argument("--regressor-depth", type=data.POS_INT, default=2)
    p.add_argument("--ema-start", type=data.Number(float, "[0, 1]"), default=0.96, help="DS-MAE teacher momentum at "
                   "step 0, cosine to --ema-end")
    p.add_argument("--ema-end", type=data.Number(float, "[0, 1]"), default=0.99)
    p.add_argument("--ema-ref-batch", type=data.NONNEG_INT, default=0, help="the batch --ema-start/--ema-end were set "
                   "for: the momentum m becomes m ** (batch / ref), the same lag in images (0: used as given)")
    p.add_argument("--drop-path", type=data.Number(float, "[0, 1)"), default=0.0)
    # optimisation
    p.add_argument("--blr", type=data.POS, help="base lr: lr = blr * batch * accum / 256")
    p.add_argument("--lr", type=data.POS, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=data.NONNEG, default=0.0)
    p.add_argument("--weight-decay", type=data.NONNEG, default=0.05)
    p.add_argument("--warmup-epochs", type=data.NONNEG)
    p.add_argument("--accum-iter", type=data.POS_INT, default=1, help="batches per optimiser step")
    p.add_argument("--clip-grad", type=data.POS, default=None)
    p.add_argument("--aug", action=argparse.BooleanOptionalAction, default=True,
                   help="random resized crop + flip (--no-aug: the plain images)")
    p.add_argument("--crop-scale", type=data.Number(float, "(0, 1]"), default=0.2, help="smallest crop area (0.5 for "
                   "X-rays)")
    # monitoring
    p.add_argument("--knn-every", type=data.NONNEG_INT, default=20, help="epochs between k-NN monitors (0: only at the "
                   "end)")
    p.add_argument("--knn-samples", type=data.POS_INT, default=10000, help="labelled images used by the k-NN monitor, "
                   "per split")
    p.add_argument("--vis-every", type=data.NONNEG_INT, default=20, help="epochs between reconstruction pictures")
    p.add_argument("--log-every", type=data.POS_INT, default=20, help="steps between reading the loss on the host")
    p.add_argument("--save-every", type=data.NONNEG, default=10, help="minutes between checkpoints within an epoch "
                   "(and one at every epoch's end): a killed run loses at most this much")
    data.add_data_args(p)
    p.set_defaults(**dataset_defaults(dataset))              # before parsing, so --help shows them
    data.finish_parser(p)
    args = p.parse_args(argv)
    # what the ranges alone cannot say: flags that must agree with each other
    if args.img_size % args.patch_size:
        p.error(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    n, depth = (args.img_size // args.patch_size) ** 2, MODELS[args.model]["depth"]
    if args.method == "mae" and not 0 < round(args.mask_ratio * n) < n:
        p.error(f"--mask-ratio {args.mask_ratio} masks {round(args.mask_ratio * n)} of the {n} patches: it must leave "
                f"some to encode and some to predict")
    if args.method == "dsmae" and round(args.noise_ratio * n) == 0:
        p.error(f"--noise-ratio {args.noise_ratio} noises none of the {n} patches")
    if args.method == "dsmae" and args.target_blocks > depth:
        p.error(f"--target-blocks {args.target_blocks}: {args.model} has {depth} blocks")
    if args.method == "dsmae" and args.decoder_input == "regressor" and not 0 < args.lam < 1:
        p.error(f"--decoder-input regressor chains the two branches: it needs 0 < --lam < 1, not {args.lam}")
    return args


def cosine_lr(step, total, warmup, base, min_lr=0.0):
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def setup(args):
    """torchrun or a single process: (device, rank, world size, autocast context, its name)."""
    device, rank, world = resolve_device(args.device), 0, 1
    reuse_freed_memory(device)          # on a CPU; else every step faults its activations in again
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    return device, rank, world, *autocast(args.precision, device)


# flags a resumed run may change: where, how fast and how often it reports, not what it learns (a folder has many
# names; what is in it is the user's to keep)
RESUME_FREE = {"output_dir", "resume", "device", "precision", "num_workers", "save_every", "max_steps", "log_every",
               "knn_every", "knn_samples", "vis_every", "compile", "cache_dir", "download", "data_dir", "masks",
               "skip_bad"}


def resume(raw_model, opt, path, explicit, say, args):
    """Load a checkpoint into the model and the optimiser; the step to continue from (0: none yet). One written
    with other settings stops the run (a changed flag, or a default changed since): continuing would mix two."""
    if not os.path.exists(path):
        if explicit:
            raise SystemExit(f"error: --resume {path}: no such file")
        return 0
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}. To start over, delete it or choose another --output-dir")
    try:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {path} was written by another configuration ({str(e).splitlines()[0]}); "
                         f"choose a new --output-dir")
    saved, now = ckpt.get("args", {}), vars(args)
    if diff := {k: (saved[k], now[k]) for k in saved.keys() & now.keys() - RESUME_FREE if saved[k] != now[k]}:
        raise SystemExit(f"error: {path} was trained with other settings ({diff}: saved, now); rerun with the saved "
                         f"ones to resume it, or choose another --output-dir")
    say(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def append_log(out_dir, row):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def build_model(args, in_chans):
    encoder = ViT(img_size=args.img_size, patch_size=args.patch_size, in_chans=in_chans, drop_path=args.drop_path,
                  **MODELS[args.model])
    if args.method == "mae":
        return MAE(encoder, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, mask_ratio=args.mask_ratio,
                   norm_pix=args.norm_pix)
    return DSMAE(encoder, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                 regressor_depth=args.regressor_depth, noise_ratio=args.noise_ratio, noise_std=args.noise_std,
                 noise_mode=args.noise_mode, lam=args.lam, norm_pix=args.norm_pix, per_token_cos=args.per_token_cos,
                 target=args.target, target_blocks=args.target_blocks, decoder_input=args.decoder_input)


def checkpoint_state(raw_model, opt, step, steps_per_epoch, args, train_set):
    """Everything a resume needs, plus what evaluation scripts read: the student encoder, the
    teacher (DS-MAE), the encoder's constructor arguments and the data's normalisation."""
    state = dict(model=raw_model.state_dict(), opt=opt.state_dict(), step=step, epoch=step // steps_per_epoch,
                 args=vars(args), encoder=raw_model.encoder.state_dict(), encoder_config=raw_model.encoder.config(),
                 data=dict(dataset=args.dataset, mean=list(train_set.mean), std=list(train_set.std),
                           classes=list(train_set.classes)))
    if getattr(raw_model, "teacher", None) is not None:
        state["teacher"] = raw_model.teacher.module.state_dict()
    return state


def knn_accuracy(encoder, train, test, img_size, device, amp, n_max, rank=0, world=1):
    """k-NN (k=20, cosine, DINO's weighted votes) top-1 of the class token and of the mean of the
    patch tokens, from evenly spaced subsets of at most n_max labelled images per split. Under DDP
    each rank encodes every world-th image and the features are gathered: call it on every rank."""
    transform = lambda x: data.preprocess(x, img_size, train.mean, train.std)
    feats = []
    for ds in (train, test):
        keep = torch.linspace(0, len(ds) - 1, min(n_max, len(ds))).long()
        z = torch.cat(extract_features(encoder, ds.x[keep[rank::world]], transform, device=device, amp=amp), 1).cpu()
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, z)
            z, keep = torch.cat(parts), torch.cat([keep[r::world] for r in range(world)])
        D = z.shape[1] // 2
        feats.append((z[:, :D], z[:, D:], ds.y[keep]))             # class token, mean of patches, labels
    (tr_cls, tr_avg, tr_y), (te_cls, te_avg, te_y) = feats
    acc = lambda a, b: (knn_predict(a, tr_y, b, len(train.classes)) == te_y).float().mean().item() * 100
    return dict(knn_cls=acc(tr_cls, te_cls), knn_mean=acc(tr_avg, te_avg))


@torch.no_grad()
def save_reconstructions(model, imgs, mean, std, norm_pix, path):
    """Grid of (input | reconstruction | original) triplets, two per row, like the paper's Fig. 2; each image scaled
    up (nearest neighbour, so the patches stay sharp) to 96 px or more and the grid to 600 px or more."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == "cuda" else []):
        torch.manual_seed(0)                        # the same noise every time, comparable across epochs
        _, parts = model(imgs)
    model.train(was_training)
    enc = model.encoder
    p, g = enc.patch_size, enc.grid
    rows = [parts["input"]]
    if "pred" in parts:                            # no decoder (lam = 0): nothing to reconstruct
        target = patchify(imgs, p)
        pred = parts["pred"].float()
        if norm_pix:                               # back to pixels with the true patches' statistics
            t = torch.gather(target, 1, parts["idx"][..., None].expand(-1, -1, target.shape[-1]))
            pred = pred * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
        recon = target.scatter(1, parts["idx"][..., None].expand(-1, -1, target.shape[-1]), pred)
        rows.append(unpatchify(recon, p, g, g))
    rows.append(imgs)
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    cells = torch.stack([(r.float() * s + m).clamp(0, 1) for r in rows], dim=1).flatten(0, 1)
    cells = F.interpolate(cells, scale_factor=math.ceil(max(96, 600 / (2 * len(rows))) / cells.shape[-1]),
                          mode="nearest")
    from torchvision.utils import save_image
    save_image(cells, path, nrow=2 * len(rows), padding=2, pad_value=1.0)


def save_picture(raw_model, args, epoch, vis_set, train_set, device, out_dir):
    """The reconstruction picture of 8 fixed images (the test split's where there is one)."""
    x = data.preprocess(vis_set.x[torch.linspace(0, len(vis_set) - 1, 8).long()].to(device),
                        args.img_size, train_set.mean, train_set.std)
    save_reconstructions(raw_model, x, train_set.mean, train_set.std, args.norm_pix,
                         os.path.join(out_dir, f"recon_{epoch + 1:04d}.png"))


def load_data(args):
    """The split to pretrain on, the labelled train/test pair the k-NN monitor reads (None when
    the dataset has no labels: STL-10's train+unlabeled is monitored on train and test), steps per epoch."""
    try:
        train_set = data.load_split(args, args.split, args.img_size, args.download)
        knn_train = train_set if args.split == "train" else data.load_split(args, "train", args.img_size)
        knn_test = data.load_split(args, "test", args.img_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    steps_per_epoch = len(train_set) // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images are fewer than one step "
                         f"(--batch-size {args.batch_size} x --accum-iter {args.accum_iter})")
    knn_sets = (knn_train, knn_test) if knn_train.y is not None and knn_test.y is not None else None
    return train_set, knn_sets, steps_per_epoch


def read_losses(sums, n, ddp, world, step, ckpt_file, saved_step):
    """The losses averaged since the epoch began, over the ranks too: the loop's only host
    synchronisation, every log_every steps. A non-finite loss stops the run, saying what survives."""
    avg = sums / n
    if ddp:
        dist.all_reduce(avg)
        avg /= world
    loss = avg[0].item()
    if not math.isfinite(loss):
        kept = f"{ckpt_file} (step {saved_step}) is untouched" if saved_step else "no checkpoint was written"
        raise SystemExit(f"error: loss is {loss} at step {step}: stopping; {kept}. Lower --blr, or try "
                         f"--precision fp32 or --clip-grad 1")
    return avg, loss


def finish(ddp):
    """The ranks part (rank 0 may still be writing)."""
    if ddp:
        dist.barrier()                                 # rank 0 may still be writing
        dist.destroy_process_group()


def main(args):
    # ---- setup: devices, DDP (torchrun), precision
    device, rank, world, amp, precision = setup(args)
    ddp, master, cuda = "RANK" in os.environ, rank == 0, device.type == "cuda"
    say = print if master else (lambda *a, **k: None)
    compile_model = cuda if args.compile is None else args.compile
    out_dir = output_dir(args.output_dir or os.path.join("runs", f"{args.method}_{args.dataset}_{args.model}"))

    # ---- data: uint8 images, on the GPU when there is one (augmentation runs there too)
    train_set, knn_sets, steps_per_epoch = load_data(args)
    images = train_set.x.to(device) if cuda else train_set.x
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ---- model (the same initial weights on every rank)
    torch.manual_seed(args.seed)
    raw_model = build_model(args, train_set.x.shape[1]).to(device)
    model = torch.compile(raw_model) if compile_model else raw_model
    if ddp:   # no buffers to sync (no BatchNorm): skip the per-step broadcast
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)

    # ---- optimiser: AdamW, lr scaled by the effective batch (MAE's rule); fused, on a CPU too (+8-19%, bench.py)
    eff_batch = args.batch_size * args.accum_iter
    lr = args.lr or args.blr * eff_batch / 256
    opt = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    say(f"{args.method} {args.model} on {args.dataset}/{args.split} ({len(train_set)} images, "
        f"{args.img_size}px, patch {args.patch_size}) | {n_params / 1e6:.2f}M trained params | {device} x {world} "
        f"| {precision}{' compiled' if compile_model else ''}")
    say(f"effective batch {eff_batch} | lr {lr:.3g} (blr {args.blr:g} x {eff_batch} / 256) | "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps, warm-up {warmup_steps}")

    # ---- resume: everything needed to continue exactly (randomness is seeded per step)
    step = resume(raw_model, opt, args.resume or os.path.join(out_dir, "ckpt.pt"), args.resume, say, args)
    if master:
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    # the k-NN of the untrained encoder: the number pretraining has to beat
    if step == 0 and knn_sets:
        init = knn_accuracy(raw_model.encoder, *knn_sets, args.img_size, device, amp, args.knn_samples, rank, world)
        say(f"k-NN at initialisation: class token {init['knn_cls']:.1f}%, mean of patch tokens {init['knn_mean']:.1f}%")
        if master:
            append_log(out_dir, dict(epoch=0, step=0, **init))

    # ---- loop
    raw_model.train()
    zero, stats = torch.zeros((), device=device), {}
    ckpt_file, saved_step, t_saved = os.path.join(out_dir, "ckpt.pt"), step or None, time.time()
    save = lambda: save_checkpoint(checkpoint_state(raw_model, opt, step, steps_per_epoch, args, train_set), ckpt_file)
    start_epoch, first = divmod(step, steps_per_epoch)
    max_steps = min(args.max_steps or total_steps, total_steps)
    with Preemption() as stop:              # SIGTERM, SIGUSR1, SIGINT: save at this step, exit
        for epoch in range(start_epoch, args.epochs):
            if step >= max_steps:
                break
            batches = data.epoch_batches(len(train_set), args.batch_size, epoch, args.seed, rank, world,
                                         start=first * args.accum_iter if epoch == start_epoch else 0)
            sums = torch.zeros(3, device=device)           # loss, loss_y, loss_z, summed on the device
            n_sum, t_epoch, t_log, steps_log = 0, time.time(), time.time(), 0
            bar = tqdm(total=steps_per_epoch, initial=first if epoch == start_epoch else 0, disable=not master,
                       desc=f"ep {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
            while step < max_steps and step < (epoch + 1) * steps_per_epoch:
                lr_now = cosine_lr(step, total_steps, warmup_steps, lr, args.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr_now
                for micro in range(args.accum_iter):
                    # noise, masks and crops depend only on (seed, step, micro, rank): exact resumes
                    torch.manual_seed(((args.seed * 1_000_003 + step) * 64 + micro) * 4096 + rank)
                    idx = next(batches)
                    x = images[idx.to(images.device)].to(device, non_blocking=True)
                    x = data.augment(x, args.img_size, train_set.mean, train_set.std, scale=(args.crop_scale, 1.0)) \
                        if args.aug else data.preprocess(x, args.img_size, train_set.mean, train_set.std)
                    sync = not ddp or micro == args.accum_iter - 1   # all-reduce gradients once per step
                    with nullcontext() if sync else model.no_sync():
                        with amp:
                            loss, parts = model(x)
                        (loss / args.accum_iter).backward()
                    sums += torch.stack([loss.detach(), parts.get("loss_y", zero), parts.get("loss_z", zero)]).float()
                    n_sum += 1
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if args.method == "dsmae":
                    momentum = ema_momentum(step, total_steps, args.ema_start, args.ema_end, eff_batch,
                                            args.ema_ref_batch)
                    raw_model.update_teacher(momentum)
                step += 1
                steps_log += 1
                bar.update(1)
                if step % args.log_every == 0 or step >= max_steps or step % steps_per_epoch == 0:
                    avg, loss_now = read_losses(sums, n_sum, ddp, world, step, ckpt_file, saved_step)
                    bar.set_postfix_str(f"loss {loss_now:.4f} lr {lr_now:.2e} "
                                        f"{steps_log * eff_batch / (time.time() - t_log):.0f} img/s")
                    t_log, steps_log = time.time(), 0
                if master and step % steps_per_epoch and time.time() - t_saved >= 60 * args.save_every:
                    save()                                     # within the epoch: a kill loses minutes, not hours
                    saved_step, t_saved = step, time.time()
                if stop() and step % steps_per_epoch and step < max_steps:    # every rank asks; an epoch end saves
                    bar.close()
                    if master:
                        save()
                    stop.exit(f"step {step}", ckpt_file)
            bar.close()

            # ---- end of epoch (or of the run): k-NN monitor (every rank encodes a share), picture, log, save
            seconds = time.time() - t_epoch
            stats = dict(epoch=epoch + 1, step=step, loss=avg[0].item(), lr=lr_now,
                         img_per_s=n_sum * args.batch_size / seconds, seconds=round(seconds, 2))
            if args.method == "dsmae":
                stats.update(momentum=momentum, loss_y=avg[1].item() if args.lam > 0 else None,
                             loss_z=avg[2].item() if args.lam < 1 else None)
            final = step >= max_steps
            if knn_sets and (final or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
                stats.update(knn_accuracy(raw_model.encoder, *knn_sets, args.img_size, device, amp, args.knn_samples,
                                          rank, world))
            if master:
                if final or (args.vis_every and (epoch + 1) % args.vis_every == 0):
                    save_picture(raw_model, args, epoch, knn_sets[1] if knn_sets else train_set, train_set, device,
                                 out_dir)
                say(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
                save()                                     # before the log line: a failed save logs nothing
                append_log(out_dir, stats)
                saved_step, t_saved = step, time.time()
            if stop() and step < max_steps:
                stop.exit(f"step {step}", ckpt_file)

    finish(ddp)
    return dict(stats, step=step, out_dir=out_dir)


if __name__ == "__main__":
    main(get_args())
