"""Pretrain a ViT encoder without labels: DS-MAE (denoising self-distillation MAE, the paper's
method) or MAE (its baseline).

    python pretrain.py                                     # synthetic shapes, CPU, a few minutes
    python pretrain.py --dataset cifar10 --download        # one GPU, the paper's CIFAR setting
    torchrun --standalone --nproc_per_node=8 pretrain.py --dataset stl10 --download

Writes to --output-dir: ckpt.pt (the latest state; rerunning the command resumes from it),
args.json, log.jsonl (one JSON line per epoch) and recon_XXXX.png (noisy | reconstructed |
original, like the paper's Fig. 2). Per-dataset defaults follow the paper's Table 1.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import (DSMAE, MAE, MODELS, TEACHER_TARGETS, ViT, bf16_is_fast, ema_momentum, extract_features, knn_predict, patchify,
                    unpatchify)

# the paper's Table 1 for CIFAR and STL-10 (its batch 2048; 1024 for ViT-B on STL-10). For
# synthetic, a laptop-CPU lab: a small model, a small batch, and a base lr that moves the weights
# within 390 steps (the paper's 1.5e-4 gives lr 7.5e-5 at batch 128)
DEFAULTS = {
    "synthetic": dict(model="vit_micro", img_size=32, patch_size=4, epochs=10, warmup_epochs=1,
                      batch_size=128, blr=1e-3, decoder_dim=128, decoder_depth=2, knn_every=5),
    "cifar10": dict(model="vit_tiny", img_size=32, patch_size=2),
    "cifar100": dict(model="vit_tiny", img_size=32, patch_size=2),
    "stl10": dict(model="vit_small", img_size=96, patch_size=6, split="train+unlabeled"),
    "npz": dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=256, epochs=100, warmup_epochs=10),
    "folder": dict(model="vit_small", img_size=224, patch_size=16, batch_size=256, epochs=100, warmup_epochs=10),
    # chest X-rays, after the notes: 90% of patches masked, crops no smaller than half the image
    "dicom": dict(model="vit_small", img_size=224, patch_size=16, batch_size=256, epochs=100, warmup_epochs=10,
                  mask_ratio=0.9, crop_scale=0.5),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # common flags, spelled the same in every script
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data", help="folder holding the dataset (a .npz file for npz)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR / STL-10 if missing (needs the internet)")
    p.add_argument("--output-dir", default=None, help="default: runs/<method>_<dataset>_<model>")
    p.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/ckpt.pt if present)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit); "
                   "the schedule still spans --epochs, so a stopped run resumes exactly")
    p.add_argument("--batch-size", type=int, default=2048, help="global batch, split over the DDP ranks")
    p.add_argument("--model", default="vit_tiny", choices=MODELS)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast; auto: bf16 where it is fast (CUDA, CPUs with AMX/AVX512-BF16)")
    p.add_argument("--num-workers", type=int, default=4, help="threads decoding a folder dataset")
    p.add_argument("--split", default="train", help="split to pretrain on (STL-10: train+unlabeled)")
    # method
    p.add_argument("--method", default="dsmae", choices=["dsmae", "mae"])
    p.add_argument("--noise-ratio", type=float, default=0.9, help="DS-MAE: fraction of patches noised (paper: 0.9-0.95)")
    p.add_argument("--noise-std", type=float, default=1.0, help="DS-MAE: noise std, in normalised pixel units")
    p.add_argument("--noise-mode", default="add", choices=["add", "replace"], help="DS-MAE: x + std * eps, or eps alone")
    p.add_argument("--lam", type=float, default=0.6, help="DS-MAE: L = lam * L_y + (1 - lam) * L_z; 1: decoder only, "
                   "0: regressor only")
    p.add_argument("--per-token-cos", action="store_true", help="DS-MAE: L_z as a mean of per-token cosines, "
                   "instead of Eq. 2's one cosine per image")
    p.add_argument("--target", default="final", choices=TEACHER_TARGETS, help="DS-MAE: what the regressor predicts "
                   "(models.teacher_target): the teacher's final tokens, centred, LayerNorm'd, or data2vec's average")
    p.add_argument("--target-blocks", type=int, default=1, help="DS-MAE --target avg: how many last teacher blocks")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="MAE: fraction of patches masked (0.9 for X-rays)")
    p.add_argument("--norm-pix", action="store_true", help="pixel targets normalised per patch (MAE's norm_pix_loss)")
    p.add_argument("--decoder-dim", type=int, default=256)
    p.add_argument("--decoder-depth", type=int, default=4)
    p.add_argument("--regressor-depth", type=int, default=2)
    p.add_argument("--ema-start", type=float, default=0.96, help="DS-MAE teacher momentum at step 0, cosine to --ema-end")
    p.add_argument("--ema-end", type=float, default=0.99)
    p.add_argument("--ema-ref-batch", type=int, default=0, help="the batch --ema-start/--ema-end were set for: the "
                   "momentum m becomes m ** (batch / ref), the same lag in images (0: used as given)")
    p.add_argument("--drop-path", type=float, default=0.0)
    # optimisation
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * batch * accum / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=20)
    p.add_argument("--accum-iter", type=int, default=1, help="batches per optimiser step")
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--aug", action=argparse.BooleanOptionalAction, default=True,
                   help="random resized crop + flip (--no-aug: the plain images)")
    p.add_argument("--crop-scale", type=float, default=0.2, help="smallest crop area (0.5 for X-rays)")
    # monitoring
    p.add_argument("--knn-every", type=int, default=20, help="epochs between k-NN monitors (0: only at the end)")
    p.add_argument("--knn-samples", type=int, default=10000, help="labelled images used by the k-NN monitor, per split")
    p.add_argument("--vis-every", type=int, default=20, help="epochs between reconstruction pictures")
    p.add_argument("--log-every", type=int, default=20, help="steps between reading the loss on the host")
    data.add_data_args(p)
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**DEFAULTS[pre.dataset])
    return p.parse_args(argv)


def cosine_lr(step, total, warmup, base, min_lr=0.0):
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay):
    """No weight decay on norms, biases, the positional embedding and the learned tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed"))
            (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def save_checkpoint(state, path):
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def knn_accuracy(encoder, train, test, img_size, device, amp, n_max):
    """k-NN (k=20, cosine, DINO's weighted votes) top-1 of the class token and of the mean of the
    patch tokens, from evenly spaced subsets of at most n_max labelled images per split."""
    transform = lambda x: data.preprocess(x, img_size, train.mean, train.std)
    feats = []
    for ds in (train, test):
        keep = torch.linspace(0, len(ds) - 1, min(n_max, len(ds))).long()
        feats.append((*extract_features(encoder, ds.x[keep], transform, device=device, amp=amp), ds.y[keep].to(device)))
    (tr_cls, tr_avg, tr_y), (te_cls, te_avg, te_y) = feats
    acc = lambda a, b: (knn_predict(a, tr_y, b, len(train.classes)) == te_y).float().mean().item() * 100
    return dict(knn_cls=acc(tr_cls, te_cls), knn_mean=acc(tr_avg, te_avg))


@torch.no_grad()
def save_reconstructions(model, imgs, mean, std, norm_pix, path):
    """Grid of (input | reconstruction | original) triplets, two per row, like the paper's Fig. 2."""
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
    from torchvision.utils import save_image
    save_image(cells, path, nrow=2 * len(rows), padding=1, pad_value=1.0)


def main(args):
    # ---- setup: devices, DDP (torchrun), precision
    ddp = "RANK" in os.environ
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
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
    if args.img_size % args.patch_size:
        raise SystemExit(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    cuda = device.type == "cuda"
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_fast(device))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    compile_model = cuda if args.compile is None else args.compile
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = args.output_dir or os.path.join("runs", f"{args.method}_{args.dataset}_{args.model}")

    # ---- data: uint8 images, on the GPU when there is one (augmentation runs there too)
    xray = data.data_options(args)
    try:
        train_set = data.build_dataset(args.dataset, args.split, args.data_dir, args.img_size,
                                       args.download, args.seed, args.num_workers, **xray)
        # the k-NN monitor needs labels: the train split (STL-10: without unlabeled) and test
        knn_train = train_set if args.split == "train" else data.build_dataset(
            args.dataset, "train", args.data_dir, args.img_size, False, args.seed, args.num_workers, **xray)
        knn_test = data.build_dataset(args.dataset, "test", args.data_dir, args.img_size, False,
                                      args.seed, args.num_workers, **xray)
        knn_sets = (knn_train, knn_test) if knn_train.y is not None and knn_test.y is not None else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    images = train_set.x.to(device) if cuda else train_set.x
    steps_per_epoch = len(train_set) // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images are fewer than one step "
                         f"(--batch-size {args.batch_size} x --accum-iter {args.accum_iter})")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ---- model (the same initial weights on every rank)
    torch.manual_seed(args.seed)
    encoder = ViT(img_size=args.img_size, patch_size=args.patch_size, in_chans=train_set.x.shape[1],
                  drop_path=args.drop_path, **MODELS[args.model])
    if args.method == "dsmae":
        raw_model = DSMAE(encoder, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                          regressor_depth=args.regressor_depth, noise_ratio=args.noise_ratio,
                          noise_std=args.noise_std, noise_mode=args.noise_mode, lam=args.lam,
                          norm_pix=args.norm_pix, per_token_cos=args.per_token_cos, target=args.target,
                          target_blocks=args.target_blocks)
    else:
        raw_model = MAE(encoder, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                        mask_ratio=args.mask_ratio, norm_pix=args.norm_pix)
    raw_model.to(device)
    model = torch.compile(raw_model) if compile_model else raw_model
    if ddp:   # no buffers to sync (no BatchNorm): skip the per-step broadcast
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)

    # ---- optimiser: AdamW, lr scaled by the effective batch (MAE's rule); fused, on a CPU too (+8-19%, bench.py)
    eff_batch = args.batch_size * args.accum_iter
    lr = args.lr or args.blr * eff_batch / 256
    opt = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=lr, betas=(0.9, 0.95),
                            fused=True)
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    say(f"{args.method} {args.model} on {args.dataset}/{args.split} ({len(train_set)} images, "
        f"{args.img_size}px, patch {args.patch_size}) | {n_params / 1e6:.2f}M trained params | {device} x {world} "
        f"| {'bf16' if use_bf16 else 'fp32'}{' compiled' if compile_model else ''}")
    say(f"effective batch {eff_batch} | lr {lr:.3g} (blr {args.blr:g} x {eff_batch} / 256) | "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps, warm-up {warmup_steps}")

    # ---- resume: everything needed to continue exactly (randomness is seeded per step)
    step = 0
    ckpt_path = args.resume or os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        try:
            raw_model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise SystemExit(f"{ckpt_path} was written by another configuration ({e.args[0].splitlines()[0]}); "
                             f"choose a new --output-dir")
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        say(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        raise SystemExit(f"--resume {args.resume}: no such file")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    def checkpoint():
        state = dict(model=raw_model.state_dict(), opt=opt.state_dict(), step=step, epoch=step // steps_per_epoch,
                     args=vars(args), encoder=raw_model.encoder.state_dict(), encoder_config=encoder.config(),
                     data=dict(dataset=args.dataset, mean=list(train_set.mean), std=list(train_set.std),
                               classes=list(train_set.classes)))
        if getattr(raw_model, "teacher", None) is not None:
            state["teacher"] = raw_model.teacher.module.state_dict()
        save_checkpoint(state, os.path.join(out_dir, "ckpt.pt"))

    def monitor(epoch, final):
        """k-NN accuracy and the reconstruction picture, on rank 0, every few epochs."""
        out = {}
        if knn_sets and (final or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
            out = knn_accuracy(raw_model.encoder, *knn_sets, args.img_size, device, amp, args.knn_samples)
        if final or (args.vis_every and (epoch + 1) % args.vis_every == 0):
            vis_set = knn_sets[1] if knn_sets else train_set
            x = data.preprocess(vis_set.x[torch.linspace(0, len(vis_set) - 1, 8).long()].to(device),
                                args.img_size, train_set.mean, train_set.std)
            save_reconstructions(raw_model, x, train_set.mean, train_set.std, args.norm_pix,
                                 os.path.join(out_dir, f"recon_{epoch + 1:04d}.png"))
        return out

    # the k-NN of the untrained encoder: the number pretraining has to beat
    if master and step == 0 and knn_sets:
        init = knn_accuracy(raw_model.encoder, *knn_sets, args.img_size, device, amp, args.knn_samples)
        say(f"k-NN at initialisation: class token {init['knn_cls']:.1f}%, mean of patch tokens {init['knn_mean']:.1f}%")
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(dict(epoch=0, step=0, **init)) + "\n")

    # ---- loop
    raw_model.train()
    zero, stats = torch.zeros((), device=device), {}
    start_epoch, first = divmod(step, steps_per_epoch)
    max_steps = min(args.max_steps or total_steps, total_steps)
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
                momentum = ema_momentum(step, total_steps, args.ema_start, args.ema_end, eff_batch, args.ema_ref_batch)
                raw_model.update_teacher(momentum)
            step += 1
            steps_log += 1
            bar.update(1)
            last = step >= max_steps or step % steps_per_epoch == 0
            if step % args.log_every == 0 or last:
                # the only host synchronisation: read the losses every log_every steps
                avg = sums / n_sum
                if ddp:
                    dist.all_reduce(avg)
                    avg /= world
                loss_now = avg[0].item()
                if not math.isfinite(loss_now):
                    raise SystemExit(f"loss is {loss_now} at step {step}: stopping. The last good checkpoint "
                                     f"{os.path.join(out_dir, 'ckpt.pt')} is untouched; lower --blr or use --precision fp32.")
                ips = steps_log * eff_batch / (time.time() - t_log)
                bar.set_postfix_str(f"loss {loss_now:.4f} lr {lr_now:.2e} {ips:.0f} img/s")
                t_log, steps_log = time.time(), 0
        bar.close()

        # ---- end of epoch (or of the run): log, monitor, save
        seconds = time.time() - t_epoch
        final = step >= max_steps
        stats = dict(epoch=epoch + 1, step=step, loss=avg[0].item(), lr=lr_now,
                     img_per_s=n_sum * args.batch_size / seconds, seconds=round(seconds, 2))
        if args.method == "dsmae":
            stats.update(momentum=momentum, loss_y=avg[1].item() if args.lam > 0 else None,
                         loss_z=avg[2].item() if args.lam < 1 else None)
        if master:
            stats.update(monitor(epoch, final))
            say(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(stats) + "\n")
            checkpoint()

    if ddp:
        dist.barrier()                                 # rank 0 may still be monitoring
        dist.destroy_process_group()
    return dict(stats, step=step, out_dir=out_dir)


if __name__ == "__main__":
    main(get_args())
