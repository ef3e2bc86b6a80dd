"""Curricular self-supervised learning (SPEC section 4, the thesis 004): one backbone is trained on an ordered list
of pretext tasks, each with its own head (dropped after its stage, the backbone kept), then a classifier. Every stage,
the classifier included, searches its learning rate: a short run per value of a grid from the same starting weights,
scored on a validation split; the best run is continued to the full length.

    python curriculum.py --backbone resnet18 --stages rotation,relloc --epochs 2 --search-epochs 1 \\
        --cls-epochs 2 --cls-search-epochs 1 --lr-grid 0.01,0.1 --max-train 500 --device cpu   # CPU, minutes
    python curriculum.py --backbone resnet50 --stages moco,swav,relloc --dataset dicom --data-dir DCM \\
        --labels labels.csv --masks MASKS --variant seg-black --img-size 224          # one GPU, the thesis' row
    python curriculum.py --backbone vit_tiny --patch-size 4 --stages mae,rotation --dataset cifar10

Stages: rotation, relloc, moco, swav, simclr, byol, dino (any backbone), mae, dsmae (ViT backbones); --stages ""
trains the classifier from scratch. Each stage writes <output-dir>/<stages so far>/: trials.json (the score of every
lr), final.pt (the backbone after the stage; for the classifier the whole model, readable by models.load_classifier).
Stage folders are named by the prefix of stages, so runs sharing --output-dir share finished prefixes (rotation, then
rotation-relloc reuses it). Rerunning a command resumes at the first unfinished stage or lr trial, at the step where a
signal stopped it. One row per run is appended to --results (CSV), and the whole file printed as a table.
"""
import argparse
import csv
import json
import math
import os
import time
from datetime import date

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from models import (DSMAE, EMA, MAE, MODELS, RESNETS, Preemption, ViT, autocast, build_resnet, ema_momentum, output_dir,
                    evaluate, extract_features, knn_predict, param_groups, per_class_accuracy, resolve_device,
                    reuse_freed_memory, save_checkpoint)

PRETEXT = ("rotation", "relloc", "moco", "swav", "simclr", "byol", "dino", "mae", "dsmae")
LR_GRID = data.Number(float, "[0, inf)", items=True)      # 0: a control that cannot learn


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--output-dir", default=None, help="default: runs/curriculum_<dataset>_<variant>_<backbone>")
    p.add_argument("--results", default=None, help="CSV the run's row is added to (default: <output-dir>/results.csv)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4)
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--backbone", default="resnet18", choices=RESNETS + tuple(MODELS),
                   help="torchvision ResNet (random init; CIFAR stem, 3x3 conv stride 1 and no max-pool, when "
                   "--img-size <= 64, ImageNet stem above) or a ViT of models.py")
    p.add_argument("--img-size", type=data.POS_INT, default=32)
    p.add_argument("--patch-size", type=data.POS_INT, default=4, help="ViT backbones only")
    p.add_argument("--stages", default="rotation,relloc", help=f"comma-separated, in order, from {', '.join(PRETEXT)}")
    p.add_argument("--batch-size", type=data.Number(int, "[2, inf)"), default=32, help="thesis (Table 4.3): rotation "
                   "16 (x4 angles), relloc 32, MoCo 32, SwAV 8, classification 64")
    p.add_argument("--epochs", type=data.POS_INT, default=30, help="per pretext stage, search included (thesis 30)")
    p.add_argument("--search-epochs", type=data.POS_INT, default=20, help="epochs of each lr trial (thesis 20)")
    p.add_argument("--cls-epochs", type=data.POS_INT, default=150, help="classification epochs (thesis 150)")
    p.add_argument("--cls-search-epochs", type=data.POS_INT, default=70, help="thesis 70")
    p.add_argument("--cls-batch-size", type=data.Number(int, "[2, inf)"), default=64)
    p.add_argument("--lr-grid", type=LR_GRID, default="0.01,0.058,0.106,0.155,0.203,0.25", help="SGD (thesis: these 6)")
    p.add_argument("--lars-lr-grid", type=LR_GRID, default="0.3,0.6,1.2", help="LARS (SwAV): lr * 0.001 * |w| / |g|")
    p.add_argument("--adamw-lr-grid", type=LR_GRID, default="1.5e-4,5e-4,1.5e-3", help="AdamW (mae, dsmae)")
    p.add_argument("--cls-lr-grid", type=LR_GRID, default=None, help="classification (default: --lr-grid)")
    p.add_argument("--opt", default="auto", choices=["auto", "sgd", "lars", "adamw"],
                   help="auto: the thesis' Table 4.3 (SGD momentum 0.9, wd 1e-4; LARS for SwAV), AdamW for MAE")
    p.add_argument("--search-metric", default="task", choices=["task", "knn"],
                   help="pretext trial score: task = accuracy (rotation, relloc) or minus the loss (the others) on "
                   "the validation split, as the thesis; knn = k-NN accuracy of the backbone (needs labels)")
    p.add_argument("--cls-mode", default="finetune", choices=["finetune", "linear"], help="linear: a frozen backbone")
    p.add_argument("--crop-scale", type=data.Number(float, "(0, 1]"), default=0.5, help="smallest random crop (0.5 for "
                   "X-rays; thesis: random crop + flip for every task)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips in every stage's views; --no-hflip where left and right differ")
    p.add_argument("--val-fraction", type=data.Number(float, "(0, 1)"), default=0.1, help="without a val split (all "
                   "but dicom): the last fraction of each class of train is held out as validation, deterministically")
    p.add_argument("--max-train", type=data.NONNEG_INT, default=0, help="this many training images, spaced (0: all)")
    p.add_argument("--max-val", type=data.NONNEG_INT, default=0, help="likewise for the validation split")
    # pretext settings (paper values, except sizes scaled down for small data)
    p.add_argument("--proj-dim", type=data.POS_INT, default=128, help="projection width (MoCo v2, SimCLR, SwAV, BYOL)")
    p.add_argument("--temperature", type=data.POS, default=0.2, help="InfoNCE (MoCo v2 0.2, SimCLR)")
    p.add_argument("--moco-queue", type=data.POS_INT, default=4096, help="negatives (at most half the training images)")
    p.add_argument("--ema", type=data.Number(float, "[0, 1]"), default=0.99, help="key / target / teacher momentum "
                   "(MoCo constant; BYOL, DINO cosine to 1)")
    p.add_argument("--prototypes", type=data.POS_INT, default=100, help="SwAV prototypes (3000 on ImageNet)")
    p.add_argument("--swav-queue", type=data.POS_INT, default=8, help="SwAV feature queue, in batches (thesis: 8x)")
    p.add_argument("--dino-dim", type=data.POS_INT, default=1024, help="DINO output dimension (65536 on ImageNet)")
    p.add_argument("--relloc-gap", type=data.Number(float, "[0, 1)"), default=0.3, help="relloc: gap between patches "
                   "as a fraction of a cell (a third of the image); jitter is up to a third of the gap")
    p.add_argument("--mask-ratio", type=data.Number(float, "(0, 1)"), default=0.75, help="MAE (0.9 for X-rays)")
    p.add_argument("--decoder-dim", type=data.Number(int, "[4, inf)", multiple=4), default=128)
    p.add_argument("--decoder-depth", type=data.POS_INT, default=2)
    data.add_data_args(p)
    data.finish_parser(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- small helpers

# the schedule is written out in each script on purpose, so a script copies with models.py and data.py
def cosine_lr(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def mlp(dim, hidden, out, bn=False):
    """Projection MLP: Linear, [BatchNorm], ReLU, Linear (MoCo v2 / SimCLR; BYOL with BatchNorm)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden) if bn else nn.Identity(), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight matrix's step is scaled by trust * |w| / |g + wd w| (You et al.
    2017). Biases and norm parameters (1-D) take plain SGD steps without weight decay, as in SwAV."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, trust=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w, u = p.norm(), d.norm()
                    d = d * torch.where((w > 0) & (u > 0), g["trust"] * w / u, torch.ones_like(w))
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                p.add_(buf.mul_(g["momentum"]).add_(d), alpha=-g["lr"])


def optimizer_kind(stage, opt="auto"):
    """The thesis' Table 4.3: SGD, except LARS for SwAV; AdamW for MAE / DS-MAE (as pretrain.py)."""
    return opt if opt != "auto" else "lars" if stage == "swav" else "adamw" if stage in ("mae", "dsmae") else "sgd"


def make_optimizer(kind, model, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "lars":
        return LARS(params, lr)
    if kind == "adamw":       # MAE's: no decay on norms, biases and tokens (each group's lr_scale is 1, unused)
        return torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95))
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)   # thesis Table 4.3


# ----------------------------------------------------------------------------- pretext tasks

class Task(nn.Module):
    """A stage's head (and views, encoders, queues) on the shared backbone. forward(x uint8 (B, C, H, W), y) ->
    (loss, accuracy or None); step_done(step, total) after each optimiser step (EMA encoders, prototypes). Views: aug
    (random crop + flip, normalised), plain (resize + normalise). Validation: accuracy or minus loss, per `metric`."""
    metric = "loss"

    def __init__(self, aug, plain):
        super().__init__()
        self.aug, self.plain = aug, plain

    def step_done(self, step, total):
        pass


def rotate_batch(x):
    """Each image at 0, 90, 180 and 270 degrees: (4B, C, H, W) and labels (4B,) = the quarter turns."""
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)]), labels


class Rotation(Task):
    """RotNet (Gidaris et al. 2018): which of four rotations was applied. Every image goes in at all four
    angles, so each batch is balanced."""
    metric = "accuracy"

    def __init__(self, backbone, dim, aug, plain):
        super().__init__(aug, plain)
        self.backbone, self.head = backbone, nn.Linear(dim, 4)

    def forward(self, x, y=None):
        v, labels = rotate_batch(self.aug(x) if self.training else self.plain(x))
        logits = self.head(self.backbone(v)).float()
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def relloc_pairs(x, gap, jitter):
    """Doersch et al. 2015: the image is a 3x3 grid of cells of side c = S // 3; the centre cell's patch
    and one of its 8 neighbours' (label 0-7, row-major, centre skipped). A patch has side c - gap and
    sits gap // 2 + [-jitter, jitter] into its cell on each axis, so neighbouring patches are at least
    gap - 2 * jitter pixels apart and cannot be matched by continuing lines across an edge.
    Returns centre, neighbour (B, C, p, p), label (B,), corners (B, 2, 2): (row, col) of each patch."""
    B, C, S, _ = x.shape
    c = S // 3
    p, dev = c - gap, x.device
    assert p > 0 and gap - 2 * jitter > 0 and jitter <= gap // 2, f"gap {gap}, jitter {jitter} for {S} px"
    label = torch.randint(0, 8, (B,), device=dev)
    cells = torch.stack([torch.full_like(label, 4), label + (label >= 4)], 1)                 # (B, 2) in 0..8
    corners = torch.stack([cells // 3, cells % 3], -1) * c + gap // 2 + \
        torch.randint(-jitter, jitter + 1, (B, 2, 2), device=dev)                             # (B, 2, 2)
    r = corners[..., 0, None] + torch.arange(p, device=dev)                                     # (B, 2, p)
    q = corners[..., 1, None] + torch.arange(p, device=dev)
    b = torch.arange(B, device=dev)[:, None, None, None]
    patches = x[b, :, r[:, :, :, None], q[:, :, None, :]].permute(0, 1, 4, 2, 3)               # (B, 2, C, p, p)
    return patches[:, 0], patches[:, 1], label, corners


class RelLoc(Task):
    """Relative patch location: from the features of the centre patch and one neighbour, which of the 8
    neighbours it is. A ViT sees each patch resized to its image size; a ResNet sees it as it is."""
    metric = "accuracy"

    def __init__(self, backbone, dim, aug, plain, img_size, gap_fraction=0.3, vit=False):
        super().__init__(aug, plain)
        self.backbone = backbone
        self.gap = max(3, round(gap_fraction * (img_size // 3)))
        self.jitter, self.resize = self.gap // 3, img_size if vit else None
        self.head = nn.Sequential(nn.Linear(2 * dim, 512), nn.ReLU(inplace=True), nn.Linear(512, 8))

    def forward(self, x, y=None):
        a, b, labels, _ = relloc_pairs(self.aug(x) if self.training else self.plain(x), self.gap, self.jitter)
        v = torch.cat([a, b])
        if self.resize:
            v = F.interpolate(v, size=self.resize, mode="bilinear", align_corners=False)
        f = self.backbone(v)
        logits = self.head(torch.cat(f.chunk(2), dim=1)).float()
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def info_nce(q, k, negatives, temperature):
    """MoCo's InfoNCE: q, k (B, D) and negatives (K, D), all unit vectors; the positive is logit 0."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class MoCo(Task):
    """MoCo v2 (Chen et al. 2020): a query encoder (backbone + MLP), a key encoder that is its EMA, a FIFO
    queue of past keys as negatives. The key encoder runs in eval mode (models.EMA), so its BatchNorm
    uses running statistics: on one device that removes the batch-statistics leak that shuffle-BN exists
    to block."""

    def __init__(self, backbone, dim, aug, plain, proj_dim=128, queue=4096, temperature=0.2, ema=0.99):
        super().__init__(aug, plain)
        self.backbone, self.t, self.ema = backbone, temperature, ema
        self.projector = mlp(dim, dim, proj_dim)
        self.key = EMA(nn.Sequential(backbone, self.projector))
        self.register_buffer("queue", F.normalize(torch.randn(queue, proj_dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x, y=None):
        return self.contrast(self.aug(x), self.aug(x))

    def contrast(self, v_q, v_k):
        q = F.normalize(self.projector(self.backbone(v_q)).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key(v_k).float(), dim=1)
        loss = info_nce(q, k, self.queue.clone(), self.t)
        if self.training:                                   # FIFO: the oldest keys are overwritten first
            i = (self.ptr + torch.arange(len(k), device=k.device)) % len(self.queue)
            self.queue[i] = k
            self.ptr.copy_((self.ptr + len(k)) % len(self.queue))
        return loss, None

    def step_done(self, step, total):
        self.key.update(nn.Sequential(self.backbone, self.projector), self.ema)


@torch.no_grad()
def sinkhorn(scores, eps=0.05, iters=3):
    """SwAV's Sinkhorn-Knopp: codes (B, K) from scores (B, K), with each prototype given an equal share
    of the batch (column sums B / K, exact as iters grows) and each sample one unit (rows sum to 1)."""
    Q = torch.exp((scores.float() - scores.max()) / eps).T          # (K, B); the shift only aids range
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True) * K
        Q /= Q.sum(dim=0, keepdim=True) * B
    return (Q * B).T


class SwAV(Task):
    """SwAV (Caron et al. 2020), two views: codes of one view by Sinkhorn over the prototype scores
    (with a queue of past features once it is full: --swav-queue batches), predicted from the other.
    Prototypes are kept unit-norm. Multi-crop is left out."""

    def __init__(self, backbone, dim, aug, plain, proj_dim=128, prototypes=100, queue=256, temperature=0.1):
        super().__init__(aug, plain)
        self.backbone, self.t = backbone, temperature
        self.projector = mlp(dim, dim, proj_dim)
        self.prototypes = nn.Linear(proj_dim, prototypes, bias=False)
        self.step_done(0, 1)
        self.register_buffer("queue", torch.zeros(2, queue, proj_dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def forward(self, x, y=None):
        B = x.shape[0]
        z = F.normalize(self.projector(self.backbone(torch.cat([self.aug(x), self.aug(x)]))).float(), dim=1)
        scores = self.prototypes(z)                                          # (2B, K) cosines
        loss = 0.0
        for i in range(2):
            s = scores[i * B:(i + 1) * B].detach()
            if self.filled >= self.queue.shape[1]:
                s = torch.cat([s, self.prototypes(self.queue[i]).detach()])
            q = sinkhorn(s)[:B]                                              # codes of view i
            loss = loss - (q * F.log_softmax(scores[(1 - i) * B:(2 - i) * B] / self.t, dim=1)).sum(1).mean() / 2
        if self.training:                                                    # FIFO: newest first
            with torch.no_grad():
                self.queue.copy_(torch.cat([z.detach().view(2, B, -1), self.queue[:, :-B]], dim=1))
                self.filled += B
        return loss, None

    @torch.no_grad()
    def step_done(self, step, total):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


class SimCLR(Task):
    """SimCLR (Chen et al. 2020; slides 003): NT-Xent over 2B views, the other view of an image is the
    positive and the remaining 2B - 2 the negatives."""

    def __init__(self, backbone, dim, aug, plain, proj_dim=128, temperature=0.2):
        super().__init__(aug, plain)
        self.backbone, self.t = backbone, temperature
        self.projector = mlp(dim, dim, proj_dim)

    def forward(self, x, y=None):
        B = x.shape[0]
        z = F.normalize(self.projector(self.backbone(torch.cat([self.aug(x), self.aug(x)]))).float(), dim=1)
        sim = (z @ z.T / self.t).masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
        return F.cross_entropy(sim, torch.arange(2 * B, device=z.device).roll(B)), None


class BYOL(Task):
    """BYOL (Grill et al. 2020; slides 003): the online network (backbone, projector, predictor) predicts
    the target's projection of the other view, loss 2 - 2 cos; the target is the online EMA (momentum
    cosine from --ema to 1), in eval mode (see MoCo)."""

    def __init__(self, backbone, dim, aug, plain, proj_dim=128, ema=0.99):
        super().__init__(aug, plain)
        self.backbone, self.ema = backbone, ema
        self.projector = mlp(dim, 2 * dim, proj_dim, bn=True)
        self.predictor = mlp(proj_dim, 2 * dim, proj_dim, bn=True)
        self.target = EMA(nn.Sequential(backbone, self.projector))

    def forward(self, x, y=None):
        v = torch.cat([self.aug(x), self.aug(x)])
        p = self.predictor(self.projector(self.backbone(v)))
        with torch.no_grad():
            z = self.target(v).roll(x.shape[0], 0)                   # view 1 predicts view 2 and back
        return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean(), None

    def step_done(self, step, total):
        self.target.update(nn.Sequential(self.backbone, self.projector), ema_momentum(step, total, self.ema, 1.0))


class DINOHead(nn.Module):
    """MLP to a bottleneck, l2-normalised, then a linear layer with unit-norm rows (DINO's weight-normed
    last layer with its norm fixed at 1)."""

    def __init__(self, dim, out_dim, hidden=512, bottleneck=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.last, dim=-1).T


class DINO(Task):
    """DINO (Caron et al. 2021), the slides' Algorithm 1 without multi-crop: cross-entropy between the
    teacher's centred, sharpened output on one view and the student's on the other."""

    def __init__(self, backbone, dim, aug, plain, out_dim=1024, ema=0.99, t_student=0.1, t_teacher=0.04,
                 center_momentum=0.9):
        super().__init__(aug, plain)
        self.backbone, self.ema = backbone, ema
        self.ts, self.tt, self.cm = t_student, t_teacher, center_momentum
        self.head = DINOHead(dim, out_dim)
        self.teacher = EMA(nn.Sequential(backbone, self.head))
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, x, y=None):
        B = x.shape[0]
        v = torch.cat([self.aug(x), self.aug(x)])
        s = self.head(self.backbone(v)).float()
        with torch.no_grad():
            t = self.teacher(v).float()
            p_t = F.softmax((t - self.center) / self.tt, dim=1).roll(B, 0)    # view 1's target is view 2's
        loss = -(p_t * F.log_softmax(s / self.ts, dim=1)).sum(1).mean()
        if self.training:
            self.center.mul_(self.cm).add_(t.mean(0, keepdim=True), alpha=1 - self.cm)
        return loss, None

    def step_done(self, step, total):
        self.teacher.update(nn.Sequential(self.backbone, self.head), ema_momentum(step, total, self.ema, 1.0))


class Masked(Task):
    """MAE or DS-MAE from models.py with the backbone ViT as their encoder (the notes' first stage).
    mask_ratio is MAE's; DS-MAE keeps its own noise ratio (0.9 of the patches)."""

    def __init__(self, backbone, dim, aug, plain, method="mae", mask_ratio=0.75, decoder_dim=128, decoder_depth=2):
        super().__init__(aug, plain)
        self.model = MAE(backbone, decoder_dim=decoder_dim, decoder_depth=decoder_depth, mask_ratio=mask_ratio) \
            if method == "mae" else DSMAE(backbone, decoder_dim=decoder_dim, decoder_depth=decoder_depth)

    def forward(self, x, y=None):
        return self.model(self.aug(x))[0], None

    def step_done(self, step, total):
        if isinstance(self.model, DSMAE):
            self.model.update_teacher(ema_momentum(step, total))


class Classify(Task):
    """The last stage: the backbone with its own head (ResNet fc, ViT head) set to a new Linear, so the
    module saved is the classifier itself. linear=True freezes the backbone and keeps it in eval mode."""
    metric = "accuracy"

    def __init__(self, backbone, dim, aug, plain, num_classes=2, linear=False):
        super().__init__(aug, plain)
        self.model, self.linear = backbone, linear
        self.attr = "fc" if hasattr(backbone, "fc") else "head"
        setattr(backbone, self.attr, nn.Linear(dim, num_classes))
        if linear:
            backbone.requires_grad_(False)
            getattr(backbone, self.attr).requires_grad_(True)

    def train(self, mode=True):
        super().train(mode)
        if self.linear:
            self.model.eval()
        return self

    def forward(self, x, y):
        logits = self.model(self.aug(x) if self.training else self.plain(x)).float()
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def make_task(name, backbone, dim, aug, plain, args, batch_size, num_classes, n_train):
    """A fresh head (and views, encoders, queues) for stage `name` on the given backbone."""
    masked = dict(mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)
    cls, kw = dict(
        rotation=(Rotation, {}),
        relloc=(RelLoc, dict(img_size=args.img_size, gap_fraction=args.relloc_gap, vit=isinstance(backbone, ViT))),
        moco=(MoCo, dict(proj_dim=args.proj_dim, temperature=args.temperature, ema=args.ema,
                         queue=max(batch_size, min(args.moco_queue, n_train // 2)))),
        swav=(SwAV, dict(proj_dim=args.proj_dim, prototypes=args.prototypes, queue=args.swav_queue * batch_size)),
        simclr=(SimCLR, dict(proj_dim=args.proj_dim, temperature=args.temperature)),
        byol=(BYOL, dict(proj_dim=args.proj_dim, ema=args.ema)), dino=(DINO, dict(out_dim=args.dino_dim, ema=args.ema)),
        mae=(Masked, dict(masked, method="mae")), dsmae=(Masked, dict(masked, method="dsmae")),
        classify=(Classify, dict(num_classes=num_classes, linear=args.cls_mode == "linear")))[name]
    return cls(backbone, dim, aug, plain, **kw)


# ----------------------------------------------------------------------------- the stage runner: lr search, resume

class Pooled(nn.Module):
    """Any backbone's pooled features as a one-token sequence: models.extract_features reads ResNets as ViTs."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward_features(self, x):
        return self.backbone(x)[:, None]


def train_epochs(task, opt, ds, lr, e0, e1, epochs, batch_size, seed, device, amp, desc, stop, save, resumed=None):
    """Epochs e0..e1-1 of a cosine schedule over `epochs` (5% linear warm-up): a trial runs the first
    --search-epochs of the full run, so the best one continues on the same schedule. Crops, rotations
    and masks depend only on (seed, step): every lr of a grid sees the same views. After every step
    stop() is asked; when the run is told to stop, save(running state) writes it and the process exits.
    resumed: such a state, to continue from its step instead of e0's first."""
    steps = len(ds) // batch_size
    if steps == 0:
        raise SystemExit(f"error: {len(ds)} training images are fewer than one batch of {batch_size}")
    total, warmup = epochs * steps, max(1, epochs * steps // 20)
    loss, step = float("nan"), (resumed or {}).get("step", e0 * steps)
    task.train()
    for epoch in range(step // steps, e1):
        sums = torch.zeros((), device=device) + (resumed["loss_sum"] if resumed and epoch == step // steps else 0)
        bar = tqdm(data.epoch_batches(len(ds), batch_size, epoch, seed, start=step % steps), total=steps,
                   initial=step % steps, leave=False, desc=f"{desc} ep {epoch + 1}/{epochs}", dynamic_ncols=True)
        for idx in bar:
            torch.manual_seed(seed * 1_000_003 + step)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, warmup, lr)
            x = ds.x[idx].to(device)
            y = ds.y[idx].to(device) if ds.y is not None else None
            with amp:
                l, _ = task(x, y)
            l.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            task.step_done(step, total)
            sums += l.detach()
            step += 1
            if stop() and step < e1 * steps:           # mid-run: the state at this step, then exit
                bar.close()
                stop.exit(f"step {step}", save(dict(task=task.state_dict(), opt=opt.state_dict(), step=step,
                                          loss_sum=sums.item())))
        loss = sums.item() / steps
        if not math.isfinite(loss):
            raise SystemExit(f"error: {desc}: loss is {loss} in epoch {epoch + 1}; lower the learning rate")
    return loss


@torch.no_grad()
def score_task(task, backbone, train, val, metric, batch_size, device, amp):
    """Validation score of a trial, higher is better: mean per-class accuracy for the classifier; for a
    pretext task its accuracy (rotation, relloc) or minus its loss (the others), or the k-NN mean
    per-class accuracy of the backbone with metric "knn". Views drawn with a fixed seed."""
    if isinstance(task, Classify):
        return evaluate(task.model, val.x, val.y, task.plain, len(val.classes), amp)["mean_per_class"]
    if metric == "knn":
        keep = torch.linspace(0, len(train) - 1, min(2000, len(train))).long()
        ftr = extract_features(Pooled(backbone), train.x[keep], task.plain, device=device, amp=amp)[0]
        fva = extract_features(Pooled(backbone), val.x, task.plain, device=device, amp=amp)[0]
        pred = knn_predict(ftr, train.y[keep].to(device), fva, len(train.classes))
        return per_class_accuracy(pred, val.y.to(device), len(train.classes)).nanmean().item() * 100
    task.eval()
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for i in range(0, len(val), batch_size):
            x = val.x[i:i + batch_size].to(device)
            if len(x) < 2:
                continue
            with amp:
                loss, acc = task(x, None)
            total += (acc * 100 if task.metric == "accuracy" else -loss).item() * len(x)
            n += len(x)
    task.train()
    return total / n


# Flags that cannot change what a stage computes: where output goes, how fast and on what it runs (device and precision
# change results only as other hardware does: a stage begun on a GPU may end on a CPU); --stages names the folder.
NOT_CONFIG = ("output_dir", "results", "device", "precision", "num_workers", "cache_dir", "download", "stages")


def stage_config(args, name):
    """Every other flag: a finished stage or trial is reused only if all of them match. Pretext stages leave out the
    classifier's cls_* flags, which cannot change them, so runs differing only in the classifier share their pretext
    stages. Other stages' flags (--mask-ratio for rotation) stay: stricter than needed, but there is no list of which
    flag belongs to which stage to keep in step with get_args."""
    return {k: v for k, v in vars(args).items()
            if k not in NOT_CONFIG and (name == "classify" or not k.startswith("cls_"))}


def load_checked(path, wanted):
    """A saved stage, trial or running state; SystemExit unless it was made with these settings. A flag the
    stage's run did not have yet (added to get_args since) matches at its default, so new flags keep old runs."""
    state, defaults = torch.load(path, map_location="cpu", weights_only=True), vars(get_args([]))
    was = lambda k: state["config"].get(k, defaults.get(k))
    diff = {k: (was(k), v) for k, v in wanted.items() if was(k) != v}
    if diff:
        raise SystemExit(f"error: {path} was made with other settings ({diff}, saved vs now); use another --output-dir")
    return state


def stage_settings(name, args):
    """(optimiser, lr grid, epochs, search epochs, batch size) of a stage: the classifier has its own."""
    kind = optimizer_kind(name, args.opt)
    if name == "classify":
        return kind, args.cls_lr_grid or args.lr_grid, args.cls_epochs, args.cls_search_epochs, args.cls_batch_size
    grid = dict(sgd=args.lr_grid, lars=args.lars_lr_grid, adamw=args.adamw_lr_grid)[kind]
    return kind, grid, args.epochs, args.search_epochs, args.batch_size


def run_stage(name, sdir, backbone, dim, args, train, val, device, amp, stop, extra=None):
    """One stage: an lr trial per grid value from the backbone's current weights, the best continued to
    the stage's epochs; writes sdir/trials.json and sdir/final.pt (with `extra`), whose backbone weights it
    leaves loaded, then deletes the trial weights. A finished stage is read back; finished trials not rerun;
    a trial or continuation stopped by a signal (stop) resumes from sdir/running.pt at the step it stopped.
    Returns final.pt's dict and the task (for the classifier, task.model is the classifier)."""
    kind, grid, epochs, search_epochs, batch_size = stage_settings(name, args)
    cfg, final_path = stage_config(args, name), os.path.join(sdir, "final.pt")
    aug = lambda x: data.augment(x, args.img_size, train.mean, train.std, (args.crop_scale, 1.0), flip=args.hflip)
    plain = lambda x: data.preprocess(x, args.img_size, train.mean, train.std)
    head_attr = "fc" if hasattr(backbone, "fc") else "head"
    setattr(backbone, head_attr, nn.Identity())                      # the pretext backbone has no head
    start = {k: v.clone() for k, v in backbone.state_dict().items()}

    def fresh(lr):
        setattr(backbone, head_attr, nn.Identity())
        backbone.load_state_dict(start)
        torch.manual_seed(args.seed)                                  # the same head for every lr
        task = make_task(name, backbone, dim, aug, plain, args, batch_size, len(train.classes), len(train))
        return task.to(device), make_optimizer(kind, task, lr)

    running_path = os.path.join(sdir, "running.pt")

    def run(task, opt, lr, e0, e1, phase):                            # -> train loss, validation score
        def save(state):                                              # what a signal leaves: this phase, this step
            save_checkpoint(dict(state, phase=phase, config=cfg), running_path)
            return running_path
        resumed = None
        if os.path.exists(running_path):
            resumed = load_checked(running_path, cfg)
            if resumed["phase"] != phase:                             # another phase's: not ours to continue
                resumed = None
        if resumed:
            task.load_state_dict(resumed["task"])
            opt.load_state_dict(resumed["opt"])
            print(f"  {name} lr {lr:g}: resumed from {running_path} at step {resumed['step']}")
        loss = train_epochs(task, opt, train, lr, e0, e1, epochs, batch_size, args.seed, device, amp,
                            f"{name} lr {lr:g}", stop, save, resumed)
        return loss, score_task(task, backbone, train, val, args.search_metric, batch_size, device, amp)

    os.makedirs(sdir, exist_ok=True)
    if os.path.exists(final_path):
        done = load_checked(final_path, cfg)
        task = fresh(done["lr"])[0] if name == "classify" else None
        (task.model if task is not None else backbone).load_state_dict(done["model"])
        print(f"  {os.path.basename(sdir)}: done (lr {done['lr']:g}, score {done['score']:.2f})")
        return done, task
    t0, trials = time.time(), {}
    for lr in grid:
        path = os.path.join(sdir, f"trial_lr{lr:g}.pt")
        if os.path.exists(path):
            trial = load_checked(path, cfg)
        else:
            (task, opt), t1 = fresh(lr), time.time()
            loss, score = run(task, opt, lr, 0, min(search_epochs, epochs), f"trial {lr:g}")
            trial = dict(task=task.state_dict(), opt=opt.state_dict(), lr=lr, loss=loss, config=cfg, score=score,
                         seconds=time.time() - t1)
            save_checkpoint(trial, path)
            if stop():
                stop.exit(f"trial lr {lr:g} of {name}", path)
        trials[lr] = trial["score"]
        print(f"  {name} lr {lr:g}: score {trial['score']:.2f} (loss {trial['loss']:.4f}, {trial['seconds']:.0f}s)")
    best = max(grid, key=lambda lr: trials[lr])                       # ties: the earlier grid value
    task, opt = fresh(best)
    trial = torch.load(os.path.join(sdir, f"trial_lr{best:g}.pt"), map_location="cpu", weights_only=True)
    task.load_state_dict(trial["task"])
    opt.load_state_dict(trial["opt"])
    score = trial["score"]
    if epochs > search_epochs:                                        # the best trial continues where it stopped
        score = run(task, opt, best, search_epochs, epochs, f"continue {best:g}")[1]
    done = dict(model=(task.model if name == "classify" else backbone).state_dict(), stage=name, lr=best, score=score,
                trials={f"{k:g}": v for k, v in trials.items()}, seconds=time.time() - t0, config=cfg, **(extra or {}))
    save_checkpoint(done, final_path)
    with open(os.path.join(sdir, "trials.json"), "w") as f:
        json.dump(dict(stage=name, best_lr=best, score=score, trials=done["trials"], seconds=done["seconds"]), f,
                  indent=1)
    for path in [os.path.join(sdir, f"trial_lr{lr:g}.pt") for lr in grid] + [running_path]:
        if os.path.exists(path):
            os.remove(path)
    if stop():
        stop.exit(f"stage {name}", final_path)
    return done, task


# ----------------------------------------------------------------------------- data, results table

def load_data(args):
    """Labelled train, validation and test ImageSets. Validation: the dataset's val split where it has
    one (dicom), else the last --val-fraction of each class of train, held out deterministically."""
    try:
        train = data.load_split(args, "train", args.img_size, args.download)
        test = data.load_split(args, "test", args.img_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if train.y is None or test.y is None:
        raise SystemExit(f"error: {args.dataset} has no labels here; the curriculum ends with a classifier")
    try:
        val, source = data.load_split(args, "val", args.img_size), "val split"
        if len(val) == 0:                               # a CSV split column without val rows
            raise ValueError("empty val split")
    except ValueError:
        val = train.subset(data.holdout_split(train.y, len(train), "test", args.val_fraction))
        train = train.subset(data.holdout_split(train.y, len(train), "train", args.val_fraction))
        source = f"last {args.val_fraction:g} of each class of train"
    val = val.first(args.max_val)
    if len(val) < 2:                                    # the trials are scored on it, in batches of two or more
        raise SystemExit(f"error: {len(val)} validation image(s) ({source}): the lr search needs 2 or more; raise "
                         f"--val-fraction or --max-val")
    return train.first(args.max_train), val, test, source


def append_row(path, row):
    """One row per run. An existing file keeps its header: the row is written under those columns (a
    column it lacks left empty, one the file lacks dropped), so rows of older versions stay aligned."""
    header = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or list(row), restval="", extrasaction="ignore")
        if header is None:
            w.writeheader()
        w.writerow(row)


def print_table(path, cols=("stages", "variant", "seed", "best_lrs", "pretext_scores", "top1", "mean_per_class",
                            "per_class", "train_seconds")):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    widths = [max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    print(line(cols) + "\n|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line([r.get(c, "") for c in cols]))


# ----------------------------------------------------------------------------- main

def main(args):
    # ---- setup
    t_start = time.time()
    device = resolve_device(args.device)
    reuse_freed_memory(device)          # on a CPU; else every step faults its activations in again
    # auto: bf16 where it is fast, but not for ResNets on a CPU: there convolutions ran 1.8x slower in bf16
    # than in fp32 (resnet18, 32 px, AVX512-BF16 without AMX, measured 2026-11-26)
    resnet_on_cpu = device.type != "cuda" and args.backbone in RESNETS
    amp, precision = autocast("fp32" if resnet_on_cpu and args.precision == "auto" else args.precision, device)
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in PRETEXT:
            raise SystemExit(f"error: unknown stage {s!r}; choose from {', '.join(PRETEXT)}")
        if s in ("mae", "dsmae") and args.backbone in RESNETS:     # before any stage has trained
            raise SystemExit(f"error: stage {s} needs a ViT backbone (--backbone vit_*), not {args.backbone}")
    cell, gap = args.img_size // 3, max(3, round(args.relloc_gap * (args.img_size // 3)))      # as RelLoc draws them
    if "relloc" in stages and cell <= gap:
        raise SystemExit(f"error: relloc at --img-size {args.img_size}: cells of {cell} px leave no patch beside a "
                         f"gap of {gap} px; use a larger --img-size (12 or more) or a smaller --relloc-gap")
    n = (args.img_size // args.patch_size) ** 2
    if "mae" in stages and not 0 < round(args.mask_ratio * n) < n:
        raise SystemExit(f"error: --mask-ratio {args.mask_ratio} masks {round(args.mask_ratio * n)} of {n} patches: "
                         f"it must leave some to encode and some to predict")
    names = stages + ["classify"]
    out_dir = output_dir(args.output_dir or f"runs/curriculum_{args.dataset}_{args.variant}_{args.backbone}")
    results = args.results or os.path.join(out_dir, "results.csv")

    # ---- data
    train, val, test, val_source = load_data(args)
    in_chans = train.x.shape[1]
    if device.type == "cuda":                           # uint8 images on the GPU: crops run there too
        train.x, val.x = train.x.to(device), val.x.to(device)

    # ---- backbone: the same initial weights for every run with this seed (rows share stage folders)
    torch.manual_seed(args.seed)
    if args.backbone in RESNETS:
        backbone = build_resnet(args.backbone, in_chans, args.img_size)
        dim, bcfg = backbone.out_dim, dict(arch=args.backbone, in_chans=in_chans, img_size=args.img_size)
    else:
        if args.img_size % args.patch_size:
            raise SystemExit(f"error: --img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
        backbone = ViT(img_size=args.img_size, patch_size=args.patch_size, in_chans=in_chans, **MODELS[args.backbone])
        dim, bcfg = backbone.embed_dim, backbone.config()
    backbone.to(device)
    # the classifier's final.pt is also a models.load_classifier checkpoint
    meta = dict(backbone=args.backbone, backbone_config=bcfg, num_classes=len(train.classes), pool="cls",
                data=dict(dataset=args.dataset, mean=list(train.mean), std=list(train.std),
                          classes=list(train.classes)),
                args=vars(args), **(dict(encoder_config=bcfg) if args.backbone not in RESNETS else {}))
    print(f"curriculum {' -> '.join(names)} | {args.backbone} ({dim}-d) on {args.dataset} "
          f"({args.variant}), {args.img_size}px | {len(train)} train, {len(val)} val ({val_source}), {len(test)} test, "
          f"{len(train.classes)} classes | {device} | {precision} | {out_dir}")

    # ---- pretext stages, then the classifier; a stage's folder is named by the stages up to it
    done, seconds = [], 0.0
    with Preemption() as stop:              # SIGTERM, SIGUSR1, SIGINT: save at this step (running.pt), exit
        for i, name in enumerate(names):
            cls = name == "classify"
            stage, task = run_stage(name, os.path.join(out_dir, "-".join(names[:i + 1])), backbone, dim, args, train,
                                    val, device, amp, stop, meta if cls else None)
            seconds += stage["seconds"]
            done.append(stage)
            unit = "mean per-class %" if cls or args.search_metric == "knn" else \
                "accuracy" if name in ("rotation", "relloc") else "-loss"
            print(f"stage {i + 1} {name}: lr {stage['lr']:g}, validation score {stage['score']:.2f} ({unit})")

    # ---- test (once, with the chosen classifier), the results row
    metrics = evaluate(task.model, test.x, test.y, task.plain, len(test.classes), amp)
    row = dict(date=date.today().isoformat(), dataset=args.dataset, variant=args.variant, backbone=args.backbone,
               seed=args.seed, img_size=args.img_size, stages="+".join(stages) or "scratch",
               best_lrs=" ".join(f"{s['stage']}:{s['lr']:g}" for s in done),
               pretext_scores=" ".join(f"{s['stage']}:{s['score']:.2f}" for s in done[:-1]),
               val_mean_per_class=round(done[-1]["score"], 2), top1=round(metrics["top1"], 2),
               mean_per_class=round(metrics["mean_per_class"], 2),
               per_class=" ".join(f"{c}:{a:.1f}" for c, a in zip(train.classes, metrics["per_class"])),
               train_seconds=round(seconds), wall_seconds=round(time.time() - t_start),
               checkpoint=os.path.join(out_dir, "-".join(names), "final.pt"))
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    append_row(results, row)
    print(f"test: top-1 {metrics['top1']:.2f}, mean per-class {metrics['mean_per_class']:.2f}, per class "
          f"{row['per_class']} | {results}")
    print_table(results)
    return dict(row, metrics=metrics, stages=done)


if __name__ == "__main__":
    main(get_args())
