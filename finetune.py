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
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import MODELS, bf16_is_fast, load_encoder, per_class_accuracy

# MAE's fine-tuning recipe (its ViT-B ImageNet values) scaled to CIFAR/STL: fewer epochs, and
# the geometry of the paper's Table 1 for the scratch baseline
DEFAULTS = {
    "synthetic": dict(geometry=("vit_micro", 32, 4), epochs=15, batch_size=128, warmup_epochs=1, mixup=0.0,
                      cutmix=0.0, randaug_n=0, smoothing=0.0, drop_path=0.0),
    "cifar10": dict(geometry=("vit_tiny", 32, 2)),
    "cifar100": dict(geometry=("vit_tiny", 32, 2)),
    "stl10": dict(geometry=("vit_small", 96, 6)),
    "npz": dict(geometry=("vit_tiny", 32, 4)),
    "folder": dict(geometry=("vit_small", 224, 16)),
    "dicom": dict(geometry=("vit_small", 224, 16), crop_scale=0.5),    # X-rays: no tiny crops (the notes)
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--output-dir", default=None, help="default: runs/finetune_<dataset>_<checkpoint folder>")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/ckpt.pt if present)")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=100, help="MAE: 100 for ViT-B on ImageNet; 100 here")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit)")
    p.add_argument("--batch-size", type=int, default=512, help="global batch, split over the DDP ranks")
    p.add_argument("--model", default=None, choices=MODELS, help="default: the checkpoint's, else per dataset")
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--patch-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--checkpoint", default=None, help="pretrain.py checkpoint; none: train from scratch")
    p.add_argument("--checkpoint-key", default="teacher", choices=["teacher", "student"],
                   help="teacher: the EMA encoder (DS-MAE); MAE checkpoints have only the student")
    p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="head on the class token or on the "
                   "mean of the patch tokens")
    p.add_argument("--blr", type=float, default=1e-3, help="lr = blr * batch / 256 (MAE: 5e-4 for ViT-B, "
                   "1e-3 for smaller)")
    p.add_argument("--layer-decay", type=float, default=0.75, help="lr of block i is scaled by decay^(depth + 1 - i): "
                   "0.75 for ViT-T/S, 0.65 for ViT-B (MAE)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth: 0.1 for ViT-T/S/B (MAE)")
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (MAE: none)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off); with both, one per batch")
    p.add_argument("--randaug-n", type=int, default=2, help="RandAugment: ops per image (0: off)")
    p.add_argument("--randaug-m", type=int, default=9, help="RandAugment: magnitude")
    p.add_argument("--crop-scale", type=float, default=0.08, help="smallest random resized crop (0.5 for X-rays)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips; --no-hflip where left and right differ (a task about sides)")
    data.add_data_args(p)
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**{k: v for k, v in DEFAULTS[pre.dataset].items() if k != "geometry"})
    return p.parse_args(argv)


def cosine_lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def param_groups_lrd(model, weight_decay, layer_decay):
    """Layer-wise lr decay (BEiT, MAE): embeddings are layer 0, block i is layer i + 1, the final
    norm and the head are layer depth + 1; a layer's lr is scaled by decay^(depth + 1 - layer).
    No weight decay on norms, biases, the class token and the positional embedding."""
    depth, groups = len(model.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        g = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                      lr_scale=layer_decay ** (depth + 1 - layer)))
        g["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def evaluate(model, ds, img_size, mean, std, device, amp, batch_size=256):
    """Top-1, mean per-class and per-class accuracy (%) on a labelled split."""
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(ds), batch_size):
        with amp:
            preds.append(model(data.preprocess(ds.x[i:i + batch_size].to(device), img_size, mean, std)).argmax(dim=1))
    model.train(was_training)
    pred, y = torch.cat(preds), ds.y.to(device)
    per_class = per_class_accuracy(pred, y, len(ds.classes)) * 100
    return dict(top1=(pred == y).float().mean().item() * 100, mean_per_class=per_class.nanmean().item(),
                per_class=[round(v, 2) for v in per_class.tolist()])


def save_checkpoint(state, path):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(args):
    # ---- setup: devices, DDP (torchrun), precision
    ddp = "RANK" in os.environ
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    cuda = device.type == "cuda"
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_fast(device))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- model: the pretrained encoder (or a fresh one) and a new linear head
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    model_name, img_size, patch_size = (None, None, None) if args.checkpoint else DEFAULTS[args.dataset]["geometry"]
    torch.manual_seed(args.seed)
    try:
        # the dataset decides the number of classes; build the head after reading it
        encoder = load_encoder(args.checkpoint, args.checkpoint_key, model=args.model or model_name,
                               img_size=args.img_size or img_size, patch_size=args.patch_size or patch_size,
                               drop_path=args.drop_path, global_pool="token" if args.pool == "cls" else "avg")
    except ValueError as e:
        raise SystemExit(f"error: {e}")

    # ---- data: labelled splits, at the encoder's image size
    xray = data.data_options(args)
    try:
        train = data.build_dataset(args.dataset, "train", args.data_dir, encoder.img_size, args.download,
                                   args.seed, args.num_workers, **xray)
        test = data.build_dataset(args.dataset, "test", args.data_dir, encoder.img_size, False, args.seed,
                                  args.num_workers, **xray)
        # best.pt is chosen on a validation split where there is one, so test stays unseen
        val = data.build_dataset(args.dataset, "val", args.data_dir, encoder.img_size, False, args.seed,
                                 args.num_workers, **xray) if args.dataset == "dicom" else None
        val = val if val is not None and len(val) else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if train.y is None or test.y is None or len(test) == 0:
        raise SystemExit(f"error: {args.dataset} has no labels (or no test images) here; fine-tuning needs a labelled train and test split")
    if train.x.shape[1] != encoder.in_chans:
        raise SystemExit(f"error: the encoder takes {encoder.in_chans} channels, {args.dataset} has {train.x.shape[1]}")
    num_classes = len(train.classes)
    if int(max(train.y.max(), test.y.max())) >= num_classes:
        raise SystemExit(f"error: labels go up to {int(max(train.y.max(), test.y.max()))} but {args.dataset} names "
                         f"{num_classes} classes")
    encoder.head = nn.Linear(encoder.embed_dim, num_classes)
    nn.init.trunc_normal_(encoder.head.weight, std=2e-5)          # MAE: a near-zero head at start
    nn.init.zeros_(encoder.head.bias)
    raw_model = encoder.to(device)
    model = torch.compile(raw_model) if (cuda if args.compile is None else args.compile) else raw_model
    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    tag = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) if args.checkpoint \
        else f"scratch_{args.model or model_name}"
    out_dir = args.output_dir or os.path.join("runs", f"finetune_{args.dataset}_{tag}")
    images = train.x.to(device) if cuda else train.x
    labels = train.y.to(device)

    # ---- augmentation on the device: RandAugment per image, crop + flip, mixup/cutmix per batch
    from torchvision.transforms import v2
    randaug = v2.RandAugment(args.randaug_n, args.randaug_m) if args.randaug_n else None
    mixers = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup else []) + \
             ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix else [])
    mix = v2.RandomChoice(mixers) if mixers else None

    # ---- optimiser: AdamW with layer-wise lr decay; fused, on a CPU too (+8-19% steps, bench.py)
    lr = args.blr * args.batch_size / 256
    opt = torch.optim.AdamW(param_groups_lrd(raw_model, args.weight_decay, args.layer_decay), lr=lr,
                            betas=(0.9, 0.999), fused=True)
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training images are fewer than one batch of {args.batch_size}")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    say(f"finetune {tag} on {args.dataset} ({len(train)} train, {len(test)} test, {num_classes} classes) | "
        f"{encoder.img_size}px, patch {encoder.patch_size} | {device} x {world} | {'bf16' if use_bf16 else 'fp32'}")
    say(f"batch {args.batch_size} | lr {lr:.3g} (blr {args.blr:g} x {args.batch_size} / 256) | layer decay "
        f"{args.layer_decay} | {steps_per_epoch} steps/epoch x {args.epochs} epochs")

    # ---- resume
    step, best = 0, dict(top1=-1.0)
    ckpt_path = args.resume or os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, best = ckpt["step"], ckpt["best"]
        say(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        raise SystemExit(f"--resume {args.resume}: no such file")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    def state(metrics):
        return dict(model=raw_model.state_dict(), opt=opt.state_dict(), step=step, epoch=step // steps_per_epoch,
                    best=best, metrics=metrics, args=vars(args), encoder_config=raw_model.config(),
                    num_classes=num_classes, pool=args.pool,
                    data=dict(dataset=args.dataset, mean=list(train.mean), std=list(train.std), classes=list(train.classes)))

    # ---- loop
    max_steps = min(args.max_steps or total_steps, total_steps)
    start_epoch, first = divmod(step, steps_per_epoch)
    stats = {}
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
            x = images[idx.to(images.device)].to(device, non_blocking=True)
            y = labels[idx.to(device)]
            if randaug is not None:
                x = torch.stack([randaug(img) for img in x])
            x = data.augment(x, encoder.img_size, train.mean, train.std, (args.crop_scale, 1.0), flip=args.hflip)
            target = F.one_hot(y, num_classes).float()
            if mix is not None:
                x, target = mix(x, y)
            target = target * (1 - args.smoothing) + args.smoothing / num_classes
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
            if step >= max_steps:
                break
        bar.close()

        # ---- end of epoch: check, evaluate, log, save last and best
        if ddp:                                          # every rank sees the same loss, and stops alike
            dist.all_reduce(loss_sum)
            loss_sum /= world
        train_loss = loss_sum.item() / max(n_sum, 1)
        if not math.isfinite(train_loss):
            raise SystemExit(f"loss is {train_loss} in epoch {epoch + 1}: stopping; the last good checkpoint in "
                             f"{out_dir} is untouched")
        if master:
            metrics = evaluate(raw_model, test, encoder.img_size, train.mean, train.std, device, amp)
            chosen, val_msg = metrics, ""
            if val is not None:
                chosen = evaluate(raw_model, val, encoder.img_size, train.mean, train.std, device, amp)
                val_msg = f" | val top-1 {chosen['top1']:.2f}"
            stats = dict(epoch=epoch + 1, step=step, loss=train_loss, lr=lr_now, seconds=round(time.time() - t0, 2),
                         **metrics, **({f"val_{k}": v for k, v in chosen.items()} if val is not None else {}))
            say(f"epoch {epoch + 1} | step {step} | loss {train_loss:.4f} | top-1 {metrics['top1']:.2f} | "
                f"mean per-class {metrics['mean_per_class']:.2f}{val_msg} | {stats['seconds']:.0f}s")
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(stats) + "\n")
            if chosen["top1"] > best["top1"]:
                best = dict(top1=chosen["top1"], mean_per_class=chosen["mean_per_class"], epoch=epoch + 1,
                            split="val" if val is not None else "test", test_top1=metrics["top1"])
                save_checkpoint(state(metrics), os.path.join(out_dir, "best.pt"))
            save_checkpoint(state(metrics), os.path.join(out_dir, "ckpt.pt"))

    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    say(f"best top-1 {best['top1']:.2f} on {best.get('split', 'test')} (epoch {best.get('epoch')}, test top-1 "
        f"{best.get('test_top1', best['top1']):.2f})")
    return dict(stats, best=best, step=step, out_dir=out_dir)


if __name__ == "__main__":
    main(get_args())
