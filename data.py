"""Datasets as uint8 tensors in memory, augmented in whole batches on the training device (a GPU never waits for
PIL; the same code runs on a CPU), and fetched from their public sources on request.

    ds = build_dataset("cifar10", "train", data_dir="data")   # ImageSet: x (N, C, H, W) uint8, y
    for idx in epoch_batches(len(ds), 256, epoch=0, seed=0):
        x = augment(ds.x[idx].to(device), 32, ds.mean, ds.std)  # (256, C, 32, 32) float

Sources, in their real formats: synthetic, cifar10/100, stl10, npz (MedMNIST's too), folder (a subfolder per class),
dicom (chest X-rays, a labels CSV, lung masks). Labels are checked where read; unlabelled images have y = None. Also:
downloads (`python data.py download NAME`) and the flags every script shares (Number, add_data_args).
"""
import argparse
import contextlib
import csv
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


@dataclass
class ImageSet:
    x: torch.Tensor            # (N, C, H, W) uint8
    y: torch.Tensor | None     # (N,) int64, or None for unlabelled images
    classes: list              # class names, index = label
    mean: tuple                # per-channel statistics of the training split, in [0, 1]
    std: tuple
    masks: torch.Tensor | None = None   # (N, 1, H, W) uint8, 1 = lung (dicom with --masks)
    ids: list | None = None             # image ids (dicom), for reports such as cam.py's

    def __len__(self):
        return self.x.shape[0]

    def subset(self, idx):
        """The images idx (a LongTensor), with their labels, masks and ids; the statistics kept."""
        pick = lambda v: None if v is None else v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]
        return replace(self, x=self.x[idx], y=pick(self.y), masks=pick(self.masks), ids=pick(self.ids))

    def first(self, n):
        """At most n images, evenly spaced (a label budget, --max-train: about n / classes of each); 0: all."""
        return self if not n or n >= len(self) else self.subset(torch.linspace(0, len(self) - 1, n).long())


SPLITS = dict(synthetic=("train", "test"), cifar10=("train", "test"), cifar100=("train", "test"), npz=("train", "test"),
              stl10=("train", "test", "unlabeled", "train+unlabeled"), folder=("train", "test"),
              dicom=("train", "val", "test"))
DATASETS = tuple(SPLITS)
STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),     # published, of the training splits
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
         "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# (model, img_size, patch_size) each dataset is evaluated with when no checkpoint says otherwise: the paper's
# Table 1 for CIFAR and STL-10, the lab configuration for synthetic
GEOMETRY = {"synthetic": ("vit_micro", 32, 4), "cifar10": ("vit_tiny", 32, 2), "cifar100": ("vit_tiny", 32, 2),
            "stl10": ("vit_small", 96, 6), "npz": ("vit_tiny", 32, 4), "folder": ("vit_small", 224, 16),
            "dicom": ("vit_small", 224, 16)}


def build_dataset(name, split="train", *, data_dir="data", img_size=32, download=False, seed=0, num_workers=4,
                  variant="full", **xray):
    """One split of one dataset as an ImageSet; FileNotFoundError naming where it looked and what to run, ValueError
    for files it cannot use. `xray`: the dicom options (data_options(args))."""
    if name in SPLITS and split not in SPLITS[name]:
        raise ValueError(f"{name} has splits {', '.join(SPLITS[name])}, not {split!r}")
    if name == "dicom":
        return load_xray(data_dir, split, img_size, seed=seed, num_workers=num_workers, variant=variant, **xray)
    if variant != "full":
        raise ValueError(f"--variant {variant} needs lung masks: only --dataset dicom with --masks has them")
    cifar = lambda: load_cifar(data_dir, split, name, download)
    readers = dict(synthetic=lambda: synthetic_shapes(split, img_size, seed), cifar10=cifar, cifar100=cifar,
                   stl10=lambda: load_stl10(data_dir, split, download), npz=lambda: load_npz(data_dir, split, download),
                   folder=lambda: load_folder(data_dir, split, img_size, num_workers, xray.get("skip_bad", False)))
    if name not in readers:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return readers[name]()


def load_split(args, split, img_size, download=False):
    """build_dataset with the flags every script shares; under torchrun one decoded copy per machine."""
    build = lambda: build_dataset(args.dataset, split, data_dir=args.data_dir, img_size=img_size, download=download,
                                  seed=args.seed, num_workers=args.num_workers, **data_options(args))
    key = (args.dataset, os.path.abspath(args.data_dir), split, img_size, args.seed, sorted(data_options(args).items()))
    return shared_per_machine(build, key)


# ----------------------------------------------------------------------------- batches and transforms, on the device

def epoch_batches(n, batch_size, epoch, seed, rank=0, world_size=1, start=0):
    """This rank's part of each global batch of an epoch: one permutation per (seed, epoch), rank r takes the r-th
    slice of each batch, so N ranks see exactly one process's images; start skips batches done (a resume)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    local = batch_size // world_size
    for b in range(start, n // batch_size):
        yield perm[b * batch_size + rank * local:b * batch_size + (rank + 1) * local]


def normalize(x, mean, std):
    """uint8 or [0, 1] float images -> (x / 255 - mean) / std, in float32."""
    x, shape = (x.float() / 255 if x.dtype == torch.uint8 else x.float()), (1, -1, 1, 1)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


def preprocess(x, size, mean, std):
    """Evaluation transform: resize (if needed) and normalise a uint8 batch."""
    x = normalize(x, mean, std)
    same = x.shape[-2:] == (size, size)
    return x if same else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def augment(x, size, mean, std, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """Random resized crop + horizontal flip + normalise, for a whole uint8 batch at once: each image its own crop
    (area fraction in `scale`, aspect in `ratio`, shrunk to fit) as one affine transform, one grid_sample for all."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    logr = torch.empty(B, device=dev).uniform_(np.log(ratio[0]), np.log(ratio[1]))
    w, h = (area * logr.exp()).sqrt().clamp(max=1.0), (area / logr.exp()).sqrt().clamp(max=1.0)   # of the image's
    cx, cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - w), (torch.rand(B, device=dev) * 2 - 1) * (1 - h)  # centre
    sign = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    theta = torch.stack([torch.stack([w * sign, 0 * w, cx], 1), torch.stack([0 * h, h, cy], 1)], 1)
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(out.div_(255), mean, std)


# ----------------------------------------------------------------------------- statistics, splits, DDP

def channel_stats(x, source="the images", chunk=1024):
    """Per-channel mean and std in [0, 1] of a uint8 (N, C, H, W) tensor; a constant channel (nothing to normalise
    or learn from) is a ValueError naming source."""
    if len(x) == 0:
        raise ValueError(f"{source}: no images")
    s = s2 = 0.0
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].double().div_(255)
        s, s2 = s + c.sum(dim=(0, 2, 3)), s2 + c.pow(2).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt()
    if flat := (std < 1e-3).nonzero().flatten().tolist():
        raise ValueError(f"{source}: channel {flat[0]} is constant (every pixel {mean[flat[0]] * 255:.0f}): nothing to "
                         f"normalise or learn from; check the files")
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def holdout_split(y, n, split, fraction=0.1):
    """A deterministic split for sources without one: the last `fraction` of each class (in file order) is test."""
    groups = [torch.arange(n)] if y is None else [torch.nonzero(y == c).flatten() for c in y.unique()]
    cut = lambda g: len(g) - int(round(fraction * len(g)))
    return torch.cat([g[cut(g):] if split == "test" else g[:cut(g)] for g in groups]).sort().values


def check_labels(y, n, num_classes, source):
    """Labels as int64, one per image, whole, 0 <= y < num_classes; else ValueError naming the first bad one."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{source} has shape {y.shape} but x holds {n} images; one label per image expected")
    if y.dtype.kind not in "iub":
        whole = np.isfinite(y) & (y == np.round(y)) if y.dtype.kind == "f" else np.zeros(n, bool)
        if not whole.all():
            raise ValueError(f"{source}: label {y[np.argmin(whole)]} at index {np.argmin(whole)} is not a whole "
                             f"number; labels are class indices")
    if len(bad := np.nonzero((y < 0) | (y >= num_classes))[0]):
        raise ValueError(f"{source}: label {y[bad[0]]:g} at index {bad[0]} is outside 0..{num_classes - 1} "
                         f"({num_classes} classes; {len(bad)} such label(s)); labels must be 0 <= y < classes")
    return torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------- command line: ranges in the parser

class Number:
    """argparse type: a number in an interval written as in mathematics, Number(int, "[1, inf)"), never nan or inf;
    items=True: a list "a,b,c" (count, total; text=True: the text). `range` says it in words, for --help and errors."""

    def __init__(self, kind, interval, *, multiple=None, items=False, count=None, total=None, text=False):
        vars(self).update(kind=kind, multiple=multiple, items=items, count=count, total=total, text=text)
        lo, hi = (v.strip() for v in interval[1:-1].split(","))
        self.lo, self.hi, self.lo_open, self.hi_open = float(lo), float(hi), interval[0] == "(", interval[-1] == ")"
        where = (f"> {lo}" if self.lo_open else f">= {lo}") if self.hi == math.inf else f"in {interval}"
        self.range = (f"a list of {f'{count} ' if count else ''}" if items else "an " if kind is int else "a ") + \
            ("integer" if kind is int else "number") + ("s" if items else "") + f" {where}" + \
            (f", a multiple of {multiple}" if multiple else "") + (f", summing to {total:g}" if total else "")

    def __call__(self, s):
        def one(t):
            try:
                v = self.kind(t)
            except ValueError:
                return None
            return v if math.isfinite(v) and (self.lo < v if self.lo_open else self.lo <= v) and \
                (v < self.hi if self.hi_open else v <= self.hi) and not (self.multiple and v % self.multiple) else None
        values = [one(t.strip()) for t in s.split(",")] if self.items else [one(s)]
        if None in values or (self.count and len(values) != self.count) or \
                (self.total is not None and abs(sum(values) - self.total) > 1e-6):
            raise argparse.ArgumentTypeError(f"{s} is not {self.range}")
        return (s if self.text else values) if self.items else values[0]


POS_INT, NONNEG_INT = Number(int, "[1, inf)"), Number(int, "[0, inf)")        # most flags: sizes, counts (0: off)
POS, NONNEG = Number(float, "(0, inf)"), Number(float, "[0, inf)")             # learning rates; decays, minutes
SEED = Number(int, "[0, 1000000]")           # pretrain.py's per-step seeds stay inside torch's 64 bits


def finish_parser(p):
    """A parser (and its subcommands') whose --help ends each flag with its range and default, and whose errors are
    one line (`pretrain.py: error: argument --lam: 2 is not a number in [0, 1] ...`, exit 2), not the whole usage."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                finish_parser(sub)
        elif a.option_strings and argparse.SUPPRESS not in (a.help, a.default) and not getattr(a, "finished", False):
            rng = getattr(a.type, "range", None)         # actions a parent parser shares are finished once
            a.help, a.finished = "; ".join(filter(None, (a.help, rng))) + " (default: %(default)s)", True
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists every flag)\n")
    return p


# ----------------------------------------------------------------------------- one copy per machine under torchrun

_GROUP = []                                 # gloo, a day's timeout: NCCL's 10 minutes are short for a long decode


def shared_per_machine(build, key):
    """build() once per machine under torchrun, every rank mapping that copy: global rank 0 builds first (downloads,
    decode caches), then the first rank of each other machine; each writes to /dev/shm, its machine's ranks map it
    copy-on-write (the same pages), and the file is unlinked once all have. Without torchrun: build()."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo", timeout=timedelta(days=1)))

    def meet(err):                    # a barrier that carries errors: every rank raises the first one any rank met
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, None if err is None else (type(err).__name__, str(err)), group=_GROUP[0])
        first = next((e for e in errs if e), None)
        if first:
            raise (FileNotFoundError if first[0] == "FileNotFoundError" else ValueError)(first[1])
    job = [os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")]
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, "dsmae_" + hashlib.sha1(repr((key, job)).encode()).hexdigest()[:16] + ".pt")
    rank, leader = dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0   # no LOCAL_RANK: 1 machine
    for turn in (0, 1):
        err = None
        if leader and (rank == 0) == (turn == 0):
            try:
                ds = build()
                torch.save(dict(vars(ds), classes=[str(c) for c in ds.classes]), path)
            except Exception as e:
                err = e
        meet(err)
    ds = ImageSet(**torch.load(path, mmap=True, weights_only=True))    # mapped copy-on-write: the same pages
    meet(None)
    if leader:
        with contextlib.suppress(FileNotFoundError):               # two "machines" on one host share /dev/shm
            os.remove(path)
    return ds


# ----------------------------------------------------------------------------- synthetic

SHAPES = ("circle", "ring", "square", "frame", "diamond", "triangle", "plus", "cross", "hstripes", "vstripes")


def _shape_mask(c, u, v):
    """Inside-mask of shape class c in coordinates (u, v) normalised by the shape's size."""
    box = torch.maximum(u.abs(), v.abs())
    r2 = u ** 2 + v ** 2
    if c == 0: return r2 < 1.0                                                   # circle
    if c == 1: return (r2 > 0.3) & (r2 < 1.0)                                    # ring
    if c == 2: return box < 0.8                                                  # square
    if c == 3: return (box > 0.5) & (box < 0.85)                                 # frame
    if c == 4: return u.abs() + v.abs() < 1.0                                    # diamond
    if c == 5: return (v > -0.8) & (v < 0.8) & (u.abs() < (v + 0.8) * 0.6)       # triangle
    if c == 6: return ((u.abs() < 0.25) & (v.abs() < 0.95)) | ((v.abs() < 0.25) & (u.abs() < 0.95))
    if c == 7: return (((u - v).abs() < 0.3) | ((u + v).abs() < 0.3)) & (box < 0.85)  # x-cross
    stripes = torch.cos((v if c == 8 else u) * 3 * torch.pi) > 0                    # h/v stripes
    return (box < 0.85) & stripes


def synthetic_shapes(split="train", img_size=32, seed=0, n=None):
    """10 shape classes from (seed, split), 5,000 train and 1,000 test: one shape of random colour, size, position and
    aspect on a gradient, pixel noise. Colour and position say nothing of the class: a k-NN must see shape."""
    n = n or (5000 if split == "train" else 1000)
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    rand = lambda *shape: torch.rand(*shape, generator=g)
    y = torch.randperm(n, generator=g) % len(SHAPES)
    S = 2 * img_size                                           # draw at 2x, then average: smooth edges
    Y, X = torch.meshgrid(*((torch.arange(S) + 0.5) / S,) * 2, indexing="ij")
    # colours: a random grey plus a moderate tint, varying a lot between images without drowning the shape
    colours = lambda k: (rand(k, 1, 1, 1) + 0.3 * (rand(k, 3, 1, 1) - 0.5)).clamp(0, 1)
    c0, c1, angle = colours(n), colours(n), rand(n, 1, 1) * 2 * torch.pi       # background: a gradient, any direction
    t = ((X - 0.5) * angle.cos() + (Y - 0.5) * angle.sin() + 0.71) / 1.42     # in [0, 1]
    img = c0 + (c1 - c0) * t.unsqueeze(1)
    # shape: centre, size and aspect, colour far enough from the background to be seen
    cx, cy = 0.3 + 0.4 * rand(n, 1, 1), 0.3 + 0.4 * rand(n, 1, 1)
    size, aspect = 0.25 + 0.15 * rand(n, 1, 1), 0.8 + 0.4 * rand(n, 1, 1)
    u, v = (X - cx) / (size * aspect), (Y - cy) / (size / aspect)
    colour = colours(n)
    colour = torch.where((colour - (c0 + c1) / 2).abs().sum(1, keepdim=True) < 0.6, 1 - colour, colour)
    mask = torch.zeros(n, S, S, dtype=torch.bool)
    for c in range(len(SHAPES)):
        mask[y == c] = _shape_mask(c, u[y == c], v[y == c])
    img = torch.where(mask.unsqueeze(1), colour.expand(-1, -1, S, S), img)
    img = (F.avg_pool2d(img, 2) + 0.04 * torch.randn(n, 3, img_size, img_size, generator=g)).clamp(0, 1)
    return ImageSet((img * 255).round().to(torch.uint8), y, list(SHAPES), (0.5,) * 3, (0.25,) * 3)


# ----------------------------------------------------------------------------- CIFAR, STL-10

def _find(name, root, paths, download, size):
    """The files a reader needs, fetched when missing with --download; else one line naming the first missing."""
    if download and not all(map(os.path.exists, paths)):
        fetch(name, root)
    if missing := [p for p in paths if not os.path.exists(p)]:
        raise FileNotFoundError(f"{name} not found: looked for {missing[0]}. Add --download to fetch it ({size}; or "
                                f"`python data.py download {name}`), or point --data-dir at the folder that holds "
                                f"{os.path.basename(os.path.dirname(missing[0]))}/.")


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR's batches are Python pickles, which can run any code they name: admit only what the format holds
    (dicts, lists, strings, bytes, numbers and numpy arrays), so that a tampered file cannot."""

    def find_class(self, module, name):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}:   # bytes, protocol 2
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds")


def read_pickle(path):
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a CIFAR batch ({e}): refused unread; delete it, fetch it again") from None


def load_cifar(root, split, name, download=False):
    ten = name == "cifar10"
    base = os.path.join(root, "cifar-10-batches-py" if ten else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]) if ten else [split]
    paths = [os.path.join(base, f) for f in files]
    _find(name, root, paths, download, "about 170 MB")
    xs, ys = [], []
    for p in paths:
        d = read_pickle(p)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(check_labels(d["labels"] if ten else d["fine_labels"], len(xs[-1]), 10 if ten else 100, p))
    meta = read_pickle(os.path.join(base, "batches.meta" if ten else "meta"))
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.cat(ys),
                    meta["label_names" if ten else "fine_label_names"], *STATS[name])


def load_stl10(root, split, download=False):
    base, parts = os.path.join(root, "stl10_binary"), split.split("+")
    _find("stl10", root, [os.path.join(base, f"{p}_X.bin") for p in parts], download, "about 2.6 GB")
    xs, ys = [], []
    for p in parts:
        # copy-on-write memory map: ranks on one machine share the page cache (unlabeled: 2.8 GB); column-major
        raw = np.memmap(os.path.join(base, f"{p}_X.bin"), dtype=np.uint8, mode="c")
        xs.append(torch.from_numpy(raw).view(-1, 3, 96, 96).transpose(2, 3))
        if p != "unlabeled":                        # labels 1..10 on disk
            f = os.path.join(base, f"{p}_y.bin")
            ys.append(check_labels(np.fromfile(f, dtype=np.uint8).astype(np.int64) - 1, len(xs[-1]), 10, f))
    classes = open(os.path.join(base, "class_names.txt")).read().split()     # unlabeled images never carry a label
    return ImageSet(xs[0] if len(xs) == 1 else torch.cat(xs), ys[0] if split in ("train", "test") else None, classes,
                    *STATS["stl10"])


# ----------------------------------------------------------------------------- npz, folder

def load_npz(path, split, download=False):
    name = next((k for k, v in DOWNLOADS.items() if os.path.basename(v[0]) == os.path.basename(path)), None)
    if download and name and not os.path.isfile(path):              # data/pneumoniamnist.npz and the like
        fetch(name, os.path.dirname(path) or ".")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset not found: {path} is not a file. Point --data-dir at a .npz "
                                f"holding x (N, H, W, C) uint8 and optionally y (N,).")
    try:
        z = np.load(path)
        d = {k: z[k] for k in z.files}                               # an npz decompresses on every read: once
    except Exception as e:                                           # truncated, not a zip, object arrays
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if "train_images" in d and "x" not in d:           # MedMNIST's layout; labels (N, 1) -> (N,), multi-label kept
        flat = lambda a: a.reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a
        d = dict(x=d["train_images"], y=flat(d["train_labels"]), x_test=d["test_images"], y_test=flat(d["test_labels"]),
                 **{k: d[k] for k in ("class_names",) if k in d})
    if "x" not in d:
        raise ValueError(f"{path} has no array 'x' (keys: {', '.join(d)})")
    key = "_test" if split == "test" and "x_test" in d else ""
    x = d["x" + key]
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"{path}: x{key} must be uint8 (N, H, W, C) or (N, H, W), got {x.dtype} {x.shape}")
    # the classes: class_names, else up to the largest label of either split, so that train and test agree
    finite = [a[np.isfinite(a)] for a in (d.get("y"), d.get("y_test")) if a is not None and a.dtype.kind in "iubf"]
    classes = [str(c) for c in d["class_names"]] if "class_names" in d else \
        [str(c) for c in range(int(max((a.max() for a in finite if a.size), default=-1)) + 1)]
    y = check_labels(d["y" + key], len(x), len(classes), f"{path}: y{key}") if "y" + key in d else None
    # (N, C, H, W) views of the file's (N, H, W, C) array: one copy at the end, of the chosen images only
    nchw = lambda a: torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2)
    x = nchw(x)
    if "x_test" in d:
        return ImageSet(x.contiguous(), y, classes, *channel_stats(x if key == "" else nchw(d["x"]), path))
    train = holdout_split(y, len(x), "train")          # no test split in the file: the last 10% of each class
    keep = train if split == "train" else holdout_split(y, len(x), "test")
    return ImageSet(x.index_select(0, keep), y[keep] if y is not None else None, classes,
                    *channel_stats(x.index_select(0, train), path))


def check_fits_in_memory(n, channels, size, what):
    """Datasets are held in memory as uint8: stop before decoding what would take over 80% of the memory free."""
    need, meminfo = n * channels * size * size, "/proc/meminfo"
    avail = int(next(line.split()[1] for line in open(meminfo) if line.startswith("MemAvailable")) if
                os.path.exists(meminfo) else 2 ** 60) * 1024
    if need > 0.8 * avail:
        raise ValueError(f"{what}: {n} images at {size}x{size}x{channels} need {need / 2**30:.1f} GiB in memory "
                         f"(uint8), {avail / 2**30:.1f} GiB is available: use a smaller --img-size or a subset")


def decode_all(files, decode, skip_bad, num_workers, desc):
    """decode(file) for every file on a thread pool (PIL and pydicom's JPEG 2000 decoders release the GIL): the
    results of those it could read, and [(file, why)] of the others; without skip_bad the first failure stops."""

    def one(f):
        try:
            return decode(f)
        except Exception as e:                            # truncated, not an image, a mask that does not fit ...
            return str(e).removeprefix(f + ": ") if isinstance(e, ValueError) else f"unreadable image " \
                f"({type(e).__name__}: {e})"
    out, bad = [], []
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:
        for f, r in zip(files, tqdm(pool.map(one, files), total=len(files), desc=desc, unit="img", leave=False)):
            if isinstance(r, str) and not skip_bad:
                raise ValueError(f"{f}: {r} (--skip-bad to leave such files out)")
            (bad if isinstance(r, str) else out).append((f, r))
    return out, bad


@lru_cache(maxsize=4)
def _decode_folder(root, img_size, num_workers, skip_bad=False):
    """Every image of root/<class>/: the shorter side resized to img_size, the centre cropped (once per process)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files = [[os.path.join(root, c, f) for f in sorted(os.listdir(os.path.join(root, c)))
              if f.lower().endswith(IMAGE_EXTENSIONS)] for c in classes]
    if not files or [] in files:                     # a class the model would have an output for and never see
        raise ValueError(f"{os.path.join(root, classes[files.index([])]) if files else root} holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}): add some, or remove the folder")

    def decode(path):
        with Image.open(path) as im:
            s = img_size / min(im.size)
            w, h = max(img_size, round(im.width * s)), max(img_size, round(im.height * s))
            im = im.convert("RGB").resize((w, h), Image.BICUBIC)
            return np.asarray(im.crop(((w - img_size) // 2, (h - img_size) // 2, (w + img_size) // 2,
                                       (h + img_size) // 2)), np.uint8)
    label = {p: i for i, f in enumerate(files) for p in f}
    check_fits_in_memory(len(label), 3, img_size, root)
    out, bad = decode_all(list(label), decode, skip_bad, num_workers, f"decoding {root}")
    if bad:
        print(f"left out {len(bad)} unreadable image(s) of {root}, e.g. {bad[0][0]}: {bad[0][1]}")
    if not out:
        raise ValueError(f"no readable images in {root}")
    x = torch.from_numpy(np.stack([a for _, a in out])).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label[f] for f, _ in out]), classes


def load_folder(root, split, img_size, num_workers=4, skip_bad=False):
    """root/<class>/<image>; the last 10% of each class (in file order) is the test split."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder dataset not found: {root} is not a directory. Point --data-dir at a "
                                f"folder with one subfolder of images per class.")
    x, y, classes = _decode_folder(root, img_size, num_workers, skip_bad)
    train = holdout_split(y, len(x), "train")
    keep = train if split == "train" else holdout_split(y, len(x), "test")
    return ImageSet(x[keep], y[keep], classes, *channel_stats(x[train], root))


# ----------------------------------------------------------------------------- chest X-rays

VARIANTS = ("full", "seg-black", "seg-gray")
XRAY_CACHE_VERSION = 2                        # 2: masks are lung where over half their maximum (1: any nonzero)
DECODERS = {"JPEG-LS": "pyjpegls or pylibjpeg-libjpeg", "High-Throughput": "pylibjpeg-openjpeg", "RLE": "pylibjpeg-rle",
            "JPEG 2000": "pillow (with OpenJPEG) or pylibjpeg-openjpeg", "JPEG": "pylibjpeg-libjpeg (or pillow)"}


def add_data_args(p):
    """The chest X-ray flags, spelled the same in every script (used with --dataset dicom)."""
    g = p.add_argument_group("chest X-rays (--dataset dicom; --data-dir is a folder of .dcm, searched recursively)")
    g.add_argument("--labels", default=None, help="CSV: id, label (and split: train/val/test); none: unlabelled")
    g.add_argument("--id-column", default="id", help="CSV column naming the image: its file name without extension")
    g.add_argument("--label-column", default="label")
    g.add_argument("--split-column", default="split", help="else a seeded split stratified by class")
    g.add_argument("--split-fractions", default="0.7,0.1,0.2", help="train,val,test",
                   type=Number(float, "[0, 1]", items=True, count=3, total=1, text=True))
    g.add_argument("--classes", default=None, help="comma-separated labels to keep (the thesis dropped two rare ones)")
    g.add_argument("--masks", default=None, help="folder of <id>.png lung masks: lung where a pixel is over half the "
                   "mask's maximum (0/1, 0/255 and anti-aliased masks alike)")
    g.add_argument("--variant", default="full", choices=VARIANTS, help="lungs on black or gray need --masks")
    g.add_argument("--channels", type=int, default=1, choices=[1, 3], help="grey, or replicated to 3 (colour encoders)")
    g.add_argument("--window-percentile", type=Number(float, "[0, 50)"), default=0.5, help="DICOMs without a window: "
                   "from this percentile to 100 minus it")
    g.add_argument("--keep-aspect", action=argparse.BooleanOptionalAction, default=True, help="pad, not stretch")
    g.add_argument("--cache-dir", default=None, help="for the decoded uint8 cache (default: <data-dir>/.xray_cache)")
    g.add_argument("--skip-bad", action="store_true", help="leave unreadable files (and images without a label or "
                   "mask) out, listed (dicom: bad_files.txt in the cache dir)")
    return p


def data_options(args):
    """The keyword arguments build_dataset takes from add_data_args' flags."""
    return dict(labels=args.labels, id_column=args.id_column, label_column=args.label_column,
                split_column=args.split_column, split_fractions=tuple(map(float, args.split_fractions.split(","))),
                classes=args.classes.split(",") if args.classes else None, masks=args.masks, variant=args.variant,
                channels=args.channels, window_percentile=args.window_percentile, keep_aspect=args.keep_aspect,
                cache_dir=args.cache_dir, skip_bad=args.skip_bad)


def read_dicom(path, window_percentile=0.5):
    """One radiograph as float32 (H, W) in [0, 1], 0 = black as displayed, in the standard's order: modality LUT
    (rescale slope/intercept), VOI LUT or window (else a percentile window), MONOCHROME1 / INVERSE inversion."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise ValueError(f"{path}: no pixel data ({getattr(ds, 'SOPClassUID', 'unknown SOP class')!s}): not an image")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame object ({ds.NumberOfFrames} frames); one radiograph per file expected")
    try:
        arr = ds.pixel_array      # native data masked to BitsStored and sign-extended by pydicom
    except Exception as e:
        if (ts := ds.file_meta.get("TransferSyntaxUID", None)) is not None and ts.is_compressed:
            raise ValueError(f"{path}: cannot decode transfer syntax {ts.name} ({ts}): install "
                             f"{next((v for k, v in DECODERS.items() if k in ts.name), 'pylibjpeg or gdcm')} "
                             f"({type(e).__name__}: {e})") from e
        raise ValueError(f"{path}: pixel data unreadable ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:   # colour secondary capture: luminance
        return (arr.astype(np.float32).mean(-1) / (2 ** int(ds.BitsStored) - 1)).clip(0, 1)
    elif arr.ndim != 2:
        raise ValueError(f"{path}: expected one 2-D grey image, got pixel array of shape {arr.shape}")
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:                                     # a LUT wins over a window, as in pydicom
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        x = apply_voi(arr if "ModalityLUTSequence" in ds else x, ds).astype(np.float64) / (2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:                # VOI windowing, PS3.3 C.11.2.1.2
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        c, w, fn = first(ds.WindowCenter), first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")).upper()
        x = 1 / (1 + np.exp(-4 * (x - c) / w)) if fn == "SIGMOID" else np.clip((x - c) / w + 0.5, 0, 1) \
            if fn == "LINEAR_EXACT" else np.clip((x - (c - 0.5)) / max(w - 1, 1e-6) + 0.5, 0, 1)
    else:
        lo, hi = np.percentile(x, (window_percentile, 100 - window_percentile))
        x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    # the DX standard pairs MONOCHROME1 with PresentationLUTShape INVERSE: one inversion, not two
    inverse = ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE"
    return (1 - x if inverse else x).astype(np.float32)


def read_radiograph(path, window_percentile=0.5):
    """A DICOM (by its DICM magic or extension) or an exported image, as float32 (H, W) in [0, 1]; 16-bit and
    float exports (PNG, TIFF) get the percentile window of a DICOM without one, instead of being clipped."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return read_dicom(path, window_percentile)
    try:
        with Image.open(path) as im:
            if im.mode in ("L", "P", "RGB", "RGBA", "LA", "1", "CMYK", "YCbCr"):
                return np.asarray(im.convert("L"), dtype=np.float32) / 255
            x = np.asarray(im, dtype=np.float64)                       # I;16, I, F: more than 8 bits
    except Exception as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    lo, hi = np.percentile(x, (window_percentile, 100 - window_percentile))
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def fit_square(img, size, keep_aspect=True, nearest=False):
    """A float (H, W) image in [0, 1] as (size, size) uint8: the longer side resized to size and black padding
    around it (keep_aspect), or stretched; masks use nearest-neighbour."""
    h, w = img.shape
    s = size / max(h, w) if keep_aspect else None
    nw, nh = (max(1, round(w * s)), max(1, round(h * s))) if keep_aspect else (size, size)
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
            (nw, nh), Image.NEAREST if nearest else Image.BICUBIC, reducing_gap=None if nearest else 3.0))
    out, top, left = np.zeros((size, size), np.uint8), (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def _is_xray_file(path):
    if path.lower().endswith((".dcm", ".dicom") + IMAGE_EXTENSIONS):
        return True
    if "." in os.path.basename(path) or os.path.basename(path) == "DICOMDIR":    # an export's index, not an image
        return False
    with open(path, "rb") as f:                       # extension-less DICOMs: the DICM magic at 128
        return f.read(132)[128:] == b"DICM"


def list_xrays(root, masks=None, cache_dir=None):
    """The radiographs under root, searched recursively (the masks and cache folders left out): (files, ids, mask
    file or None for each). Ids are file names without extension and must be unique."""
    for folder, what in ((root, "dicom dataset not found: --data-dir"), (masks or root, "--masks")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{what} {folder} is not a directory (--data-dir: a folder of .dcm files, searched "
                                    f"recursively; --masks: a folder of <id>.png masks)")
    skip = [os.path.abspath(p) + os.sep for p in (masks, cache_dir, os.path.join(root, ".xray_cache")) if p]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                   if not any((os.path.abspath(d) + os.sep).startswith(s) for s in skip)
                   for f in fs if _is_xray_file(os.path.join(d, f)))
    if not files:
        raise FileNotFoundError(f"no .dcm (or .png/.jpg) files under {root}")
    ids = [os.path.splitext(os.path.basename(f))[0] for f in files]
    if dup := next((i for i, k in Counter(ids).items() if k > 1), None):      # (a count per id: 30,000 files)
        raise ValueError(f"two files under {root} are both named {dup!r}: image ids are file names without "
                         f"extension and must be unique")
    found = {os.path.splitext(f)[0]: os.path.join(masks, f) for f in sorted(os.listdir(masks))
             if f.lower().endswith(IMAGE_EXTENSIONS)} if masks else {}
    return files, ids, [found.get(i) for i in ids]


def decode_xrays(root, img_size, masks=None, keep_aspect=True, window_percentile=0.5, cache_dir=None,
                 skip_bad=False, num_workers=4):
    """Every radiograph under root (and its mask) decoded once, cached as uint8 (one .npz per size and settings in
    cache_dir; rebuilt when a file changes): dict(x (N, S, S), masks (N, S, S) 0/1 or None, ids, bad [(path, why)])."""
    files, ids, mask_files = list_xrays(root, masks, cache_dir)
    stamp = hashlib.sha1("".join(f"{os.path.relpath(f, root)}|{os.stat(f).st_size}|{os.stat(f).st_mtime_ns}\n"
                                 for f in files + [m for m in mask_files if m]).encode()).hexdigest()
    key = hashlib.sha1(repr((XRAY_CACHE_VERSION, keep_aspect, window_percentile, bool(masks))).encode()).hexdigest()
    folder = cache_dir or os.path.join(root, ".xray_cache")
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):                             # a read-only data folder
        folder = os.path.join(os.path.expanduser("~/.cache/dsmae"), hashlib.sha1(root.encode()).hexdigest()[:12])
        os.makedirs(folder, exist_ok=True)
    cache = os.path.join(folder, f"xray_{img_size}px_{key[:8]}.npz")
    if os.path.exists(cache) and str((d := np.load(cache))["stamp"]) == stamp:
        if (bad := [tuple(b.split("\t", 1)) for b in d["bad"].tolist()]) and not skip_bad:
            raise ValueError(f"{bad[0][0]}: {bad[0][1]} (cached; --skip-bad to go on without it)")
        return dict(x=d["x"], masks=d["masks"] if masks else None, ids=d["ids"].tolist(), bad=bad)
    check_fits_in_memory(len(files), 2 if masks else 1, img_size, root)
    mask_of, id_of = dict(zip(files, mask_files)), dict(zip(files, ids))

    def one(f):                                            # image and mask, fitted alike to img_size x img_size
        raw = read_radiograph(f, window_percentile)
        if masks and not mask_of[f]:
            raise ValueError(f"no mask {id_of[f]}.png in {masks}")
        m = fit_square(read_mask(mask_of[f], raw.shape), img_size, keep_aspect, True) > 0 if masks else None
        return fit_square(raw, img_size, keep_aspect), m
    done, bad = decode_all(files, one, skip_bad, num_workers, f"decoding {root}")
    if not done:
        raise ValueError(f"no readable images under {root}; see {bad[0][0]}: {bad[0][1]}")
    out = dict(x=np.stack([r[0] for _, r in done]), masks=np.stack([r[1] for _, r in done]).astype(np.uint8)
               if masks else None, ids=[id_of[f] for f, _ in done], bad=bad)
    np.savez(f"{cache}.{os.getpid()}.tmp.npz", x=out["x"], masks=out["masks"] if masks else np.zeros(0, np.uint8),
             ids=np.array(out["ids"]), bad=np.array([f"{p}\t{w}" for p, w in out["bad"]], dtype=str), stamp=stamp)
    os.replace(f"{cache}.{os.getpid()}.tmp.npz", cache)          # written beside, then renamed: never half a cache
    if out["bad"]:
        with open(os.path.join(folder, "bad_files.txt"), "w") as f:
            f.writelines(f"{p}\t{w}\n" for p, w in out["bad"])
        print(f"skipped {len(out['bad'])} unreadable file(s), listed in {os.path.join(folder, 'bad_files.txt')}")
    return out


def read_mask(path, shape):
    """A lung mask as float (H, W) 0/1: lung where a pixel is over half the mask's maximum, so that 0/1, 0/255 and
    anti-aliased masks (OpenIST's) all give the outline drawn; ValueError if it is not `shape`."""
    with Image.open(path) as im:
        m = np.asarray(im.convert("L"))
    if m.shape != tuple(shape):                       # resized apart, they would no longer line up
        raise ValueError(f"mask {path} is {m.shape[1]}x{m.shape[0]} but the image is {shape[1]}x{shape[0]}; masks "
                         f"must have their image's size")
    if not m.any():                                   # seg-black would train on a black image
        raise ValueError(f"mask {path} has no lung pixel; fix it, or leave the image out (--skip-bad)")
    return (m > m.max() / 2).astype(np.float32)


def read_label_csv(path, id_column, label_column, split_column):
    """{image id: (label, split or None)} from a CSV as hospitals export them (comma, semicolon or tab; UTF-8, with a
    byte-order mark or not). A row repeated word for word counts once; two that disagree stop, naming both lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels {path}: no such file")
    try:
        text = open(path, newline="", encoding="utf-8-sig").read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--labels {path}: not UTF-8 text (byte {e.start}): save it as UTF-8 CSV") from None
    reader = csv.DictReader(text.splitlines(), delimiter=max(",;\t", key=text.split("\n")[0].count))  # the header's
    cols = reader.fieldnames or []
    for c in (id_column, label_column):
        if c not in cols:
            raise ValueError(f"{path} has no column {c!r} (columns: {', '.join(cols)}); set --id-column / "
                             f"--label-column")
    rows, where, repeats = {}, {}, 0
    for line, r in enumerate(reader, 2):                    # line 1 is the header
        if not (r[id_column] or "").strip() or not (r[label_column] or "").strip():
            raise ValueError(f"{path}: line {line} has no {'id' if not (r[id_column] or '').strip() else 'label'} "
                             f"({id_column}={r[id_column]!r}, {label_column}={r[label_column]!r}); every row needs "
                             f"both, or leave the image out of the CSV")
        i = os.path.splitext(os.path.basename(r[id_column].strip()))[0]
        split = (r.get(split_column) or "").strip().lower() if split_column in cols else None
        if split is not None and split not in ("train", "val", "test"):
            raise ValueError(f"{path}: line {line}: image {i} has split {split!r}; use train, val or test")
        row = (r[label_column].strip(), split)
        if i in rows and rows[i] != row:
            raise ValueError(f"{path}: image {i!r} is on line {where[i]} as {rows[i]} and on line {line} as {row}: "
                             f"one row per image; decide which is right and delete the other")
        repeats += i in rows
        rows[i], where[i] = row, where.get(i, line)
    if repeats:
        print(f"{path}: {repeats} row(s) repeat an earlier row word for word; each image counted once")
    return rows


def stratified_split(y, fractions, seed):
    """Split name per image: within each class a seeded permutation cut by the fractions."""
    names, g = np.empty(len(y), dtype=object), torch.Generator().manual_seed(seed)
    for c in sorted(set(y.tolist())):
        idx = np.nonzero(y == c)[0][torch.randperm(int((y == c).sum()), generator=g).numpy()]
        n_train, n_val = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        names[idx[:n_train]], names[idx[n_train:n_train + n_val]], names[idx[n_train + n_val:]] = "train", "val", "test"
    return names


def apply_variant(x, masks, variant, gray=None):
    """full: unchanged; seg-black: zero outside the lungs; seg-gray: `gray` (uint8) outside."""
    if variant == "full":
        return x
    if masks is None:
        raise ValueError(f"--variant {variant} needs lung masks (--masks DIR)")
    return x * masks if variant == "seg-black" else torch.where(masks.bool(), x, torch.full_like(x, gray))


def load_xray(root, split, img_size, labels=None, id_column="id", label_column="label", split_column="split",
              split_fractions=(0.7, 0.1, 0.2), classes=None, masks=None, variant="full", channels=1,
              window_percentile=0.5, keep_aspect=True, cache_dir=None, skip_bad=False, seed=0, num_workers=4):
    """Chest X-rays: decode (or read the cache), attach labels and masks, split, apply the variant, and compute
    mean and std on the training split of that variant."""
    if variant != "full" and not masks:
        raise ValueError(f"--variant {variant} needs lung masks: add --masks DIR")
    d = decode_xrays(root, img_size, masks, keep_aspect, window_percentile, cache_dir, skip_bad, num_workers)
    ids, x, m = np.array(d["ids"]), torch.from_numpy(d["x"])[:, None], d["masks"]
    m, bad = None if m is None else torch.from_numpy(m)[:, None], {os.path.basename(p).rsplit(".", 1)[0]
                                                                   for p, _ in d["bad"]}
    y, names, rows = None, [], None
    if labels:
        rows = read_label_csv(labels, id_column, label_column, split_column)
        present, unlabelled = set(ids.tolist()) | bad, [str(i) for i in ids if i not in rows]
        if missing := [i for i in rows if i not in present]:          # (one set, not one per row: 30,000 rows)
            raise ValueError(f"{labels}: {len(missing)} labelled image(s) not found under {root}, e.g. {missing[0]!r}")
        if unlabelled and not skip_bad:
            raise ValueError(f"{len(unlabelled)} image(s) under {root}, e.g. {unlabelled[0]!r}, have no row in "
                             f"{labels} (--skip-bad to leave them out)")
        if unlabelled:
            print(f"left out {len(unlabelled)} image(s) without a row in {labels}, e.g. {unlabelled[0]!r}")
        names = sorted({lab for lab, _ in rows.values()})
        if unknown := [c for c in classes or [] if c not in names]:
            raise ValueError(f"--classes {unknown[0]!r} is not a label in {labels} (labels: {', '.join(names)})")
        names = sorted(classes) if classes else names
        keep = torch.tensor([i in rows and rows[i][0] in names for i in ids], dtype=torch.bool)
        ids, x, m = ids[keep.numpy()], x[keep], m[keep] if m is not None else None
        y = torch.tensor([names.index(rows[i][0]) for i in ids], dtype=torch.long)
    has_split = rows is not None and all(rows[i][1] is not None for i in ids)
    split_of = np.array([rows[i][1] for i in ids]) if has_split else \
        stratified_split(y.numpy() if y is not None else np.zeros(len(ids), np.int64), split_fractions, seed)
    train = torch.from_numpy(split_of == "train")
    if empty := [k for k in range(len(names)) if not (y[train] == k).any()] if y is not None else []:  # never trained
        raise ValueError(f"{labels}: class {names[empty[0]]!r} has no training image ({int((y == empty[0]).sum())} in "
                         f"all); add images of it, move some to train, or leave it out with --classes")
    xv = apply_variant(x, m, variant, int(round(x[train].float().mean().item())) if variant == "seg-gray" else None)
    mean, std = channel_stats(xv[train], f"the {variant} training images under {root}")
    sel = torch.from_numpy(split_of == split)
    return ImageSet(xv[sel].expand(-1, channels, -1, -1), y[sel] if y is not None else None, names, mean * channels,
                    std * channels, masks=m[sel] if m is not None else None, ids=ids[sel.numpy()].tolist())


# ----------------------------------------------------------------------------- downloads, pinned digests

OPENIST = "0a3fceb1ac58e1848f994ee6ec226c58e55d70b0"          # pi-null-mezon/OpenIST at this commit; no licence file
ZENODO = "https://zenodo.org/records/10519652/files/pneumoniamnist"                             # MedMNIST v2, CC BY 4.0
DOWNLOADS = {  # name: (source URL, its MD5, the folder it unpacks to); CIFAR and STL-10 as torchvision pins them
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb",
              "stl10_binary"),
    **{f"pneumoniamnist{s}": (f"{ZENODO}{s}.npz", md5, None) for s, md5 in (
        ("", "28209eda62fecd6e6a2d98b1501bb15f"), ("_64", "8f4eceb4ccffa70c672198ea285246c6"),
        ("_128", "05b46931834c231683c68f40c47b2971"), ("_224", "d6a3c71de1b945ea11211b03746c1fe1"))},
    # GitHub's archive of a commit is not byte-stable: what is pinned is the git tree id of Datasets/Chest_x-ray/
    "openist": (f"https://github.com/pi-null-mezon/OpenIST/archive/{OPENIST}.tar.gz",
                "tree 386be87a52f346e3c59d1d695623a046b1de7f47", "openist"),
}


def fetch(name, root="data", mirror=None):
    """Dataset `name` in root, fetched once from its source or a mirror (a URL or folder with the same file names;
    $DSMAE_MIRROR): downloaded beside (.part), its digest checked, renamed; archives unpacked beside, checked, renamed.
    Nothing in root is overwritten; a file put there by hand is checked too. Returns what the readers take."""
    from torchvision.datasets.utils import calculate_md5, download_url
    url, digest, folder = DOWNLOADS[name]
    file = os.path.basename(url) if name != "openist" else f"OpenIST-{OPENIST}.tar.gz"
    path, part, md5 = os.path.join(root, file), os.path.join(root, file + ".part"), digest.removeprefix("tree ")
    if os.path.exists(os.path.join(root, folder or file)):
        return os.path.join(root, folder or file)
    mirror = mirror or os.environ.get("DSMAE_MIRROR")
    src = (mirror.rstrip("/") + "/" + file if "://" in mirror else os.path.join(mirror, file)) if mirror else url
    fetched, part = not os.path.exists(path), part if not os.path.exists(path) else path    # else put here by hand
    if fetched:
        print(f"fetching {src} -> {path}")
        os.makedirs(root, exist_ok=True)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(part)                                     # left by an interrupted run: start anew
            download_url(src, root, file + ".part") if "://" in src else shutil.copyfile(src, part)
        except Exception as e:                                      # no network, a 404, a dropped connection
            with contextlib.suppress(FileNotFoundError):
                os.remove(part)
            raise FileNotFoundError(f"could not fetch {src} ({type(e).__name__}: {e}). Without a network, put {file} "
                                    f"(or its unpacked {folder or file}) in {root}/, or point --mirror (DSMAE_MIRROR) "
                                    f"at a copy, then rerun") from None
    if not digest.startswith("tree") and (actual := calculate_md5(part)) != md5:
        if fetched:                                                 # ours: removed; the user's: theirs to decide
            os.remove(part)
        raise ValueError(f"{src if fetched else path}: MD5 {actual}, expected {md5}: not the file this project pins "
                         f"(corrupt, or changed at the source); " + ("removed" if fetched else "delete it and rerun"))
    os.replace(part, path)
    try:
        return _unpack(path, root, folder, digest) if folder else path
    except (ValueError, tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(os.path.join(root, f".{folder}.part"), ignore_errors=True)
        if fetched:                                                 # ours, and not the pinned content
            os.remove(path)
        raise e if isinstance(e, ValueError) else ValueError(f"{path} is not a whole archive ({type(e).__name__}: "
                                                             f"{e}); {'removed' if fetched else 'delete it'}, rerun")


def git_tree(blobs):
    """git's tree id of a folder of plain files, {name: content}: a commit's content, whatever an archive's bytes."""
    t = b"".join(b"100644 %s\0%s" % (n.encode(), hashlib.sha1(b"blob %d\0%s" % (len(c), c)).digest())
                 for n, c in sorted(blobs.items()))
    return hashlib.sha1(b"tree %d\0%s" % (len(t), t)).hexdigest()


def _unpack(archive, root, folder, digest):
    """Unpack beside, check, rename. A member that would land outside (an absolute path, '..', a link, a device)
    refuses the archive: a mirror is trusted no more than the source. OpenIST: its Datasets/Chest_x-ray/ only, as
    images/<id>.jpg and masks/<id>.png, the git tree id of the files checked."""
    tmp = os.path.join(root, f".{folder}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for m in (members := tar.getmembers()):
            if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: member {m.name!r} would land outside {folder}/ or is a link: refused, "
                                 f"nothing unpacked (a tampered archive?); delete it and fetch it again")
        if not digest.startswith("tree"):
            tar.extractall(tmp, filter="data")
        else:            # git's tree id of a folder of plain files: the content, whatever the archive's bytes
            inside, blobs = f"OpenIST-{OPENIST}/Datasets/Chest_x-ray/", {}
            for m in (m for m in members if m.isfile() and m.name.startswith(inside)):
                blobs[name := m.name[len(inside):]] = tar.extractfile(m).read()
                m.name = f"{folder}/masks/{name[:-5]}.png" if name.endswith("@.png") else f"{folder}/images/{name}"
                tar.extract(m, tmp, filter="data")
            if git_tree(blobs) != digest[5:]:
                raise ValueError(f"{archive}: its Datasets/Chest_x-ray/ is not the pinned one (git tree "
                                 f"{digest[5:]}, OpenIST at {OPENIST[:7]}); nothing was kept")
            print(f"{root}/openist: 275 normal radiographs, lung masks. No licence: your research only, not to share")
    if not os.path.isdir(os.path.join(tmp, folder)):
        raise ValueError(f"{archive} holds no {folder}/: not the archive this project pins")
    os.replace(os.path.join(tmp, folder), os.path.join(root, folder))
    shutil.rmtree(tmp)
    return os.path.join(root, folder)


if __name__ == "__main__":                  # python data.py download NAME [NAME ...] [--data-dir DIR] [--mirror M]
    p = argparse.ArgumentParser(prog="data.py", description="fetch datasets (docs/data.md: sources and licences)")
    d = p.add_subparsers(dest="command", required=True).add_parser("download", help="fetch datasets into --data-dir")
    d.add_argument("names", nargs="+", choices=list(DOWNLOADS), metavar="NAME", help=", ".join(DOWNLOADS))
    d.add_argument("--data-dir", default="data")
    d.add_argument("--mirror", default=None, help="a URL or folder with the same files (default: $DSMAE_MIRROR)")
    args = finish_parser(p).parse_args()
    for n in args.names:
        try:
            print(f"{n}: {fetch(n, args.data_dir, args.mirror)}")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
