"""Fine-tune a pretrained encoder with labels (or train it from scratch: the baseline), with
MAE's recipe: AdamW, layer-wise lr decay, drop path, RandAugment, mixup/cutmix, label smoothing.

    python finetune.py --checkpoint runs/dsmae_synthetic_vit_micro/ckpt.pt   # after `python pretrain.py`
    python finetune.py --dataset cifar10 --checkpoint runs/dsmae_cifar10_vit_tiny/ckpt.pt
    python finetune.py --dataset cifar10 --model vit_tiny                    # scratch baseline
    torchrun --standalone --nproc_per_node=8 finetune.py --dataset stl10 --checkpoint ...

Writes to --output-dir: ckpt.pt (latest; rerunning resumes from it), best.pt (the best epoch by
top-1 on the validation split where the dataset has one, dicom; else on test, as MAE reports), args.json
and log.jsonl (loss, lr, top-1, mean per-class and per-class accuracy per epoch).
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import (MODELS, Preemption, autocast, evaluate, load_encoder, output_dir, param_groups, read_checkpoint,
                    resolve_device, reuse_freed_memory, save_checkpoint)

# MAE's fine-tuning recipe (its ViT-B ImageNet values), with fewer epochs for CIFAR/STL; for
# synthetic, a laptop-CPU lab without the heavy regularisers (they slow a 15-epoch run down)
DEFAULTS = {
    "synthetic": dict(epochs=15, batch_size=128, warmup_epochs=1, mixup=0.0, cutmix=0.0, randaug_n=0, smoothing=0.0,
                      drop_path=0.0),
    "dicom": dict(crop_scale=0.5),                                      # X-rays: no tiny crops (the notes)
}


def get_args(argv=None):
    pre = data.finish_parser(argparse.ArgumentParser(add_help=False))
    pre.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    dataset = pre.parse_known_args(argv)[0].dataset
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="defaults per --dataset: " + "; ".join(f"{k}: {v}" for k, v in DEFAULTS.items())
                                + "; without a checkpoint the model, image and patch size of data.GEOMETRY")
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--output-dir", default=None, help="default: runs/finetune_<dataset>_<checkpoint folder>")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/ckpt.pt if present)")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=data.POS_INT, default=100, help="MAE: 100 for ViT-B on ImageNet; 100 here")
    p.add_argument("--max-steps", type=data.NONNEG_INT, default=0, help="stop after this many optimiser steps (0: no "
                   "limit)")
    p.add_argument("--batch-size", type=data.POS_INT, default=512, help="global batch, split over the DDP ranks")
    p.add_argument("--model", default=None, choices=MODELS, help="default: the checkpoint's, else per dataset")
    p.add_argument("--img-size", type=data.POS_INT, default=None, help="default: the checkpoint's")
    p.add_argument("--patch-size", type=data.POS_INT, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--max-train", type=data.NONNEG_INT, default=0, help="a label budget: only this many training "
                   "images, evenly spaced (about as many of each class); 0: all")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4)
    p.add_argument("--checkpoint", default=None, help="pretrain.py checkpoint; none: train from scratch")
    p.add_argument("--checkpoint-key", default="auto", choices=["auto", "teacher", "student"],
                   help="teacher: the EMA encoder (DS-MAE), student; auto: the teacher where there is one, else "
                   "the student (MAE checkpoints have only the student)")
    p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="head on the class token or on the "
                   "mean of the patch tokens")
    p.add_argument("--blr", type=data.POS, default=1e-3, help="lr = blr * batch / 256 (MAE: 5e-4 for ViT-B, "
                   "1e-3 for smaller)")
    p.add_argument("--layer-decay", type=data.Number(float, "(0, 1]"), default=0.75, help="lr of block i is scaled by "
                   "decay^(depth + 1 - i): 0.75 for ViT-T/S, 0.65 for ViT-B (MAE)")
    p.add_argument("--weight-decay", type=data.NONNEG, default=0.05)
    p.add_argument("--drop-path", type=data.Number(float, "[0, 1)"), default=0.1, help="stochastic depth: 0.1 for "
                   "ViT-T/S/B (MAE)")
    p.add_argument("--warmup-epochs", type=data.NONNEG, default=5)
    p.add_argument("--clip-grad", type=data.POS, default=None, help="clip the gradient norm (MAE: none)")
    p.add_argument("--smoothing", type=data.Number(float, "[0, 1)"), default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=data.NONNEG, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=data.NONNEG, default=1.0, help="cutmix alpha (0: off); with both, one per batch")
    p.add_argument("--randaug-n", type=data.NONNEG_INT, default=2, help="RandAugment: ops per image (0: off)")
    p.add_argument("--randaug-m", type=data.Number(int, "[0, 30]"), default=9, help="RandAugment: magnitude")
    p.add_argument("--crop-scale", type=data.Number(float, "(0, 1]"), default=0.08, help="smallest random resized crop "
                   "(0.5 for X-rays)")
    p.add_argument("--save-every", type=data.NONNEG, default=10, help="minutes between checkpoints within an epoch "
                   "(and one at every epoch's end): a killed run loses at most this much")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips; --no-hflip where left and right differ (a task about sides)")
    data.add_data_args(p)
    p.set_defaults(**DEFAULTS.get(dataset, {}))              # before parsing, so --help shows them
    data.finish_parser(p)
    return p.parse_args(argv)


def cosine_lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


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


# flags a resumed run may change: where and how fast it runs, not what it learns (a folder or a checkpoint has many
# names; what is in it is the user's to keep, and the encoder's weights are in ckpt.pt by now)
RESUME_FREE = {"output_dir", "resume", "device", "precision", "num_workers", "save_every", "max_steps", "compile",
               "cache_dir", "download", "data_dir", "masks", "skip_bad", "checkpoint"}


def resume(raw_model, opt, path, explicit, args):
    """Load a checkpoint into the model and the optimiser: (step, best so far), (0, none) without one. One written
    with other settings stops the run (a changed flag, or a default changed since): continuing would mix two."""
    if not os.path.exists(path):
        if explicit:
            raise SystemExit(f"error: --resume {path}: no such file")
        return 0, dict(top1=-1.0)
    try:
        ckpt = read_checkpoint(path)
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"error: cannot resume from {path} ({str(e).splitlines()[0]}); delete it to start over, or "
                         f"choose another --output-dir")
    saved, now = ckpt.get("args", {}), vars(args)
    if diff := {k: (saved[k], now[k]) for k in saved.keys() & now.keys() - RESUME_FREE if saved[k] != now[k]}:
        raise SystemExit(f"error: {path} was trained with other settings ({diff}: saved, now); rerun with the saved "
                         f"ones to resume it, or choose another --output-dir")
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["best"]


def build_encoder(args, model_name, img_size, patch_size, in_chans=None):
    """The encoder to fine-tune: pretrained (--checkpoint) or fresh, seeded so every rank starts alike."""
    torch.manual_seed(args.seed)
    try:
        return load_encoder(args.checkpoint, args.checkpoint_key, model=args.model or model_name,
                            img_size=args.img_size or img_size, patch_size=args.patch_size or patch_size,
                            in_chans=in_chans, drop_path=args.drop_path,
                            global_pool="token" if args.pool == "cls" else "avg")
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def load_data(args, img_size):
    """Labelled train and test splits (and val where the dataset has one: best.pt is chosen on it,
    so test stays unseen)."""
    try:
        train = data.load_split(args, "train", img_size, args.download)
        test = data.load_split(args, "test", img_size)
        val = data.load_split(args, "val", img_size) if args.dataset == "dicom" else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if train.y is None or test.y is None or len(test) == 0:
        raise SystemExit(f"error: {args.dataset} has no labels (or no test images) here; fine-tuning needs a labelled "
                         f"train and test split")
    return train.first(args.max_train), test, val if val is not None and len(val) else None


def make_augment(args, num_classes, img_size, mean, std):
    """On the device: RandAugment per image, random resized crop + flip, then mixup or cutmix per
    batch and label smoothing. (uint8 images, labels) -> (normalised images, soft targets)."""
    from torchvision.transforms import v2
    randaug = v2.RandAugment(args.randaug_n, args.randaug_m) if args.randaug_n else None
    mixers = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup else []) + \
             ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix else [])
    mix = v2.RandomChoice(mixers) if mixers else None

    def augment(x, y):
        if randaug is not None:
            x = torch.stack([randaug(img) for img in x])
        x = data.augment(x, img_size, mean, std, (args.crop_scale, 1.0), flip=args.hflip)
        target = F.one_hot(y, num_classes).float()
        if mix is not None:
            x, target = mix(x, y)
        return x, target * (1 - args.smoothing) + args.smoothing / num_classes
    return augment


def checkpoint_state(raw_model, opt, step, best, metrics, args, train):
    """What a resume needs, and what models.load_classifier and cam.py read."""
    return dict(model=raw_model.state_dict(), opt=opt.state_dict(), step=step, best=best, metrics=metrics,
                args=vars(args), encoder_config=raw_model.config(), num_classes=len(train.classes), pool=args.pool,
                data=dict(dataset=args.dataset, mean=list(train.mean), std=list(train.std),
                          classes=list(train.classes)))


def end_of_epoch(raw_model, opt, step, epoch, train_loss, lr_now, t0, best, sets, args, out_dir, amp):
    """Rank 0: evaluate on test (and val), log, save ckpt.pt and, when the chosen split's top-1
    improved, best.pt. Returns (stats, best)."""
    train, test, val = sets
    transform = lambda x: data.preprocess(x, raw_model.img_size, train.mean, train.std)
    metrics = evaluate(raw_model, test.x, test.y, transform, len(train.classes), amp)
    chosen = evaluate(raw_model, val.x, val.y, transform, len(train.classes), amp) if val is not None else metrics
    stats = dict(epoch=epoch + 1, step=step, loss=train_loss, lr=lr_now, seconds=round(time.time() - t0, 2),
                 **metrics, **({f"val_{k}": v for k, v in chosen.items()} if val is not None else {}))
    val_msg = f" | val top-1 {chosen['top1']:.2f}" if val is not None else ""
    print(f"epoch {epoch + 1} | step {step} | loss {train_loss:.4f} | top-1 {metrics['top1']:.2f} | mean per-class "
          f"{metrics['mean_per_class']:.2f}{val_msg} | {stats['seconds']:.0f}s")
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(stats) + "\n")
    if chosen["top1"] > best["top1"]:
        best = dict(top1=chosen["top1"], mean_per_class=chosen["mean_per_class"], epoch=epoch + 1,
                    split="val" if val is not None else "test", test_top1=metrics["top1"])
    state = checkpoint_state(raw_model, opt, step, best, metrics, args, train)
    if best["epoch"] == epoch + 1:
        save_checkpoint(state, os.path.join(out_dir, "best.pt"))
    save_checkpoint(state, os.path.join(out_dir, "ckpt.pt"))
    return stats, best


def main(args):
    # ---- setup: devices, DDP (torchrun), precision
    device, rank, world, amp, precision = setup(args)
    ddp, master, cuda = "RANK" in os.environ, rank == 0, device.type == "cuda"
    say = print if master else (lambda *a, **k: None)

    # ---- model and data: a pretrained encoder sets the image size the data is read at; a fresh one
    # (no --checkpoint) takes the dataset's geometry and as many channels as the images have
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    model_name, img_size, patch_size = (None, None, None) if args.checkpoint else data.GEOMETRY[args.dataset]
    encoder = build_encoder(args, model_name, img_size, patch_size) if args.checkpoint else None
    train, test, val = load_data(args, encoder.img_size if encoder else args.img_size or img_size)
    if encoder is None:
        encoder = build_encoder(args, model_name, img_size, patch_size, in_chans=train.x.shape[1])
    if train.x.shape[1] != encoder.in_chans:
        raise SystemExit(f"error: the encoder takes {encoder.in_chans} channels, {args.dataset} has {train.x.shape[1]}")
    num_classes = len(train.classes)
    encoder.head = nn.Linear(encoder.embed_dim, num_classes)
    nn.init.trunc_normal_(encoder.head.weight, std=2e-5)          # MAE: a near-zero head at start
    nn.init.zeros_(encoder.head.bias)
    raw_model = encoder.to(device)
    model = torch.compile(raw_model) if (cuda if args.compile is None else args.compile) else raw_model
    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    tag = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) if args.checkpoint \
        else f"scratch_{args.model or model_name}"
    out_dir = output_dir(args.output_dir or os.path.join("runs", f"finetune_{args.dataset}_{tag}"))
    images, labels = (train.x.to(device) if cuda else train.x), train.y.to(device)
    augment = make_augment(args, num_classes, encoder.img_size, train.mean, train.std)

    # ---- optimiser: AdamW with layer-wise lr decay; fused, on a CPU too (+8-19% steps, bench.py)
    lr = args.blr * args.batch_size / 256
    opt = torch.optim.AdamW(param_groups(raw_model, args.weight_decay, args.layer_decay), lr=lr, betas=(0.9, 0.999),
                            fused=True)
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training images are fewer than one batch of {args.batch_size}")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    say(f"finetune {tag} on {args.dataset} ({len(train)} train, {len(test)} test, {num_classes} classes) | "
        f"{encoder.img_size}px, patch {encoder.patch_size} | {device} x {world} | {precision}")
    say(f"batch {args.batch_size} | lr {lr:.3g} (blr {args.blr:g} x {args.batch_size} / 256) | layer decay "
        f"{args.layer_decay} | {steps_per_epoch} steps/epoch x {args.epochs} epochs")

    # ---- resume
    step, best = resume(raw_model, opt, args.resume or os.path.join(out_dir, "ckpt.pt"), args.resume, args)
    if master:
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    # ---- loop
    max_steps = min(args.max_steps or total_steps, total_steps)
    start_epoch, first = divmod(step, steps_per_epoch)
    stats, t_saved = {}, time.time()
    with Preemption() as stop:              # SIGTERM, SIGUSR1, SIGINT: save at this step, exit
        for epoch in range(start_epoch, args.epochs):
            if step >= max_steps:
                break
            batches = data.epoch_batches(len(train), args.batch_size, epoch, args.seed, rank, world,
                                         start=first if epoch == start_epoch else 0)
            loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.time()
            bar = tqdm(total=steps_per_epoch, initial=first if epoch == start_epoch else 0, disable=not master,
                       desc=f"ep {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
            for idx in batches:
                torch.manual_seed((args.seed * 1_000_003 + step) * 4096 + rank)   # exact resumes
                x, target = augment(images[idx.to(images.device)].to(device, non_blocking=True), labels[idx.to(device)])
                lr_now = cosine_lr(step, total_steps, warmup_steps, lr)
                for g in opt.param_groups:
                    g["lr"] = lr_now * g["lr_scale"]
                with amp:
                    logits = model(x)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                loss.backward()
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                n_sum += 1
                step += 1
                bar.update(1)
                save = master and step % steps_per_epoch and time.time() - t_saved >= 60 * args.save_every
                halt = stop() and step % steps_per_epoch and step < max_steps    # every rank asks; the epoch end saves
                if save or halt:                                         # within the epoch: a kill loses minutes
                    if master:
                        save_checkpoint(checkpoint_state(raw_model, opt, step, best, stats, args, train),
                                        os.path.join(out_dir, "ckpt.pt"))
                    t_saved = time.time()
                if halt:
                    bar.close()
                    stop.exit(f"step {step}", os.path.join(out_dir, "ckpt.pt"))
                if step >= max_steps:
                    break
            bar.close()

            # ---- end of epoch: every rank sees the same loss and stops alike; rank 0 evaluates and saves
            if ddp:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item() / max(n_sum, 1)
            if not math.isfinite(train_loss):
                ckpt = os.path.join(out_dir, "ckpt.pt")
                kept = f"{ckpt} is untouched" if os.path.exists(ckpt) else "no checkpoint was written"
                raise SystemExit(f"error: loss is {train_loss} in epoch {epoch + 1}: stopping; {kept}. Lower --blr, or "
                                 f"try --precision fp32 or --clip-grad 1")
            if master:
                stats, best = end_of_epoch(raw_model, opt, step, epoch, train_loss, lr_now, t0, best,
                                           (train, test, val), args, out_dir, amp)
                t_saved = time.time()
            if stop() and step < max_steps:
                stop.exit(f"step {step}", os.path.join(out_dir, "ckpt.pt"))

    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    say(f"best top-1 {best['top1']:.2f} on {best.get('split', 'test')} (epoch {best.get('epoch')}, test top-1 "
        f"{best.get('test_top1', best['top1']):.2f})")
    return dict(stats, best=best, step=step, out_dir=out_dir)


if __name__ == "__main__":
    main(get_args())
