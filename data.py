"""Datasets as uint8 tensors in memory, and augmentation applied to whole batches as tensors on
the training device (a GPU never waits for PIL, and the same code runs on a CPU).

    ds = build_dataset("cifar10", "train", data_dir="data")   # ImageSet: x (N, C, H, W) uint8, y
    for idx in epoch_batches(len(ds), 256, epoch=0, seed=0):
        x = augment(ds.x[idx].to(device), 32, ds.mean, ds.std)  # (256, C, 32, 32) float

Sources, each read from its real on-disk format:
  synthetic  10 classes of drawn shapes on varied backgrounds, generated from a seed (no files)
  cifar10    torchvision's cifar-10-batches-py/ pickles        (--download fetches them)
  cifar100   torchvision's cifar-100-python/ pickles           (--download fetches them)
  stl10      stl10_binary/*.bin; splits train, test, unlabeled, train+unlabeled
  npz        one .npz: x (N, H, W, C) uint8, optional y, class_names, x_test/y_test
  folder     one subfolder of images per class (optionally under train/ and test/)
  dicom      chest X-rays: a folder of .dcm files (or PNG/JPEG exports), a labels CSV, lung masks
             (see add_data_args); decoded once and cached as uint8
Labels are checked as they are read (check_labels); unlabelled images (STL-10 unlabeled, an npz
without y) have y = None, so nothing trains a classifier or a k-NN on them by accident. What the
scripts' command lines share, the data flags among them: Number (a flag's range), ArgumentParser.
"""
import argparse
import copy
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


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
        """At most n images, evenly spaced: about n / classes of each class when the set is sorted or
        shuffled by class (a label budget: --max-train). n = 0: all of them."""
        return self if not n or n >= len(self) else self.subset(torch.linspace(0, len(self) - 1, n).long())


DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "npz", "folder", "dicom")
STATS = {  # published per-channel statistics of the training splits
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# the model and patch geometry each dataset is evaluated with when no checkpoint says otherwise: the
# paper's Table 1 for CIFAR and STL-10, the lab configuration for synthetic (name, img_size, patch_size)
GEOMETRY = {"synthetic": ("vit_micro", 32, 4), "cifar10": ("vit_tiny", 32, 2), "cifar100": ("vit_tiny", 32, 2),
            "stl10": ("vit_small", 96, 6), "npz": ("vit_tiny", 32, 4), "folder": ("vit_small", 224, 16),
            "dicom": ("vit_small", 224, 16)}


def build_dataset(name, split="train", *, data_dir="data", img_size=32, download=False, seed=0, num_workers=4,
                  variant="full", **xray):
    """One split of one dataset as an ImageSet. Raises FileNotFoundError naming the place it
    looked and what to run when the files are missing, ValueError for files it cannot use.
    `xray` holds the dicom options (data_options(args)); `variant` other than full needs lung masks."""
    if name == "dicom":
        return load_xray(data_dir, split, img_size, seed=seed, num_workers=num_workers, variant=variant, **xray)
    if variant != "full":
        raise ValueError(f"--variant {variant} needs lung masks: only --dataset dicom with --masks has them")
    if name == "synthetic":
        return synthetic_shapes(split, img_size, seed)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, split, name, download)
    if name == "stl10":
        return load_stl10(data_dir, split, download)
    if name == "npz":
        return load_npz(data_dir, split)
    if name == "folder":
        return load_folder(data_dir, split, img_size, num_workers, xray.get("skip_bad", False))
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def load_split(args, split, img_size, download=False):
    """build_dataset with the flags every script shares (--dataset, --data-dir, --seed,
    --num-workers and add_data_args' X-ray flags). Under torchrun, one decoded copy per machine:
    see shared_per_machine."""
    build = lambda: build_dataset(args.dataset, split, data_dir=args.data_dir, img_size=img_size, download=download,
                                  seed=args.seed, num_workers=args.num_workers, **data_options(args))
    key = (args.dataset, os.path.abspath(args.data_dir), split, img_size, args.seed, sorted(data_options(args).items()))
    return shared_per_machine(build, key)


# ----------------------------------------------------------------------------- batches and transforms, on the training device

def epoch_batches(n, batch_size, epoch, seed, rank=0, world_size=1, start=0):
    """Index tensors of this rank's part of each global batch of an epoch.

    One permutation per (seed, epoch), identical on every rank; global batch b is
    perm[b * batch_size : (b + 1) * batch_size] and rank r takes its r-th slice, so ranks read
    disjoint shards and N ranks see exactly the images one process would. The incomplete last
    batch is dropped; start skips batches already done (resume mid-epoch).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    local = batch_size // world_size
    for b in range(start, n // batch_size):
        first = b * batch_size + rank * local
        yield perm[first:first + local]


def normalize(x, mean, std):
    """uint8 or [0, 1] float images -> (x / 255 - mean) / std, in float32."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def preprocess(x, size, mean, std):
    """Evaluation transform: resize (if needed) and normalise a uint8 batch."""
    x = normalize(x, mean, std)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def augment(x, size, mean, std, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """Random resized crop + horizontal flip + normalise, for a whole uint8 batch at once.

    Each image gets its own crop (area fraction in `scale`, aspect in `ratio`, a crop that
    would leave the image is shrunk to fit) as one affine transform, and one grid_sample
    resamples the batch bilinearly. Uses the global RNG of x's device.
    """
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    logr = torch.empty(B, device=dev).uniform_(np.log(ratio[0]), np.log(ratio[1]))
    w = (area * logr.exp()).sqrt().clamp(max=1.0)             # crop width / image width
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)         # crop centre in [-1, 1] coordinates
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(out.div_(255), mean, std)


# ----------------------------------------------------------------------------- statistics, splits, DDP

def channel_stats(x, source="the images", chunk=1024):
    """Per-channel mean and std in [0, 1] of a uint8 (N, C, H, W) tensor, in float64. A channel
    without variation cannot be normalised (and holds nothing to learn): ValueError naming source."""
    if len(x) == 0:
        raise ValueError(f"{source}: no images")
    s = s2 = 0.0
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].double().div_(255)
        s = s + c.sum(dim=(0, 2, 3))
        s2 = s2 + c.pow(2).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt()
    flat = (std < 1e-3).nonzero().flatten().tolist()
    if flat:
        raise ValueError(f"{source}: channel {flat[0]} is constant (every pixel {mean[flat[0]] * 255:.0f}): nothing to "
                         f"normalise or learn from; check the files")
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def holdout_split(y, n, split, fraction=0.1):
    """Indices of a deterministic train/test split for sources without one: the last
    `fraction` of each class (in file order) is the test set; of all images when unlabelled."""
    groups = [torch.arange(n)] if y is None else [torch.nonzero(y == c).flatten() for c in y.unique()]
    keep = []
    for g in groups:
        n_test = int(round(fraction * len(g)))
        keep.append(g[len(g) - n_test:] if split == "test" else g[:len(g) - n_test])
    return torch.cat(keep).sort().values


def check_labels(y, n, num_classes, source):
    """Labels a classifier can use, as int64: one per image (n), whole numbers, 0 <= y < num_classes.
    ValueError naming source, the first bad index and its value, so a file is fixed in one go."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{source} has shape {y.shape} but x holds {n} images; one label per image expected")
    if y.dtype.kind not in "iub":
        whole = np.isfinite(y) & (y == np.round(y)) if y.dtype.kind == "f" else np.zeros(n, bool)
        if not whole.all():
            i = int(np.argmin(whole))
            raise ValueError(f"{source}: label {y[i]} at index {i} is not a whole number; labels are class indices")
    bad = np.nonzero((y < 0) | (y >= num_classes))[0]
    if len(bad):
        raise ValueError(f"{source}: label {y[bad[0]]:g} at index {bad[0]} is outside 0..{num_classes - 1} "
                         f"({num_classes} classes; {len(bad)} such label(s)); labels must be 0 <= y < classes")
    return torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------- command line: ranges in the parser

class Number:
    """An argparse type for a number in an interval, written as in mathematics: Number(int, "[1, inf)"),
    Number(float, "(0, 1]"); multiple=4 for widths the sin-cos table splits in four. nan and inf are
    refused everywhere. items=True: a comma-separated list of such numbers, with count and total
    when the list has a fixed length or sum (split fractions); text=True returns the text itself.
    The interval is shown by --help (HelpFormatter) and in the one-line error argparse prints:
    `argument --lam: 2 is not a number in [0, 1]`, exit code 2, before any work starts."""

    def __init__(self, kind, interval, *, multiple=None, items=False, count=None, total=None, text=False):
        self.kind, self.interval, self.multiple = kind, interval, multiple
        self.items, self.count, self.total, self.text = items, count, total, text
        lo, hi = (v.strip() for v in interval[1:-1].split(","))
        self.lo, self.hi = float(lo), float(hi)
        self.lo_open, self.hi_open = interval[0] == "(", interval[-1] == ")"
        noun = ("integer" if kind is int else "number") + ("s" if items else "")
        where = (f"> {lo}" if self.lo_open else f">= {lo}") if self.hi == math.inf else f"in {interval}"
        self.range = (f"a list of {f'{count} ' if count else ''}" if items else "an " if kind is int else "a ") + \
            f"{noun} {where}" + (f", a multiple of {multiple}" if multiple else "") + \
            (f", summing to {total:g}" if total is not None else "")

    def one(self, s):
        try:
            v = self.kind(s)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and (self.lo < v if self.lo_open else self.lo <= v) and (v < self.hi if self.hi_open
                else v <= self.hi) and (not self.multiple or v % self.multiple == 0)):
            raise argparse.ArgumentTypeError(f"{s} is not {self.range}")
        return v

    def __call__(self, s):
        if not self.items:
            return self.one(s)
        try:
            values = [self.one(v.strip()) for v in s.split(",")]
        except argparse.ArgumentTypeError:
            values = []
        if not values or (self.count and len(values) != self.count) or \
                (self.total is not None and abs(sum(values) - self.total) > 1e-6):
            raise argparse.ArgumentTypeError(f"{s} is not {self.range}")
        return s if self.text else values


# the ranges most flags take
POS_INT, NONNEG_INT = Number(int, "[1, inf)"), Number(int, "[0, inf)")        # sizes and counts; 0: off / all
POS, NONNEG = Number(float, "(0, inf)"), Number(float, "[0, inf)")             # learning rates; decays, minutes
SEED = Number(int, "[0, 1000000]")           # pretrain.py's per-step seeds stay inside torch's 64 bits


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the docstring as written, and after each flag's help its range (numbers) and default."""

    def _format_action(self, action):
        rng = getattr(action.type, "range", None)
        if rng and action.help != argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = f"{action.help}; {rng}" if action.help else rng
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, whose errors are one line (`pretrain.py: error: argument --lam: 2 is not a number
    in [0, 1] (--help lists every flag)`, exit code 2), not under the whole usage (pretrain.py's is 30 lines)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


# ----------------------------------------------------------------------------- one copy per machine under torchrun

_DATA_GROUP = []


def _data_group():
    """A gloo group with a day's timeout, for ranks that wait on a download or a decode: on the
    default group they would hit its collective timeout (NCCL's: 10 minutes) during a long decode."""
    if not _DATA_GROUP:
        from datetime import timedelta
        _DATA_GROUP.append(dist.new_group(backend="gloo", timeout=timedelta(days=1)))
    return _DATA_GROUP[0]


def _meet(group, err):
    """A barrier that carries errors: every rank raises the first error any rank met, so a missing
    dataset stops all of them with the same one line instead of leaving the others waiting."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, None if err is None else (type(err).__name__, str(err)), group=group)
    first = next((e for e in errs if e), None)
    if first:
        raise (FileNotFoundError if first[0] == "FileNotFoundError" else ValueError)(first[1])


def _shared_prefix(key):
    """Files of one torchrun job on one machine: in /dev/shm (memory) where there is one."""
    import hashlib
    import tempfile
    job = [os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")]
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "dsmae_" + hashlib.sha1(repr((key, job)).encode()).hexdigest()[:16])


def _write_shared(ds, prefix):
    import json
    for name in ("x", "y", "masks"):
        if getattr(ds, name) is not None:
            np.save(f"{prefix}.{name}.npy", getattr(ds, name).numpy())
    with open(f"{prefix}.json", "w") as f:
        json.dump(dict(classes=[str(c) for c in ds.classes], mean=ds.mean, std=ds.std, ids=ds.ids), f)


def _read_shared(prefix):
    """The ImageSet written by _write_shared, its arrays memory-mapped copy-on-write: every rank
    of the machine reads the same pages, and nothing here ever writes to them."""
    import json
    meta = json.load(open(f"{prefix}.json"))
    arr = lambda n: torch.from_numpy(np.load(f"{prefix}.{n}.npy", mmap_mode="c")) \
        if os.path.exists(f"{prefix}.{n}.npy") else None
    return ImageSet(arr("x"), arr("y"), meta["classes"], tuple(meta["mean"]), tuple(meta["std"]), masks=arr("masks"),
                    ids=meta["ids"])


def shared_per_machine(build, key):
    """build() once per machine under torchrun, and every rank maps that one decoded copy.

    Global rank 0 builds first (downloads, writes decode caches) while every other rank waits;
    then the first rank of each other machine (LOCAL_RANK 0), which finds those files in place on
    a shared file system. Each builder writes its arrays to /dev/shm and maps them back, the other
    ranks of its machine map them too, and the files are unlinked once all have mapped them (the
    memory stays until the last rank exits). Host memory for the data: one copy per machine instead
    of one per rank. Without torchrun: build() as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    # without torchrun's LOCAL_RANK (torch.multiprocessing.spawn), the ranks are taken as one machine's
    group, rank = _data_group(), dist.get_rank()
    leader = int(os.environ.get("LOCAL_RANK", rank)) == 0
    prefix, err = _shared_prefix(key), None
    for turn in (0, 1):
        if leader and (rank == 0) == (turn == 0):
            try:
                _write_shared(build(), prefix)
            except Exception as e:                   # reported to every rank by _meet
                err = e
        _meet(group, err)
    ds = _read_shared(prefix)
    _meet(group, None)
    if leader:
        for f in os.listdir(os.path.dirname(prefix)):
            if f.startswith(os.path.basename(prefix) + "."):
                try:
                    os.remove(os.path.join(os.path.dirname(prefix), f))
                except FileNotFoundError:             # two "machines" on one host share /dev/shm
                    pass
    return ds


def _check_split(split, allowed, name):
    if split not in allowed:
        raise ValueError(f"{name} has splits {', '.join(allowed)}, not {split!r}")

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
    """A labelled set of 10 shape classes, generated deterministically from (seed, split).

    Each image: a two-colour gradient background at a random angle, one shape of a random
    colour, size, position and aspect, and pixel noise over both. Colour and position carry no class
    information, so a k-NN must see shape to beat chance: random features get little of it,
    pretraining visibly more. 5,000 training and 1,000 test images.
    """
    _check_split(split, ("train", "test"), "synthetic")
    n = n or (5000 if split == "train" else 1000)
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    rand = lambda *shape: torch.rand(*shape, generator=g)
    y = torch.randperm(n, generator=g) % len(SHAPES)
    S = 2 * img_size                                           # draw at 2x, then average: smooth edges
    coords = (torch.arange(S) + 0.5) / S
    Y, X = torch.meshgrid(coords, coords, indexing="ij")
    img = torch.empty(n, 3, S, S)
    # colours: a random grey level plus a moderate tint, so that colour varies a lot between
    # images without drowning the shape in it
    colours = lambda k: (rand(k, 1, 1, 1) + 0.3 * (rand(k, 3, 1, 1) - 0.5)).clamp(0, 1)
    # background: gradient between two colours along a random direction
    c0, c1, angle = colours(n), colours(n), rand(n, 1, 1) * 2 * torch.pi
    t = ((X - 0.5) * angle.cos() + (Y - 0.5) * angle.sin() + 0.71) / 1.42     # in [0, 1]
    img[:] = c0 + (c1 - c0) * t.unsqueeze(1)
    # shape: centre, size and aspect, colour far enough from the background to be seen
    cx, cy = 0.3 + 0.4 * rand(n, 1, 1), 0.3 + 0.4 * rand(n, 1, 1)
    size, aspect = 0.25 + 0.15 * rand(n, 1, 1), 0.8 + 0.4 * rand(n, 1, 1)
    u, v = (X - cx) / (size * aspect), (Y - cy) / (size / aspect)
    colour = colours(n)
    bg = (c0 + c1) / 2
    colour = torch.where((colour - bg).abs().sum(1, keepdim=True) < 0.6, 1 - colour, colour)
    mask = torch.zeros(n, S, S, dtype=torch.bool)
    for c in range(len(SHAPES)):
        sel = y == c
        mask[sel] = _shape_mask(c, u[sel], v[sel])
    img = torch.where(mask.unsqueeze(1), colour.expand(-1, -1, S, S), img)
    img = F.avg_pool2d(img, 2) + 0.04 * torch.randn(n, 3, img_size, img_size, generator=g)
    img = img.clamp(0, 1)
    x = (img * 255).round().to(torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return ImageSet(x, y, list(SHAPES), mean, std)


# ----------------------------------------------------------------------------- CIFAR

def load_cifar(root, split, name, download=False):
    _check_split(split, ("train", "test"), name)
    ten = name == "cifar10"
    base = os.path.join(root, "cifar-10-batches-py" if ten else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]) if ten \
        else [split]
    paths = [os.path.join(base, f) for f in files]
    if not all(os.path.exists(p) for p in paths) and download:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if ten else torchvision.datasets.CIFAR100
        cls(root, train=split == "train", download=True)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: looked for {missing[0]}. Add --download to fetch it "
            f"(about 170 MB), or point --data-dir at the folder that holds {os.path.basename(base)}/.")
    xs, ys = [], []
    for p in paths:
        with open(p, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(check_labels(d["labels"] if ten else d["fine_labels"], len(xs[-1]), 10 if ten else 100, p))
    with open(os.path.join(base, "batches.meta" if ten else "meta"), "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names" if ten else "fine_label_names"]
    mean, std = STATS[name]
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.cat(ys), classes, mean, std)


# ----------------------------------------------------------------------------- STL-10

def load_stl10(root, split, download=False):
    _check_split(split, ("train", "test", "unlabeled", "train+unlabeled"), "stl10")
    base = os.path.join(root, "stl10_binary")
    parts = split.split("+")
    needed = [os.path.join(base, f"{p}_X.bin") for p in parts]
    if not all(os.path.exists(p) for p in needed) and download:
        import torchvision
        torchvision.datasets.STL10(root, split="train", download=True)   # fetches every split
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"stl10 not found: looked for {missing[0]}. Add --download to fetch it "
            f"(about 2.6 GB), or point --data-dir at the folder that holds stl10_binary/.")
    xs, ys = [], []
    for p in parts:
        # copy-on-write memory map: ranks on one machine share the page cache (the unlabeled
        # split is 2.8 GB); images are stored column-major, hence the transposed view
        raw = np.memmap(os.path.join(base, f"{p}_X.bin"), dtype=np.uint8, mode="c")
        xs.append(torch.from_numpy(raw).view(-1, 3, 96, 96).transpose(2, 3))
        if p != "unlabeled":                        # labels 1..10 on disk
            f = os.path.join(base, f"{p}_y.bin")
            ys.append(check_labels(np.fromfile(f, dtype=np.uint8).astype(np.int64) - 1, len(xs[-1]), 10, f))
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    y = ys[0] if split in ("train", "test") else None      # unlabeled images never carry a label
    names = os.path.join(base, "class_names.txt")
    classes = open(names).read().split() if os.path.exists(names) else [str(i) for i in range(10)]
    mean, std = STATS["stl10"]
    return ImageSet(x, y, classes, mean, std)


# ----------------------------------------------------------------------------- npz, folder

def load_npz(path, split):
    _check_split(split, ("train", "test"), "npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset not found: {path} is not a file. Point --data-dir at a .npz "
                                f"holding x (N, H, W, C) uint8 and optionally y (N,).")
    d = np.load(path)
    if "train_images" in d and "x" not in d:           # MedMNIST's layout (e.g. pneumoniamnist_28.npz)
        flat = lambda a: a.reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a    # (N, 1) -> (N,); multi-label stays
        d = {"x": d["train_images"], "y": flat(d["train_labels"]), "x_test": d["test_images"],
             "y_test": flat(d["test_labels"]), **({"class_names": d["class_names"]} if "class_names" in d else {})}
    if "x" not in d:
        raise ValueError(f"{path} has no array 'x' (keys: {', '.join(d.files)})")
    key = "_test" if split == "test" and "x_test" in d else ""
    x = d["x" + key]
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"{path}: x{key} must be uint8 (N, H, W, C) or (N, H, W), got {x.dtype} {x.shape}")
    # the classes: class_names, else up to the largest label of either split, so that train and test agree
    labels = {k: np.asarray(d[k]) for k in ("y", "y_test") if k in d}      # an npz decompresses on every read
    finite = [a[np.isfinite(a)] for a in labels.values() if a.dtype.kind in "iubf"]
    classes = [str(c) for c in d["class_names"]] if "class_names" in d else \
        [str(c) for c in range(int(max((a.max() for a in finite if a.size), default=-1)) + 1)]
    y = check_labels(labels["y" + key], len(x), len(classes), f"{path}: y{key}") if "y" + key in labels else None
    # (N, C, H, W) views of the file's (N, H, W, C) array: one copy at the end, of the chosen images only
    nchw = lambda a: torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2)
    x = nchw(x)
    if "x_test" not in d:
        # no test split in the file: hold out the last 10% of each class, statistics from the rest
        train = holdout_split(y, len(x), "train")
        mean, std = channel_stats(x.index_select(0, train), path)
        keep = train if split == "train" else holdout_split(y, len(x), "test")
        x, y = x.index_select(0, keep), (y[keep] if y is not None else None)
    else:
        mean, std = channel_stats(x if key == "" else nchw(d["x"]), path)
        x = x.contiguous()
    return ImageSet(x, y, classes, mean, std)


def _decode(path, size):
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = size / min(im.size)                             # shorter side to size, then centre crop
            w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as e:                                       # truncated, not an image, unreadable
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def check_fits_in_memory(n, channels, size, what):
    """Datasets are held in memory as uint8: stop before decoding when n images of size x size
    would take more than 80% of the memory available now, with the estimate and the ways out."""
    need = n * channels * size * size
    try:
        avail = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration):
        return
    if need > 0.8 * avail:
        raise ValueError(f"{what}: {n} images at {size}x{size}x{channels} need {need / 2**30:.1f} GiB in memory "
                          f"(uint8), {avail / 2**30:.1f} GiB is available: use a smaller --img-size, a subset of "
                          f"the images, or a machine with more memory")


@lru_cache(maxsize=4)
def _decode_folder(base, img_size, num_workers, skip_bad=False):
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    files, labels = [], []
    for i, c in enumerate(classes):
        names = sorted(f for f in os.listdir(os.path.join(base, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(base, c, f) for f in names]
        labels += [i] * len(names)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {base}")
    check_fits_in_memory(len(files), 3, img_size, base)

    def one(f):
        try:
            return _decode(f, img_size)
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e} (--skip-bad to leave such files out)") from None
            return str(e)
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:        # PIL releases the GIL while decoding
        arrays = list(pool.map(one, files))
    bad = [a for a in arrays if isinstance(a, str)]
    if bad:
        print(f"left out {len(bad)} unreadable image(s) of {base}, e.g. {bad[0]}")
    keep = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
    if not keep:
        raise ValueError(f"no readable images in {base}")
    x = torch.from_numpy(np.stack([arrays[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)[keep], classes


def load_folder(root, split, img_size, num_workers=4, skip_bad=False):
    """root/<class>/*.png (the last 10% per class is then the test split), or
    root/train/<class>/... and root/test/<class>/... Decoded once per process, resized; an
    unreadable file stops the run, naming it (skip_bad: left out, counted)."""
    _check_split(split, ("train", "test"), "folder")
    explicit = os.path.isdir(os.path.join(root, "train"))
    base = os.path.join(root, split) if explicit else root
    if not os.path.isdir(base):
        raise FileNotFoundError(f"folder dataset not found: {base} is not a directory. Point --data-dir at a "
                                f"folder with one subfolder of images per class.")
    x, y, classes = _decode_folder(base, img_size, num_workers, skip_bad)
    if explicit:
        stats = channel_stats(_decode_folder(os.path.join(root, "train"), img_size, num_workers, skip_bad)[0],
                              os.path.join(root, "train"))
        return ImageSet(x, y, classes, *stats)
    train = holdout_split(y, len(x), "train")
    keep = train if split == "train" else holdout_split(y, len(x), "test")
    return ImageSet(x[keep], y[keep], classes, *channel_stats(x[train], root))


# ----------------------------------------------------------------------------- chest X-rays

VARIANTS = ("full", "seg-black", "seg-gray")
XRAY_CACHE_VERSION = 1
# what decodes each compressed transfer syntax when pydicom's own handlers cannot
DECODERS = {
    "1.2.840.10008.1.2.4.50": "pillow or pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls or pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.81": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pillow (with OpenJPEG) or pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pillow (with OpenJPEG) or pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


def add_data_args(p):
    """The chest X-ray flags, spelled the same in every script (used with --dataset dicom)."""
    g = p.add_argument_group("chest X-rays (--dataset dicom; --data-dir is a folder of .dcm, searched recursively)")
    g.add_argument("--labels", default=None, help="CSV with an image id column and a label column (and optionally "
                   "a split column: train/val/test); without it the images are unlabelled (pretraining only)")
    g.add_argument("--id-column", default="id", help="CSV column naming the image: its file name without extension")
    g.add_argument("--label-column", default="label")
    g.add_argument("--split-column", default="split", help="used when the CSV has it; otherwise a seeded split "
                   "stratified by class with --split-fractions")
    g.add_argument("--split-fractions", default="0.7,0.1,0.2", help="train,val,test",
                   type=Number(float, "[0, 1]", items=True, count=3, total=1, text=True))
    g.add_argument("--classes", default=None, help="comma-separated labels to keep (the thesis dropped two rare ones)")
    g.add_argument("--masks", default=None, help="folder of <id>.png lung masks, any nonzero pixel is lung")
    g.add_argument("--variant", default="full", choices=VARIANTS, help="full image, lungs on black, or lungs on "
                   "the full images' mean gray (needs --masks)")
    g.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 grey channel, or replicated to 3 "
                   "(for encoders pretrained on colour images)")
    g.add_argument("--window-percentile", type=Number(float, "[0, 50)"), default=0.5, help="when a DICOM has no "
                   "VOI LUT or window: window from this percentile to 100 minus it (0: min to max)")
    g.add_argument("--keep-aspect", action=argparse.BooleanOptionalAction, default=True,
                   help="fit the longer side and pad with black, instead of stretching to a square")
    g.add_argument("--cache-dir", default=None, help="where the decoded uint8 cache goes (default: "
                   "<data-dir>/.xray_cache, or ~/.cache/dsmae when that is not writable)")
    g.add_argument("--skip-bad", action="store_true", help="dicom and folder: leave unreadable files (and images "
                   "without a label or mask) out, counted (dicom: listed in bad_files.txt in the cache dir), instead "
                   "of stopping at the first")
    return p


def data_options(args):
    """The keyword arguments build_dataset takes from add_data_args' flags."""
    return dict(labels=args.labels, id_column=args.id_column, label_column=args.label_column,
                split_column=args.split_column, split_fractions=tuple(float(f) for f in args.split_fractions.split(",")),
                classes=args.classes.split(",") if args.classes else None, masks=args.masks, variant=args.variant,
                channels=args.channels, window_percentile=args.window_percentile, keep_aspect=args.keep_aspect,
                cache_dir=args.cache_dir, skip_bad=args.skip_bad)


def window(x, center, width, function="LINEAR"):
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) of modality values to [0, 1]."""
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0, 1)
    return np.clip((x - (center - 0.5)) / max(width - 1, 1e-6) + 0.5, 0, 1)


def read_dicom(path, window_percentile=0.5):
    """One radiograph as float32 (H, W) in [0, 1], 0 = black as displayed, in the standard order:
    modality LUT (rescale slope/intercept), VOI LUT or window (else a percentile window), then
    MONOCHROME1 / INVERSE inversion. Raises ValueError naming the file when it cannot."""
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
    ts = ds.file_meta.get("TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array      # native data masked to BitsStored and sign-extended by pydicom
    except Exception as e:
        if ts is not None and ts.is_compressed:
            raise ValueError(f"{path}: cannot decode transfer syntax {ts.name} ({ts}): install "
                             f"{DECODERS.get(str(ts), 'pylibjpeg with its plugins, or gdcm')} "
                             f"({type(e).__name__}: {e})") from e
        raise ValueError(f"{path}: pixel data unreadable ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:   # colour secondary capture: luminance
        return (arr.astype(np.float32).mean(-1) / (2 ** int(ds.BitsStored) - 1)).clip(0, 1)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected one 2-D grey image, got pixel array of shape {arr.shape}")
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:                                     # a LUT wins over a window, as in pydicom
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        x = apply_voi(arr if "ModalityLUTSequence" in ds else x, ds).astype(np.float64) / (2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        x = window(x, first(ds.WindowCenter), first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")).upper())
    else:
        lo, hi = np.percentile(x, (window_percentile, 100 - window_percentile))
        x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    # the DX standard pairs MONOCHROME1 with PresentationLUTShape INVERSE: one inversion, not two
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        x = 1 - x
    return x.astype(np.float32)


def read_radiograph(path, window_percentile=0.5):
    """A DICOM (by its DICM magic or extension) or an exported PNG/JPEG, as float32 (H, W) in [0, 1]."""
    if path.lower().endswith(IMAGE_EXTENSIONS):
        from PIL import Image
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.float32) / 255
        except Exception as e:
            raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    return read_dicom(path, window_percentile)


def fit_square(img, size, keep_aspect=True, nearest=False):
    """Resize a float (H, W) image in [0, 1] to (size, size) uint8: the longer side to size and
    black padding around it (keep_aspect), or stretched. Masks use nearest-neighbour."""
    from PIL import Image
    h, w = img.shape
    s = size / max(h, w) if keep_aspect else None
    nw, nh = (max(1, round(w * s)), max(1, round(h * s))) if keep_aspect else (size, size)
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
            (nw, nh), Image.NEAREST if nearest else Image.BICUBIC, reducing_gap=None if nearest else 3.0))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def _is_xray_file(path):
    if path.lower().endswith((".dcm", ".dicom") + IMAGE_EXTENSIONS):
        return True
    if "." in os.path.basename(path):
        return False
    with open(path, "rb") as f:                       # extension-less DICOMs: the DICM magic at 128
        return f.read(132)[128:] == b"DICM"


def _mask_path(masks, i):
    for ext in (".png", ".PNG", ".jpg", ".bmp", ".tif"):
        if os.path.isfile(os.path.join(masks, i + ext)):
            return os.path.join(masks, i + ext)
    return None


def list_xrays(root, masks=None, cache_dir=None):
    """The radiographs under root, searched recursively (the masks and cache folders left out):
    (files, ids, mask files or None each). Ids are file names without extension and must be unique."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dicom dataset not found: {root} is not a directory. Point --data-dir at a "
                                f"folder of .dcm files (searched recursively).")
    if masks and not os.path.isdir(masks):
        raise FileNotFoundError(f"--masks {masks} is not a directory")
    skip = [os.path.abspath(p) for p in (masks, cache_dir, os.path.join(root, ".xray_cache")) if p]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                   if not any((os.path.abspath(d) + os.sep).startswith(s + os.sep) for s in skip)
                   for f in fs if _is_xray_file(os.path.join(d, f)))
    if not files:
        raise FileNotFoundError(f"no .dcm (or .png/.jpg) files under {root}")
    ids = [os.path.splitext(os.path.basename(f))[0] for f in files]
    if len(set(ids)) < len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise ValueError(f"two files under {root} are both named {dup!r}: image ids are file names without "
                         f"extension and must be unique")
    return files, ids, [_mask_path(masks, i) for i in ids] if masks else [None] * len(ids)


def xray_cache_path(root, files, mask_files, img_size, settings, cache_dir=None):
    """Where the decoded set is cached: xray_<size>px_<settings>_<files>.npz, the two hashes over
    the settings and over every file's path, size and time, so a changed file or setting makes a
    new cache; in cache_dir (default root/.xray_cache; ~/.cache/dsmae/<hash of root> when that is
    not writable)."""
    import hashlib
    key = hashlib.sha1(repr((XRAY_CACHE_VERSION, img_size, settings)).encode()).hexdigest()[:8]
    h = hashlib.sha1()
    for f in files + [m for m in mask_files if m]:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache_dir = cache_dir or os.path.join(root, ".xray_cache")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(cache_dir)
    except OSError:
        cache_dir = os.path.join(os.path.expanduser("~/.cache/dsmae"), hashlib.sha1(root.encode()).hexdigest()[:12])
        os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, f"xray_{img_size}px_{key}_{h.hexdigest()[:12]}.npz")


def remove_stale_caches(cache):
    """After writing `cache`: the caches of the same size and settings for an older state of the
    files can never be read again, nor can temporary files of writes interrupted over an hour ago
    (a write takes seconds); delete them."""
    import time
    folder, name = os.path.split(cache)
    prefix = name[:name.rindex("_") + 1]                      # xray_<size>px_<settings>_
    for f in os.listdir(folder):
        path = os.path.join(folder, f)
        try:
            if f.startswith(prefix) and f.endswith(".npz") and ".tmp." not in f and f != name or \
                    f.startswith("xray_") and ".tmp." in f and time.time() - os.path.getmtime(path) > 3600:
                os.remove(path)
        except OSError:                                       # gone already, or not ours to delete
            pass


def decode_xrays(root, img_size, masks=None, keep_aspect=True, window_percentile=0.5, cache_dir=None,
                 skip_bad=False, num_workers=4):
    """Decode every radiograph under root (and its mask) once, cached as uint8 in one .npz (see
    xray_cache_path). Returns dict(x (N, S, S) uint8, masks (N, S, S) uint8 0/1 or None, ids,
    bad [(path, why)]). Under torchrun, load_split has one rank per machine call this."""
    files, ids, mask_files = list_xrays(root, masks, cache_dir)
    cache = xray_cache_path(root, files, mask_files, img_size, (keep_aspect, window_percentile, bool(masks)),
                            cache_dir)
    if os.path.exists(cache):
        d = np.load(cache)
        bad = [tuple(b.split("\t", 1)) for b in d["bad"].tolist()]
        if bad and not skip_bad:
            raise ValueError(f"{bad[0][0]}: {bad[0][1]} (cached; --skip-bad to go on without it)")
        return dict(x=d["x"], masks=d["masks"] if masks else None, ids=d["ids"].tolist(), bad=bad)
    check_fits_in_memory(len(files), 2 if masks else 1, img_size, root)
    out = _decode_all(root, files, ids, mask_files, masks, img_size, keep_aspect, window_percentile, skip_bad,
                      num_workers)
    tmp = f"{cache}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=out["x"], masks=out["masks"] if masks else np.zeros(0, np.uint8), ids=np.array(out["ids"]),
             bad=np.array([f"{p}\t{w}" for p, w in out["bad"]], dtype=str))
    os.replace(tmp, cache)
    remove_stale_caches(cache)
    if out["bad"]:
        with open(os.path.join(os.path.dirname(cache), "bad_files.txt"), "w") as f:
            f.writelines(f"{p}\t{w}\n" for p, w in out["bad"])
        print(f"skipped {len(out['bad'])} unreadable file(s), listed in "
              f"{os.path.join(os.path.dirname(cache), 'bad_files.txt')}")
    return out


def _decode_all(root, files, ids, mask_files, masks, img_size, keep_aspect, window_percentile, skip_bad, num_workers):
    """Decode the files (and masks) on a thread pool; the first failure stops, or with skip_bad
    each one is listed in `bad` and left out."""
    from tqdm import tqdm

    def one(k):
        try:
            raw = read_radiograph(files[k], window_percentile)
        except ValueError as e:
            return None, None, str(e).removeprefix(files[k] + ": ")
        img = fit_square(raw, img_size, keep_aspect)
        if not mask_files[k]:
            return img, None, None
        from PIL import Image
        try:
            with Image.open(mask_files[k]) as m:
                m = (np.asarray(m.convert("L")) > 0).astype(np.float32)
        except Exception as e:
            return None, None, f"mask {mask_files[k]} unreadable ({type(e).__name__}: {e})"
        if m.shape != raw.shape:                     # resized apart, they would no longer line up
            return None, None, (f"mask {mask_files[k]} is {m.shape[1]}x{m.shape[0]} but the image is "
                                f"{raw.shape[1]}x{raw.shape[0]}; masks must have their image's size")
        return img, (fit_square(m, img_size, keep_aspect, nearest=True) > 0).astype(np.uint8), None

    x, m, keep, bad = [], [], [], []
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:    # pydicom's JPEG 2000 decoders release the GIL
        for k, (img, mask, why) in enumerate(tqdm(pool.map(one, range(len(files))), total=len(files),
                                                  desc=f"decoding {root}", unit="img", leave=False)):
            if why is None and masks and mask is None:
                why = f"no mask {ids[k]}.png in {masks}"
            if why is not None:
                if not skip_bad:
                    raise ValueError(f"{files[k]}: {why} (--skip-bad to log it and go on)")
                bad.append((files[k], why))
                continue
            x.append(img), m.append(mask), keep.append(ids[k])
    if not x:
        raise ValueError(f"no readable images under {root}; see {bad[0][0]}: {bad[0][1]}")
    return dict(x=np.stack(x), masks=np.stack(m) if masks else None, ids=keep, bad=bad)


def read_label_csv(path, id_column, label_column, split_column):
    """{image id: (label, split or None)} from a CSV; ids may be given with a folder or an extension."""
    import csv
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels {path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (id_column, label_column):
            if c not in cols:
                raise ValueError(f"{path} has no column {c!r} (columns: {', '.join(cols)}); set --id-column / "
                                 f"--label-column")
        rows = {}
        for line, r in enumerate(reader, 2):                    # line 1 is the header
            if not (r[id_column] or "").strip() or not (r[label_column] or "").strip():
                raise ValueError(f"{path}: line {line} has no {'id' if not (r[id_column] or '').strip() else 'label'} "
                                 f"({id_column}={r[id_column]!r}, {label_column}={r[label_column]!r}); every row needs "
                                 f"both, or leave the image out of the CSV")
            i = os.path.splitext(os.path.basename(r[id_column].strip()))[0]
            split = r[split_column].strip().lower() if split_column in cols else None
            if split is not None and split not in ("train", "val", "test"):
                raise ValueError(f"{path}: image {i} has split {split!r}; use train, val or test")
            rows[i] = (r[label_column].strip(), split)
    return rows


def stratified_split(y, fractions, seed):
    """Split name per image: within each class a seeded permutation cut by the fractions."""
    names = np.empty(len(y), dtype=object)
    g = torch.Generator().manual_seed(seed)
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
    """Chest X-rays: decode (or read the cache), attach labels and masks, split, apply the variant,
    and compute mean and std on the training split of that variant."""
    _check_split(split, ("train", "val", "test"), "dicom")
    if variant not in VARIANTS:
        raise ValueError(f"--variant {variant!r}: choose from {', '.join(VARIANTS)}")
    if variant != "full" and not masks:
        raise ValueError(f"--variant {variant} needs lung masks: add --masks DIR")
    d = decode_xrays(root, img_size, masks, keep_aspect, window_percentile, cache_dir, skip_bad, num_workers)
    ids, x = np.array(d["ids"]), torch.from_numpy(d["x"])[:, None]
    m = torch.from_numpy(d["masks"])[:, None] if d["masks"] is not None else None
    bad = {os.path.splitext(os.path.basename(p))[0] for p, _ in d["bad"]}
    y, names, rows = None, [], None
    if labels:
        rows = read_label_csv(labels, id_column, label_column, split_column)
        found = set(ids.tolist())
        missing = [i for i in rows if i not in found and i not in bad]
        unlabelled = [str(i) for i in ids if i not in rows]
        if missing:
            raise ValueError(f"{labels}: {len(missing)} labelled image(s) not found under {root}, e.g. {missing[0]!r}")
        if unlabelled and not skip_bad:
            raise ValueError(f"{len(unlabelled)} image(s) under {root}, e.g. {unlabelled[0]!r}, have no row in "
                             f"{labels} (--skip-bad to leave them out)")
        if unlabelled:
            print(f"left out {len(unlabelled)} image(s) without a row in {labels}, e.g. {unlabelled[0]!r}")
        names = sorted({lab for lab, _ in rows.values()})
        if classes:
            unknown = [c for c in classes if c not in names]
            if unknown:
                raise ValueError(f"--classes {unknown[0]!r} is not a label in {labels} (labels: {', '.join(names)})")
            names = sorted(classes)
        keep = np.array([i in rows and rows[i][0] in names for i in ids], dtype=bool)
        ids, x = ids[keep], x[torch.from_numpy(keep)]
        m = m[torch.from_numpy(keep)] if m is not None else None
        y = torch.tensor([names.index(rows[i][0]) for i in ids], dtype=torch.long)
    has_split = rows is not None and all(rows[i][1] is not None for i in ids)
    split_of = np.array([rows[i][1] for i in ids]) if has_split else \
        stratified_split(y.numpy() if y is not None else np.zeros(len(ids), np.int64), split_fractions, seed)
    train = torch.from_numpy(split_of == "train")
    gray = int(round(x[train].float().mean().item())) if variant == "seg-gray" else None
    xv = apply_variant(x, m, variant, gray)
    mean, std = channel_stats(xv[train], f"the {variant} training images under {root}")
    sel = torch.from_numpy(split_of == split)
    xs = xv[sel].expand(-1, channels, -1, -1) if channels == 3 else xv[sel]
    return ImageSet(xs, y[sel] if y is not None else None, names, mean * channels, std * channels,
                    masks=m[sel] if m is not None else None, ids=ids[sel.numpy()].tolist())
