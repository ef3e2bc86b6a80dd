"""Lung fields for radiographs that have no masks (the thesis' segmentator, Fig. 3.1 and section
3.2.1): train a small U-Net on image + mask pairs, then predict a mask for every image of a folder,
post-processed as the thesis did (the two largest components, holes filled), doubtful ones flagged.

    python data.py download openist                        # data/openist: 275 normal radiographs, lung masks
    python segment.py train --data-dir data/openist/images --masks data/openist/masks --img-size 64 --width 8 \\
        --epochs 3 --output-dir runs/seg_tiny
    python segment.py train --data-dir data/openist/images --masks data/openist/masks    # the defaults
    python segment.py predict --checkpoint runs/segment/best.pt --data-dir /data/cxr --output-dir /data/cxr_masks
    python pretrain.py --dataset dicom --data-dir /data/cxr --masks /data/cxr_masks --variant seg-black ...

train reads --data-dir (DICOMs or PNG/JPEG exports, searched recursively) with one <id>.png mask
per image in --masks, through data.py like every script (the same X-ray flags and cache), holds
out --val-count radiographs (identical images, found by hashing their pixels, on one side), and
writes to --output-dir: ckpt.pt (the latest state; rerunning the command resumes from it), best.pt
(the best val Dice), args.json and log.jsonl (loss, lr, val Dice and IoU: mean and 10th percentile).

predict writes to --output-dir one <id>.png per image (0 or 255, at the image's own size, exactly
what --masks reads), masks.csv (id, lung fraction, confidence, components kept, doubt, shape, flag;
with --labels the label, with --reference the Dice, worst.png and dice.csv: its summary per label)
and overlay.png (the flagged images first); a flagged mask is written too, and listed: you decide.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from models import (Preemption, autocast, output_dir, param_groups, read_checkpoint, resolve_device,
                    reuse_freed_memory, save_checkpoint)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True, metavar="{train,predict}", help="MODE --help: its flags")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", required=True, help="folder of .dcm (or .png/.jpg) radiographs, recursive")
    common.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    common.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast; "
                        "auto: where it is fast (CUDA, CPUs with AVX512-BF16: this U-Net 1.4x faster than fp32)")
    common.add_argument("--batch-size", type=data.POS_INT, default=16, help="images per step (per forward in predict)")
    common.add_argument("--num-workers", type=data.NONNEG_INT, default=4, help="threads decoding images")
    raw = argparse.RawDescriptionHelpFormatter
    t = modes.add_parser("train", parents=[common], formatter_class=raw, help="fit a U-Net to image + mask pairs",
                         description="Train the U-Net (see segment.py --help). Of the X-ray flags, --labels, "
                         "--classes, --split-*, --variant and --channels do not apply: images and masks only.")
    t.add_argument("--output-dir", default="runs/segment", help="ckpt.pt, best.pt, log.jsonl, args.json")
    t.add_argument("--resume", default="", help="checkpoint to resume from (default: <output-dir>/ckpt.pt if present)")
    t.add_argument("--img-size", type=data.Number(int, "[16, inf)"), default=128, help="square side the images are "
                   "fitted to (black padding); 256 measured no better (docs/segmentation.md) at 5x the time")
    t.add_argument("--width", type=data.POS_INT, default=16, help="U-Net channels at full resolution, x2 per level")
    t.add_argument("--depth", type=data.POS_INT, default=4, help="U-Net levels below full resolution (2x2 max-pools)")
    t.add_argument("--epochs", type=data.POS_INT, default=76, help="76 take 7 minutes on 2 CPU cores in bf16 (9 in "
                   "fp32), and hold on sick lungs better than 38 (docs/segmentation.md)")
    t.add_argument("--max-steps", type=data.NONNEG_INT, default=0, help="stop after this many steps (0: no limit); the "
                   "schedule still spans --epochs, so a stopped run resumes exactly")
    t.add_argument("--lr", type=data.POS, default=3e-3, help="AdamW peak lr, after a linear warm-up")
    t.add_argument("--min-lr", type=data.NONNEG, default=1e-5, help="end of the cosine decay")
    t.add_argument("--warmup-epochs", type=data.NONNEG, default=1.0, help="linear lr warm-up")
    t.add_argument("--weight-decay", type=data.NONNEG, default=1e-4, help="AdamW, on convolution weights only")
    t.add_argument("--bce-weight", type=data.NONNEG, default=1.0, help="loss = soft Dice + bce_weight * BCE")
    t.add_argument("--val-count", type=data.POS_INT, default=None, help="radiographs held out for validation "
                   "(default: 20%%; 55 of OpenIST's 275)")
    t.add_argument("--seed", type=data.SEED, default=0, help="the val split, the initial weights, the augmentation")
    t.add_argument("--rotate", type=data.Number(float, "[0, 180]"), default=7.0, help="rotation up to +- this, degrees")
    t.add_argument("--scale", type=data.Number(float, "[0, 1)"), default=0.25, help="augmentation: zoom by 1 +- this")
    t.add_argument("--translate", type=data.Number(float, "[0, 1)"), default=0.05, help="shift, share of the side")
    t.add_argument("--brightness", type=data.Number(float, "[0, 1]"), default=0.1, help="add up to +- this to pixels")
    t.add_argument("--contrast", type=data.Number(float, "[0, 1)"), default=0.2, help="contrast scaled by 1 +- this")
    t.add_argument("--gamma", type=data.Number(float, "[0, 3]"), default=0.3, help="exposure: pixels ** exp(+- this)")
    t.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=True, help="histogram-equalise every "
                   "image (train and predict): one contrast whatever the source")
    t.add_argument("--opacity", type=data.Number(float, "[0, 1]"), default=0.5, help="augmentation: the share of "
                   "training images given simulated opacities (opacify: blobs, a washed-out band or side, haze)")
    t.add_argument("--opacity-kinds", type=opacity_kinds, default=",".join(OPACITIES), help="which, comma-separated")
    t.add_argument("--hflip", action="store_true", help="mirror half the images; off by default: the heart "
                   "has a side, and so does every radiograph a hospital sends")
    t.add_argument("--save-every", type=data.NONNEG, default=10, help="minutes between checkpoints (and every epoch)")
    data.add_data_args(t)
    q = modes.add_parser("predict", parents=[common], formatter_class=raw, help="write a mask for every "
                         "image of a folder", description="Predict masks; see segment.py --help.")
    q.add_argument("--checkpoint", required=True, help="best.pt or ckpt.pt of segment.py train")
    q.add_argument("--output-dir", default=None, help="the masks folder (default: masks_<data-dir name> next to "
                   "the checkpoint); give it to the other scripts as --masks")
    q.add_argument("--window-percentile", type=data.Number(float, "[0, 50)"), default=0.5, help="DICOMs without a "
                   "window: from this percentile to 100 minus it (as data.py)")
    q.add_argument("--skip-bad", action="store_true", help="list unreadable files and go on")
    q.add_argument("--threshold", type=data.Number(float, "[0, 1]"), default=0.5, help="lung above this probability")
    q.add_argument("--components", type=data.POS_INT, default=2, help="largest components kept (the two lungs)")
    q.add_argument("--min-area", type=data.Number(float, "[0, 1]"), default=0.08, help="flag masks below this fraction "
                   "of the image (OpenIST's true masks: 0.15 to 0.46)")
    q.add_argument("--max-area", type=data.Number(float, "(0, 1]"), default=0.6, help="flag masks above this share")
    q.add_argument("--min-ratio", type=data.Number(float, "[0, 1]"), default=0.35, help="flag when the smaller lung is "
                   "under this fraction of the larger, or missing (OpenIST: 0.71 or more)")
    q.add_argument("--min-confidence", type=data.Number(float, "[0, 1]"), default=0.85, help="flag when the mean "
                   "probability inside the mask is lower")
    q.add_argument("--tta", type=data.Number(int, "[0, 6]"), default=4, help="views of each image, zoomed or shifted a "
                   "little, whose masks the doubt score compares with the mask predicted (0: no doubt score)")
    q.add_argument("--max-doubt", type=data.Number(float, "[0, 1]"), default=0.025, help="flag masks whose doubt (1 - "
                   "mean Dice of the mask and the views' masks) exceeds this")
    q.add_argument("--max-shape", type=data.Number(float, "[0, 1]"), default=0.135, help="flag masks whose shape (1 - "
                   "Dice with the closest training mask, both in their bounding box) exceeds this")
    q.add_argument("--hull", action="store_true", help="fill each lung to its convex hull: the heart's notch and the "
                   "costophrenic angles, toward the whole lung (docs/segmentation.md); masks.csv judges it before")
    q.add_argument("--grid", type=data.NONNEG_INT, default=16, help="images in overlay.png (flagged ones first)")
    q.add_argument("--labels", default=None, help="a CSV of id,label (a finding, a source): masks.csv gains the label, "
                   "and with --reference dice.csv the Dice of each label's masks")
    q.add_argument("--id-column", default="id", help="--labels' column naming the image (its file name, no extension)")
    q.add_argument("--label-column", default="label", help="--labels' column with the label")
    q.add_argument("--reference", default=None, help="a folder of known <id>.png masks: each mask's Dice and IoU in "
                   "masks.csv, their summary in dice.csv, and worst.png (the five lowest, the reference in blue)")
    data.finish_parser(p)
    args = p.parse_args(argv)
    if args.mode == "train":
        if not args.masks:
            t.error("train needs --masks DIR: one <id>.png mask per image (nonzero = lung)")
        if args.labels or args.classes or args.variant != "full" or args.channels != 1:
            t.error("segment.py reads images and masks only: --labels, --classes, --variant and --channels do not "
                    "apply")
    return args


# ----------------------------------------------------------------------------- the network: a small U-Net, its loss
# (copyable alone with torch and numpy)

class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU: the unit at every U-Net level.
    GroupNorm, not BatchNorm: the same function of an image at batch 1 (predict), batch 16
    (train) and in eval mode, so no running statistics to drift on another hospital's data."""

    def __init__(self, cin, cout):
        super().__init__()
        g = math.gcd(8, cout)                          # 8 groups, fewer for the tiny test widths
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(x)


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), small: `depth` 2x2 max-pools, channels width * 2**level, transposed-
    convolution upsampling, skip connections by concatenation. (B, in_chans, H, W) -> (B, 1, H, W) logits for any
    H, W: the input is padded (replicating the edge) to a multiple of 2**depth and the output cropped back.
    width=16, depth=4: 1.9M parameters, 3.0 GMACs per 256x256 image (width 8: 0.5M, 0.76 GMACs)."""

    def __init__(self, *, in_chans=1, width=16, depth=4):
        super().__init__()
        self.in_chans, self.width, self.depth = in_chans, width, depth
        ch = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([ConvBlock(in_chans, ch[0])] + [ConvBlock(ch[i], ch[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([ConvBlock(2 * ch[i], ch[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def config(self):
        """The constructor's keyword arguments, for checkpoints: UNet(**ckpt["unet_config"])."""
        return dict(in_chans=self.in_chans, width=self.width, depth=self.depth)

    def forward(self, x):
        H, W = x.shape[-2:]
        m = 2 ** self.depth
        if H % m or W % m:                             # odd sizes: pad right/bottom, crop the logits back
            x = F.pad(x, (0, -W % m, 0, -H % m), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()                                # the bottleneck, (B, width * 2**depth, H / m, W / m)
        for up, block in zip(self.up, self.dec):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)[..., :H, :W]


def soft_dice_loss(logits, target, eps=1.0):
    """1 - soft Dice per image (probabilities, not thresholded), averaged over the batch. Per image,
    so a small lung counts as much as a large one; eps keeps an empty mask's loss finite."""
    p, t = torch.sigmoid(logits.float()).flatten(1), target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def seg_loss(logits, target, bce_weight=1.0):
    """Dice + BCE: Dice fits the overlap whatever the lung's share of the image, BCE gives every
    pixel a gradient (Dice alone is slow to start from a random net). Returns (loss, parts)."""
    dice = soft_dice_loss(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce_weight * bce + dice, dict(dice_loss=dice.detach(), bce=bce.detach())


def dice_iou(pred, true):
    """Dice 2|P&T| / (|P| + |T|) and IoU |P&T| / |P|T| of binary masks, per image: (B, ...) ->
    two (B,) float tensors. Both masks empty counts as a perfect 1."""
    p, t = pred.bool().flatten(1), true.bool().flatten(1)
    inter, ps, ts = (p & t).sum(1).double(), p.sum(1).double(), t.sum(1).double()
    empty = (ps + ts) == 0
    dice = torch.where(empty, 1.0, 2 * inter / (ps + ts).clamp_min(1))
    iou = torch.where(empty, 1.0, inter / (ps + ts - inter).clamp_min(1))
    return dice, iou


def label_components(mask, connectivity=8):
    """Connected components of a binary (H, W) array (numpy or a CPU tensor): (labels (H, W) int32, 0 = background
    and 1..n largest first, areas (n,) int64 in that order). By runs: every row's runs of foreground pixels are the
    nodes, runs in adjacent rows that touch (overlap, or meet at a corner with connectivity 8) are joined in a
    union-find. A lung mask has about two runs per row: about 1 ms for 256 x 256 (20 ms for noise), without scipy."""
    m = np.asarray(mask).astype(bool)
    H, W = m.shape
    d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, start = np.nonzero(d == 1)                   # row-major order: runs sorted by (row, start)
    end = np.nonzero(d == -1)[1]                       # exclusive end, paired with start in the same order
    n = len(rows)
    if n == 0:
        return np.zeros((H, W), np.int32), np.zeros(0, np.int64)
    # runs of row r - 1 touching run b of row r: a contiguous range [lo, hi) found by bisection on
    # keys row * (W + 2) + column, increasing over all runs
    stride, corner = W + 2, int(connectivity == 8)
    lo = np.searchsorted(rows * stride + end, (rows - 1) * stride + start + 1 - corner, side="left")
    hi = np.searchsorted(rows * stride + start, (rows - 1) * stride + end - 1 + corner, side="right")
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]              # path halving
            a = parent[a]
        return a

    for b in np.nonzero(hi > lo)[0].tolist():
        for a in range(lo[b], hi[b]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    root = np.array([find(a) for a in range(n)])
    _, comp = np.unique(root, return_inverse=True)
    area = np.bincount(comp, weights=end - start).astype(np.int64)
    order = np.argsort(-area, kind="stable")           # relabel largest first
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels = np.zeros((H, W), np.int32)
    lengths = end - start
    cols = np.repeat(start, lengths) + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels[np.repeat(rows, lengths), cols] = np.repeat(rank[comp] + 1, lengths)
    return labels, area[order]


def fill_holes(mask):
    """Fill the holes of a binary (H, W) mask: background regions that do not reach the border
    (4-connected, the complement of 8-connected foreground) become foreground. Bool numpy array."""
    m = np.asarray(mask).astype(bool)
    labels, _ = label_components(~m, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return m | ~np.isin(labels, edge)


# ----------------------------------------------------------------------------- training

def cosine_lr(step, total, warmup, base, min_lr=0.0):
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def split_by_radiograph(x, val_count, seed):
    """(train, val) index lists, seeded; images with identical pixels (one radiograph filed under two
    ids: OpenIST has one such pair) go to the same side, so val never scores a memorised image."""
    groups = {}
    for i, img in enumerate(x.numpy()):
        groups.setdefault(hashlib.sha1(img.tobytes()).digest(), []).append(i)
    groups = list(groups.values())
    val = []
    for g in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(val) >= val_count:
            break
        val += groups[g]
    return sorted(set(range(len(x))) - set(val)), sorted(val), sum(len(g) - 1 for g in groups)


def augment(x, m, args, mean, std):
    """Radiograph augmentation of a uint8 batch and its masks (B, 1, S, S), on their device: one
    random affine per image (rotation, zoom, shift, optional mirror) resampling image and mask
    together in one grid_sample (the mask thresholded at 0.5), then gamma, contrast and brightness
    on the image alone. Returns normalised float images and {0, 1} float masks."""
    B, dev = x.shape[0], x.device
    u = lambda r: (torch.rand(B, device=dev) * 2 - 1) * r                   # uniform in [-r, r]
    a, s = u(args.rotate * math.pi / 180), 1 + u(args.scale)
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0) if args.hflip else torch.ones(B, device=dev)
    theta = torch.stack([torch.stack([a.cos() / s * flip, -a.sin() / s, u(2 * args.translate)], 1),
                         torch.stack([a.sin() / s * flip, a.cos() / s, u(2 * args.translate)], 1)], 1)
    both = torch.cat([x.float() / 255, m.float(), (x > 0).float()], 1)     # image, mask, image not padding
    grid = F.affine_grid(theta, both.shape, align_corners=False)
    both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)   # black, as padded
    img, mask = both[:, :1], (both[:, 1:2] > 0.5).float()
    img = img.clamp(0, 1) ** u(args.gamma).exp().view(B, 1, 1, 1)
    mu = img.mean((2, 3), keepdim=True)
    img = ((img - mu) * (1 + u(args.contrast)).view(B, 1, 1, 1) + mu + u(args.brightness).view(B, 1, 1, 1)).clamp(0, 1)
    if args.opacity:
        img = opacify(img, mask, args.opacity, args.opacity_kinds, within=both[:, 2:] > 0.5)
    return data.normalize(img, mean, std), mask


OPACITIES = ("blobs", "band", "side", "haze")


def opacity_kinds(text):
    """--opacity-kinds: a comma-separated list of OPACITIES."""
    kinds = [k for k in text.split(",") if k]
    if not kinds or set(kinds) - set(OPACITIES):
        raise argparse.ArgumentTypeError(f"{text!r}: choose one or more of {','.join(OPACITIES)}")
    return kinds


def opacify(img, mask, p, kinds=OPACITIES, within=None, grid=64):
    """Simulated opacities on a batch of radiographs in [0, 1] (B, 1, S, S) with their lung masks: each image,
    with probability p, is blended toward a bright level (soft tissue: an opaque lung looks like the heart) by a
    weight map of one kind, with a cloudy texture:
      blobs  3-10 soft patches centred in the lungs (consolidation, patchy infiltrates, nodules)
      band   the chest below a random height, across the whole width (effusions, basal consolidation)
      side   one side of the chest (a white lung: a large effusion, collapse)
      haze   a veil over the whole image (diffuse bilateral opacity: ARDS, oedema)
    The label stays the lung: the network has to find lungs it cannot see from the ribs, heart and diaphragm
    around them. No edge follows the lung outline, so the opacity itself never gives the answer away; `within`
    (bool, like img) keeps it off the black padding."""
    B, dev = img.shape[0], img.device
    r = lambda *shape: torch.rand(*shape, device=dev)
    yy, xx = torch.meshgrid(*(torch.linspace(0, 1, grid, device=dev),) * 2, indexing="ij")
    # blobs: centres drawn from the lung pixels (anywhere when an image has none)
    where = F.adaptive_max_pool2d(mask, grid).flatten(1) + 1e-4
    idx = torch.multinomial(where, 10, replacement=True)                            # (B, 10)
    cy, cx = ((idx // grid + r(B, 10)) / grid)[..., None, None], ((idx % grid + r(B, 10)) / grid)[..., None, None]
    sigma = (0.03 + 0.12 * r(B, 10))[..., None, None]
    amp = (0.4 + 0.6 * r(B, 10)) * (torch.arange(10, device=dev) < 3 + 8 * r(B, 1))  # 3 to 10 blobs
    blobs = (amp[..., None, None] * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))).sum(1)
    soft = (0.01 + 0.06 * r(B))[:, None, None]
    band = torch.sigmoid((yy - (0.4 + 0.5 * r(B))[:, None, None]) / soft)
    edge, sign = (0.4 + 0.2 * r(B))[:, None, None], torch.where(r(B) < 0.5, -1, 1)[:, None, None]   # left or right
    side = torch.sigmoid((xx - edge) / soft * sign)
    haze = (0.2 + 0.4 * r(B))[:, None, None].expand(-1, grid, grid)
    maps = dict(blobs=blobs, band=band, side=side, haze=haze)
    stack = torch.stack([maps[k] for k in kinds], 1)                                 # (B, kinds, g, g)
    kind = torch.randint(0, len(kinds), (B,), device=dev)
    w = stack[torch.arange(B, device=dev), kind] * (0.5 + 0.5 * r(B))[:, None, None]
    cloud = F.interpolate(r(B, 1, grid // 8, grid // 8), size=(grid, grid), mode="bicubic", align_corners=False)
    w = (w[:, None] * (0.6 + 0.4 * cloud)).clamp(0, 1) * (r(B) < p)[:, None, None, None]
    w = F.interpolate(w, size=img.shape[-2:], mode="bilinear", align_corners=False)
    level = (0.55 + 0.4 * r(B))[:, None, None, None]
    return img + w * (level - img) * (within if within is not None else 1)


def equalize(x):
    """Histogram equalisation of each uint8 image (B, 1, H, W), over its pixels above 0 (0 is the padding, kept
    black): contrast and exposure spread the same way whatever the hospital's processing."""
    B = x.shape[0]
    counts = torch.bincount((x.long() + 256 * torch.arange(B, device=x.device).view(B, 1, 1, 1)).flatten(),
                            minlength=256 * B).view(B, 256).double()
    counts[:, 0] = 0
    lut = (counts.cumsum(1) / counts.sum(1, keepdim=True).clamp_min(1) * 255).round().to(torch.uint8)
    lut[:, 0] = 0
    return torch.gather(lut, 1, x.long().flatten(1)).view_as(x)


def postprocess(mask, k=2):
    """The thesis' post-processed mask: the k largest 8-connected components of a binary (H, W)
    mask (stray blobs dropped; pixels touching at a corner belong together), their holes filled; bool numpy."""
    labels, _ = label_components(mask)
    return fill_holes((labels > 0) & (labels <= k))


@torch.no_grad()
def evaluate(model, x, m, mean, std, device, amp, batch_size):
    """Val Dice and IoU per radiograph at the training size, of the post-processed masks (what
    predict writes) and of the bare thresholded output."""
    model.eval()
    post, raw = [], []
    for i in range(0, len(x), batch_size):
        with amp:
            logits = model(data.normalize(x[i:i + batch_size].to(device), mean, std))
        pred = (logits.float() > 0).cpu()
        raw.append(dice_iou(pred, m[i:i + batch_size])[0])
        pp = torch.stack([torch.from_numpy(postprocess(p[0].numpy())) for p in pred])
        post.append(torch.stack(dice_iou(pp, m[i:i + batch_size, 0]), 1))
    model.train()
    post, raw = torch.cat(post).float(), torch.cat(raw).float()
    q = post.quantile(0.1, dim=0)
    return dict(dice=post[:, 0].mean().item(), dice_p10=q[0].item(), iou=post[:, 1].mean().item(),
                iou_p10=q[1].item(), dice_raw=raw.mean().item())


def resume(raw_model, opt, path, explicit, args):
    """Load model and optimiser from a checkpoint: (step, best val Dice), (0, -1) without one. One trained with other
    settings (a changed flag, or default since) stops the run: continuing it would mix two trainings."""
    if not os.path.exists(path):
        if explicit:
            raise SystemExit(f"error: --resume {path}: no such file")
        return 0, -1.0
    try:
        ckpt = read_checkpoint(path, "segment.py checkpoint")
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"error: {path} cannot be resumed ({str(e).splitlines()[0]}); delete it or choose another "
                         f"--output-dir")
    saved, now = ckpt.get("args", {}), vars(args)    # free: where and how fast it runs; a folder has many names
    free = {"output_dir", "resume", "device", "precision", "num_workers", "save_every", "max_steps", "cache_dir",
            "skip_bad", "data_dir", "masks"}
    if diff := {k: (saved[k], now[k]) for k in saved.keys() & now.keys() - free if saved[k] != now[k]}:
        raise SystemExit(f"error: {path} was trained with other settings ({diff}: saved, now); rerun with the saved "
                         f"ones to resume it, or choose another --output-dir")
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("best", -1.0)


def train(args):
    # ---- setup
    device = resolve_device(args.device)
    reuse_freed_memory(device)          # on a CPU; else every step faults its activations in again (1.9 -> 1.3 s)
    amp, precision = autocast(args.precision, device)
    out_dir = output_dir(args.output_dir)

    # ---- data: uint8 images and 0/1 masks at img_size, decoded once by data.py (and cached)
    opts = dict(data.data_options(args), split_fractions=(1.0, 0.0, 0.0))     # all of it: split below
    try:
        ds = data.build_dataset("dicom", "train", data_dir=args.data_dir, img_size=args.img_size, seed=args.seed,
                                num_workers=args.num_workers, **opts)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    val_count = round(0.2 * len(ds)) if args.val_count is None else args.val_count
    tr, va, dups = split_by_radiograph(ds.x, val_count, args.seed)
    x, m, xv, mv = ds.x[tr], ds.masks[tr], ds.x[va], ds.masks[va]
    if args.equalize:                                  # every image's histogram spread out alike (lungVAE's step)
        x, xv = equalize(x), equalize(xv)
    try:
        mean, std = data.channel_stats(x, f"the training images under {args.data_dir}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    steps_per_epoch = len(x) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(x)} training images are fewer than one batch (--batch-size {args.batch_size})")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    shapes = torch.stack([shape_code(v > 0) for k in m for v in (k[0].numpy(), k[0].numpy()[:, ::-1])])  # shape_code
    if device.type == "cuda":
        x, m = x.to(device), m.to(device)

    # ---- model and optimiser: AdamW, no decay on norms and biases (models.param_groups)
    torch.manual_seed(args.seed)
    raw_model = UNet(in_chans=1, width=args.width, depth=args.depth).to(device)
    opt = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=args.lr, fused=True)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"U-Net width {args.width} depth {args.depth} ({n_params / 1e6:.2f}M params) | {args.img_size}px | "
          f"{device} {precision} | {len(x)} train, {len(xv)} val radiographs ({dups} duplicate image(s) kept "
          f"with their twin) | mean {mean[0]:.3f} std {std[0]:.3f}")
    print(f"batch {args.batch_size} | lr {args.lr:g} | {steps_per_epoch} steps/epoch x {args.epochs} epochs = "
          f"{total_steps} steps, warm-up {warmup_steps}")

    # ---- resume
    step, best = resume(raw_model, opt, args.resume or os.path.join(out_dir, "ckpt.pt"), args.resume, args)
    with open(os.path.join(out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    state = lambda: dict(model=raw_model.state_dict(), opt=opt.state_dict(), step=step, epoch=step // steps_per_epoch,
                         args=vars(args), unet_config=raw_model.config(), best=best,
                         data=dict(img_size=args.img_size, mean=list(mean), std=list(std), keep_aspect=args.keep_aspect,
                                   equalize=args.equalize, window_percentile=args.window_percentile),
                         val_ids=[ds.ids[i] for i in va], shapes=shapes)

    # ---- loop
    raw_model.train()
    max_steps = min(args.max_steps or total_steps, total_steps)
    start_epoch, first = divmod(step, steps_per_epoch)
    t_saved, stats = time.time(), {}
    with Preemption() as stop:              # SIGTERM, SIGUSR1, SIGINT: save at this step, exit
        for epoch in range(start_epoch, args.epochs):
            if step >= max_steps:
                break
            skip = first if epoch == start_epoch else 0          # steps of this epoch done before a resume
            batches = data.epoch_batches(len(x), args.batch_size, epoch, args.seed, start=skip)
            loss_sum, n_sum, t_epoch = 0.0, 0, time.time()
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"ep {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                       leave=False)
            while step < max_steps and step < (epoch + 1) * steps_per_epoch:
                lr_now = cosine_lr(step, total_steps, warmup_steps, args.lr, args.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr_now
                torch.manual_seed(args.seed * 1_000_003 + step)      # augmentation from (seed, step): exact resumes
                idx = next(batches).to(x.device)
                img, mask = augment(x[idx].to(device), m[idx].to(device), args, mean, std)
                with amp:
                    logits = raw_model(img)
                loss, _ = seg_loss(logits, mask, args.bce_weight)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_now = loss.item()                           # a small net: reading it every step costs nothing
                if not math.isfinite(loss_now):
                    raise SystemExit(f"error: loss is {loss_now} at step {step}: stopping; the last checkpoint in "
                                     f"{out_dir} is untouched. Lower --lr or use --precision fp32")
                loss_sum, n_sum = loss_sum + loss_now, n_sum + 1
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_now:.4f} lr {lr_now:.2e}")
                halt = stop() and step % steps_per_epoch and step < max_steps     # an epoch's end saves below
                if halt or (step % steps_per_epoch and time.time() - t_saved >= 60 * args.save_every):
                    save_checkpoint(state(), os.path.join(out_dir, "ckpt.pt"))
                    t_saved = time.time()
                if halt:
                    bar.close()
                    stop.exit(f"step {step}", os.path.join(out_dir, "ckpt.pt"))
            bar.close()

            # ---- end of epoch: val Dice / IoU, log, save (best.pt when the val Dice improves)
            seconds = time.time() - t_epoch
            stats = dict(epoch=epoch + 1, step=step, loss=loss_sum / max(n_sum, 1), lr=lr_now,
                         img_per_s=n_sum * args.batch_size / seconds, seconds=round(seconds, 2))
            if len(xv):
                stats.update(evaluate(raw_model, xv, mv, mean, std, device, amp, args.batch_size))
            improved = not len(xv) or stats["dice"] > best
            best = stats["dice"] if len(xv) and improved else best
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(stats) + "\n")
            save_checkpoint(state(), os.path.join(out_dir, "ckpt.pt"))
            if improved:
                save_checkpoint(state(), os.path.join(out_dir, "best.pt"))
            t_saved = time.time()
            if stop() and step < max_steps:
                stop.exit(f"step {step}", os.path.join(out_dir, "ckpt.pt"))
    return dict(stats, step=step, best=best, out_dir=out_dir)


def unfit_square(prob, h, w, keep_aspect=True):
    """The inverse of data.fit_square's geometry for an (S, S) map: crop the padding, then resize
    bilinearly to the image's (h, w). Thresholding the resized probability gives smooth outlines at
    the original resolution, not the staircase of an upscaled binary mask."""
    S = prob.shape[-1]
    if keep_aspect:                                          # fit_square's arithmetic, to the pixel
        s = S / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        top, left = (S - nh) // 2, (S - nw) // 2
        prob = prob[top:top + nh, left:left + nw]
    return F.interpolate(prob[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


VIEWS = ((1.1, 0, 0), (0.9, 0, 0), (1, 0.06, 0), (1, -0.06, 0), (1, 0, 0.06), (1, 0, -0.06))   # zoom, shift


def warp(x, zoom, dx, dy, back=False):
    """A batch (B, C, S, S) zoomed by `zoom` and shifted by (dx, dy) (fractions of the half-side), as a view for
    the doubt score; back=True undoes it, for the probabilities predicted on the view."""
    a = [[1 / zoom, 0, dx], [0, 1 / zoom, dy]] if not back else [[zoom, 0, -dx * zoom], [0, zoom, -dy * zoom]]
    grid = F.affine_grid(torch.tensor(a, device=x.device).expand(len(x), 2, 3), x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def convex_hulls(mask):
    """Every component of a bool (H, W) mask filled to its convex hull (--hull): a lung then fills the heart's notch
    and the costophrenic angles, part of the way to the whole lung that some radiologists draw."""
    def half(points):                                    # Andrew's monotone chain: one side of the hull
        h = []
        for p in points:
            while len(h) >= 2 and (h[-1][0] - h[-2][0]) * (p[1] - h[-2][1]) <= \
                    (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0]):
                h.pop()
            h.append(p)
        return h[:-1]
    labels, areas = label_components(mask)
    out = np.zeros_like(mask)
    for k in range(1, len(areas) + 1):
        ys, xs = np.nonzero(labels == k)                 # row-major: each row's first and last pixel bound it
        ends = np.r_[True, ys[1:] != ys[:-1]] | np.r_[ys[1:] != ys[:-1], True]
        pts = sorted(set(zip(xs[ends].tolist(), ys[ends].tolist())))
        hull = half(pts) + half(pts[::-1]) or pts
        yy, xx = np.mgrid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        inside = np.ones(yy.shape, bool)
        for (ax, ay), (bx, by) in zip(hull, hull[1:] + hull[:1]):
            inside &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
        out[ys.min():ys.max() + 1, xs.min():xs.max() + 1] |= inside
    return out


def shape_code(mask, grid=32):
    """A bool (H, W) mask's bounding box resized to (grid, grid), flattened: its shape, whatever its size and place.
    train keeps the training masks' codes and their mirror images' (a flipped radiograph's lungs are lungs) in the
    checkpoint; predict compares each mask's code with them."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return torch.zeros(grid * grid, dtype=torch.bool)
    box = torch.from_numpy(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32))[None, None]
    return (F.interpolate(box, size=(grid, grid), mode="bilinear", antialias=True) > 0.5).flatten()


def judge(mask, prob, doubt, shapes, args):
    """One masks.csv row: lung fraction, confidence (mean probability inside the mask), components, doubt (1 - Dice
    of the mask and those of the image zoomed or shifted a little, averaged), shape (1 - Dice of its shape_code and
    the closest training mask's: a mask stopped by an opacity is no normal lung's shape) and why it looks wrong."""
    _, areas = label_components(mask)
    frac, conf = mask.mean(), float(prob[mask].mean()) if mask.any() else 0.0
    code = shape_code(mask, round(shapes.shape[1] ** 0.5)) if shapes is not None else None
    shape = "" if code is None else round(1 - dice_iou(shapes, code.expand_as(shapes))[0].max().item(), 4)
    why = {"doubtful": doubt > args.max_doubt, "odd shape": len(areas) and shape != "" and shape > args.max_shape,
           "empty": not len(areas), "one lung": len(areas) and args.components >= 2 and
           (len(areas) < 2 or areas[1] < args.min_ratio * areas[0]), "small": 0 < frac < args.min_area,
           "large": frac > args.max_area, "unsure": len(areas) and conf < args.min_confidence}
    return dict(lung_fraction=round(float(frac), 4), confidence=round(conf, 4), components=len(areas),
                doubt=round(doubt, 4), shape=shape, flag=";".join(k for k, v in why.items() if v))


def outline(mask, size):
    """A binary mask fitted to (size, size) as data.py fits it, and its one-pixel outline."""
    m = data.fit_square(mask.astype(np.float32), size, nearest=True) > 0
    p = np.pad(m, 1)                                         # m eroded by one pixel: the outline is m minus it
    return m, m & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])


def overlay_tile(img, mask, title, flagged, size=192, reference=None):
    """A radiograph (float (H, W)) with its mask tinted green and outlined, red (yellow: flagged), titled;
    a reference mask, if given, outlined in blue."""
    from PIL import Image, ImageDraw
    m, edge = outline(mask, size)
    rgb = np.repeat(data.fit_square(img, size)[..., None].astype(np.float32), 3, -1)
    rgb[m] = rgb[m] * 0.7 + np.array([0, 255, 0]) * 0.3
    rgb[edge] = (255, 255, 0) if flagged else (255, 0, 0)
    if reference is not None:
        rgb[outline(reference, size)[1]] = (60, 120, 255)
    tile = Image.fromarray(rgb.astype(np.uint8))
    ImageDraw.Draw(tile).text((3, 2), title, fill=(255, 255, 0) if flagged else (255, 255, 255))
    return tile


def reference_mask(folder, i, shape):
    """The known mask <i>.png in folder as a bool array (None without one); SystemExit if its size differs."""
    from PIL import Image
    path = os.path.join(folder, i + ".png") if folder else None
    if path is None or not os.path.isfile(path):
        return None
    with Image.open(path) as m:
        ref = np.asarray(m.convert("L")) > 0
    if ref.shape != tuple(shape):
        raise SystemExit(f"error: --reference mask {path} is {ref.shape[1]}x{ref.shape[0]}, its image "
                         f"{shape[1]}x{shape[0]}")
    return ref


@torch.no_grad()
def predict(args):
    # ---- setup: the U-Net and the preprocessing it was trained with, from the checkpoint
    from PIL import Image
    device = resolve_device(args.device)
    reuse_freed_memory(device)
    amp, precision = autocast(args.precision, device)
    try:
        ckpt = read_checkpoint(args.checkpoint, "segment.py checkpoint")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if "unet_config" not in ckpt:
        raise SystemExit(f"error: {args.checkpoint} is not a segment.py checkpoint (no unet_config)")
    model = UNet(**ckpt["unet_config"]).to(device).eval()
    model.load_state_dict(ckpt["model"])                     # strict: a mismatch fails loudly
    d = ckpt["data"]
    size, keep_aspect = d["img_size"], d["keep_aspect"]      # the geometry the U-Net learnt
    if (shapes := ckpt.get("shapes")) is None:               # the training masks' shape codes, for judge
        print(f"note: {args.checkpoint} holds no training shapes (trained before they were kept): no shape score")
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                              "masks_" + os.path.basename(os.path.normpath(args.data_dir)))
    if os.path.abspath(out_dir) == os.path.abspath(args.data_dir):
        raise SystemExit(f"error: --output-dir {out_dir} is --data-dir: the masks would mix with the radiographs")

    # ---- data: every radiograph under --data-dir (not the output folder, should it lie inside)
    try:   # list_xrays leaves its cache_dir out of the search; here that is the masks we write
        files, ids, _ = data.list_xrays(args.data_dir, cache_dir=out_dir)
        labels = data.read_label_csv(args.labels, args.id_column, args.label_column, None) if args.labels else None
    except (OSError, ValueError, csv.Error) as e:
        raise SystemExit(f"error: {e}")
    output_dir(out_dir)
    print(f"{len(files)} images under {args.data_dir} -> {out_dir} | U-Net {ckpt['unet_config']} at {size}px | "
          f"{device} {precision}")

    def decode(f):
        try:
            return data.read_radiograph(f, args.window_percentile), None
        except ValueError as e:
            return None, str(e)

    # ---- loop: decode a batch on threads, segment it, post-process and write each mask at its image's size
    rows, bad, tiles, t0 = [], [], {"flagged": [], "ok": []}, time.time()
    with ThreadPoolExecutor(max(args.num_workers, 1)) as pool:
        for b in tqdm(range(0, len(files), args.batch_size), desc="segmenting", unit="batch", leave=False):
            imgs, keep = [], []
            for k, (img, why) in zip(range(b, b + args.batch_size), pool.map(decode, files[b:b + args.batch_size])):
                if img is None:
                    if not args.skip_bad:
                        raise SystemExit(f"error: {why} (--skip-bad to list it and go on)")
                    bad.append(why)
                    continue
                imgs.append(img), keep.append(k)
            if not imgs:
                continue
            x = torch.from_numpy(np.stack([data.fit_square(i, size, keep_aspect) for i in imgs]))[:, None]
            x = data.normalize((equalize(x) if d.get("equalize") else x).to(device), d["mean"], d["std"])
            with amp:                                    # the image, then the same image zoomed and shifted
                probs = torch.sigmoid(model(torch.cat([x] + [warp(x, *v) for v in VIEWS[:args.tta]])).float())
            probs = probs.split(len(x))
            t = args.threshold
            seen = [dice_iou(probs[0] > t, warp(p, *v, back=True) > t)[0] for p, v in zip(probs[1:], VIEWS)]
            doubts = 1 - torch.stack(seen).mean(0) if seen else torch.zeros(len(x))
            for img, k, prob, doubt in zip(imgs, keep, probs[0][:, 0].cpu(), doubts.tolist()):
                prob = unfit_square(prob, *img.shape, keep_aspect).numpy()
                mask = postprocess(prob > args.threshold, args.components)
                row = dict(id=ids[k], file=os.path.relpath(files[k], args.data_dir), height=img.shape[0],
                           width=img.shape[1], **judge(mask, prob, doubt, shapes, args))  # the mask, unhulled
                mask = convex_hulls(mask) if args.hull else mask
                Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_dir, ids[k] + ".png"))
                if labels is not None:
                    row["label"] = labels.get(ids[k], ("",))[0]
                ref = reference_mask(args.reference, ids[k], img.shape)
                if ref is not None:
                    dice, iou = dice_iou(torch.from_numpy(mask)[None], torch.from_numpy(ref)[None])
                    row.update(dice=round(float(dice), 4), iou=round(float(iou), 4))
                rows.append(row)
                kind = "flagged" if row["flag"] else "ok"
                if len(tiles[kind]) < args.grid:             # keep only the tiles the grid can show
                    title = f"{ids[k]}: {row['flag'] or round(row['lung_fraction'], 2)}"
                    tiles[kind].append(overlay_tile(img, mask, title, bool(row["flag"])))
    seconds = time.time() - t0

    # ---- report: masks.csv, overlay.png, and the flagged images by name
    with open(os.path.join(out_dir, "masks.csv"), "w", newline="") as f:
        columns = ["id", "file", "height", "width", "lung_fraction", "confidence", "components", "doubt", "shape",
                   "flag"] + (["label"] if labels is not None else []) + (["dice", "iou"] if args.reference else [])
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    name = "overlay"
    while name in ids:                                       # never shadow an image's mask
        name = "_" + name
    shown = (tiles["flagged"] + tiles["ok"])[:args.grid]
    if shown:                                                # 4 per row, 1 px white between
        S, cols, rows_ = shown[0].size[0], min(4, len(shown)), math.ceil(len(shown) / 4)
        grid = Image.new("RGB", (cols * (S + 1) - 1, rows_ * (S + 1) - 1), (255, 255, 255))
        for k, tile in enumerate(shown):
            grid.paste(tile, ((k % 4) * (S + 1), (k // 4) * (S + 1)))
        grid.save(os.path.join(out_dir, name + ".png"))
    flagged = [r for r in rows if r["flag"]]
    print(f"wrote {len(rows)} masks in {seconds:.1f} s: {len(rows) / max(seconds, 1e-9):.1f} images/s, decoding "
          f"included | masks.csv, {name}.png")
    for why in bad:
        print(f"skipped: {why}")
    scored = sorted((r for r in rows if "dice" in r), key=lambda r: r["dice"])
    if scored:                                               # against the reference masks: numbers and the worst
        dice = np.array([r["dice"] for r in scored])
        print(f"Dice against {args.reference}, {len(dice)} images: mean {dice.mean():.4f}, 10th percentile "
              f"{np.quantile(dice, 0.1):.4f}, min {dice.min():.4f} | IoU mean {np.mean([r['iou'] for r in scored]):.4f}"
              f" | worst: " + ", ".join(f"{r['id']} {r['dice']:.3f}" for r in scored[:5]))
        worst = [overlay_tile(data.read_radiograph(os.path.join(args.data_dir, r["file"]), args.window_percentile),
                              np.asarray(Image.open(os.path.join(out_dir, r["id"] + ".png"))) > 0,
                              f"{r['id']}: Dice {r['dice']:.3f}", bool(r["flag"]), 256,
                              reference_mask(args.reference, r["id"], (r["height"], r["width"])))
                 for r in scored[:5]]
        strip = Image.new("RGB", (len(worst) * 257 - 1, 256), (255, 255, 255))
        for k, tile in enumerate(worst):
            strip.paste(tile, (k * 257, 0))
        strip.save(os.path.join(out_dir, "_worst.png" if "worst" in ids else "worst.png"))
        groups = {}
        for r in scored if labels is not None else []:
            groups.setdefault(r["label"] or "(no label)", []).append(r)
        with open(os.path.join(out_dir, "dice.csv"), "w", newline="") as f:   # per label: a finding, a source
            w = csv.writer(f)
            w.writerow(["label", "images", "dice_mean", "dice_p10", "dice_min", "flagged"])
            for g, rs in [("all", scored)] + sorted(groups.items()):
                d = np.array([r["dice"] for r in rs])
                w.writerow([g, len(d), round(d.mean(), 4), round(np.quantile(d, 0.1), 4), round(d.min(), 4),
                            sum(bool(r["flag"]) for r in rs)])
    elif args.reference:
        print(f"no mask in --reference {args.reference} is named as an image here (<id>.png): no Dice, no dice.csv")
    if labels is not None and (missing := sum(not r["label"] for r in rows)):
        print(f"{missing} of {len(rows)} images have no row in --labels {args.labels}: their label is left empty")
    if flagged:
        print(f"{len(flagged)} flagged (written anyway; look at them before using them):")
        for r in flagged[:30]:
            print(f"  {r['id']}: {r['flag']} (shape {r['shape'] or '-'}, doubt {r['doubt']})")
        if len(flagged) > 30:
            print(f"  ... and {len(flagged) - 30} more in masks.csv")
    return dict(out_dir=out_dir, rows=rows, bad=bad, seconds=seconds)


def main(args):
    return train(args) if args.mode == "train" else predict(args)


if __name__ == "__main__":
    main(get_args())
