"""Loaders read files written here in the datasets' exact on-disk formats; batches and
augmentation behave as documented."""
import argparse
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write_cifar(root, hundred=False, n=6, seed=0):
    """Files laid out like the official python versions (as torchvision downloads them)."""
    rng = np.random.default_rng(seed)
    base = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    base.mkdir(parents=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 100 if hundred else 10, n).tolist()
        d = {"batch_label": name, "data": x, "filenames": [f"{name}_{i}.png" for i in range(n)]}
        d.update({"fine_labels": y, "coarse_labels": [v // 5 for v in y]} if hundred else {"labels": y})
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[name] = (x, y)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]} \
        if hundred else {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck"], "num_cases_per_batch": n, "num_vis": 3072}
    with open(base / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def test_cifar10_reads_official_pickles(tmp_path):
    written = write_cifar(tmp_path)
    train = data.build_dataset("cifar10", "train", data_dir=str(tmp_path))
    test = data.build_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert train.x.shape == (30, 3, 32, 32) and train.x.dtype == torch.uint8 and test.x.shape == (6, 3, 32, 32)
    x, y = written["data_batch_2"]
    # row layout of the pickles: 1024 red, then green, then blue values, each row-major
    assert train.x[6, 1, 3, 5].item() == x[0, 1024 + 3 * 32 + 5]
    assert torch.equal(train.x[6:12].reshape(6, -1), torch.from_numpy(x))
    assert train.y[6:12].tolist() == y and test.y.tolist() == written["test_batch"][1]
    assert train.classes[9] == "truck"


def _download_in_rank(rank, world, root, store, out):
    """One DDP rank (gloo) asking for CIFAR-10 with --download; the 'download' writes the files."""
    import os
    import time
    from pathlib import Path

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = []

    def fake_fetch(name, root_, mirror=None):
        calls.append(1)
        time.sleep(0.5)                                     # long enough for a second rank to collide
        write_cifar(Path(root_))
    data.fetch = fake_fetch
    args = data.add_data_args(argparse.ArgumentParser()).parse_args([])
    args.dataset, args.data_dir, args.seed, args.num_workers = "cifar10", root, 0, 1
    ds = data.load_split(args, "train", 32, download=True)
    # every rank's images live in the one file mapped from shared memory, not in a private copy
    ptr, maps = ds.x.data_ptr(), [line.split() for line in open("/proc/self/maps") if "/dsmae_" in line]
    mapped = any(int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16) for m in maps)
    np.save(os.path.join(out, f"rank{rank}.npy"), np.array([len(calls), len(ds), int(ds.x.sum()), mapped]))
    dist.destroy_process_group()


def test_ddp_ranks_download_once(tmp_path):
    torch.multiprocessing.spawn(_download_in_rank, args=(2, str(tmp_path / "data"), str(tmp_path / "store"),
                                                         str(tmp_path)), nprocs=2)
    (calls0, n0, s0, m0), (calls1, n1, s1, m1) = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert calls0 == 1 and calls1 == 0 and n0 == n1 == 30    # rank 1 neither fetched nor decoded: it mapped
    assert s0 == s1 and m0 and m1                            # rank 0's copy
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("dsmae_")]   # unlinked once mapped


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar(tmp_path, hundred=True)
    ds = data.build_dataset("cifar100", "test", data_dir=str(tmp_path))
    assert ds.y.tolist() == written["test"][1] and len(ds.classes) == 100
    assert torch.equal(ds.x.reshape(6, -1), torch.from_numpy(written["test"][0]))


def write_stl10(root, n=(3, 2, 4), seed=0):
    """stl10_binary/*.bin: uint8 images stored column-major, labels 1..10."""
    rng = np.random.default_rng(seed)
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    images = {}
    for split, k in zip(("train", "test", "unlabeled"), n):
        img = rng.integers(0, 256, (k, 3, 96, 96), dtype=np.uint8)     # (N, C, row, col)
        img.transpose(0, 1, 3, 2).tofile(base / f"{split}_X.bin")
        images[split] = img
        if split != "unlabeled":
            labels = rng.integers(1, 11, k).astype(np.uint8)
            labels.tofile(base / f"{split}_y.bin")
            images[split + "_y"] = labels
    (base / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                      "monkey", "ship", "truck"]) + "\n")
    return images


def test_stl10_reads_binary_files_and_keeps_unlabeled_unlabeled(tmp_path):
    imgs = write_stl10(tmp_path)
    train = data.build_dataset("stl10", "train", data_dir=str(tmp_path))
    assert torch.equal(train.x, torch.from_numpy(imgs["train"]))
    assert train.x[1, 2, 10, 50].item() == imgs["train"][1, 2, 10, 50]        # row 10, column 50
    assert train.y.tolist() == (imgs["train_y"].astype(int) - 1).tolist()
    assert train.classes[7] == "monkey"
    unl = data.build_dataset("stl10", "unlabeled", data_dir=str(tmp_path))
    assert unl.y is None and torch.equal(unl.x, torch.from_numpy(imgs["unlabeled"]))
    both = data.build_dataset("stl10", "train+unlabeled", data_dir=str(tmp_path))
    assert both.y is None and len(both) == 7
    assert torch.equal(both.x[3:], torch.from_numpy(imgs["unlabeled"]))
    with pytest.raises(ValueError, match="splits"):
        data.build_dataset("stl10", "val", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                         ("stl10", "stl10_binary")])
def test_missing_dataset_says_where_and_what_to_run(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset(name, "train", data_dir=str(tmp_path / "nowhere"))
    assert folder in str(e.value) and "--download" in str(e.value) and "nowhere" in str(e.value)


def test_npz_holdout_split(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d"]))
    train = data.build_dataset("npz", "train", data_dir=str(tmp_path / "d.npz"))
    test = data.build_dataset("npz", "test", data_dir=str(tmp_path / "d.npz"))
    assert len(train) == 36 and len(test) == 4 and test.y.tolist() == [0, 1, 2, 3]
    assert torch.equal(test.x[0], torch.from_numpy(x[9]).permute(2, 0, 1))   # last of class 0
    assert train.classes == ["a", "b", "c", "d"]
    mean = x[[i for i in range(40) if i % 10 != 9]].reshape(-1, 3).mean(0) / 255
    assert np.allclose(train.mean, mean, atol=1e-4) and train.mean == test.mean
    np.savez(tmp_path / "u.npz", x=x)
    assert data.build_dataset("npz", "train", data_dir=str(tmp_path / "u.npz")).y is None


def test_folder_of_class_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / c / f"{i:02d}.png")
            arrays[(c, i)] = a
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    train = data.build_dataset("folder", "train", data_dir=str(tmp_path), img_size=16)
    test = data.build_dataset("folder", "test", data_dir=str(tmp_path), img_size=16)
    assert train.classes == ["cat", "dog"] and len(train) == 18 and test.y.tolist() == [0, 1]
    assert torch.equal(test.x[1], torch.from_numpy(arrays[("dog", 9)]).permute(2, 0, 1))
    small = data.build_dataset("folder", "train", data_dir=str(tmp_path), img_size=8)
    assert small.x.shape == (18, 3, 8, 8)


def test_synthetic_is_deterministic_and_balanced():
    a = data.synthetic_shapes("train", 16, seed=3, n=200)
    b = data.synthetic_shapes("train", 16, seed=3, n=200)
    c = data.synthetic_shapes("test", 16, seed=3, n=200)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert torch.bincount(a.y).tolist() == [20] * 10 and a.x.dtype == torch.uint8


def test_epoch_batches_shard_the_global_batch():
    one = list(data.epoch_batches(50, 8, epoch=2, seed=1))
    r0 = list(data.epoch_batches(50, 8, epoch=2, seed=1, rank=0, world_size=2))
    r1 = list(data.epoch_batches(50, 8, epoch=2, seed=1, rank=1, world_size=2))
    assert len(one) == len(r0) == len(r1) == 6                     # incomplete batch dropped
    for g, a, b in zip(one, r0, r1):
        assert torch.equal(torch.cat([a, b]), g)                   # disjoint, same images as one process
    assert len(torch.cat(one).unique()) == 48
    assert not torch.equal(torch.cat(one), torch.cat(list(data.epoch_batches(50, 8, epoch=3, seed=1))))
    assert torch.equal(torch.cat(list(data.epoch_batches(50, 8, epoch=2, seed=1, start=4))), torch.cat(one[4:]))


def test_augment_full_crop_is_the_image_or_its_mirror():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    out = data.augment(x, 12, (0.5,) * 3, (0.25,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = data.normalize(x, (0.5,) * 3, (0.25,) * 3)
    for o, p in zip(out, plain):
        assert torch.allclose(o, p, atol=1e-4) or torch.allclose(o, p.flip(-1), atol=1e-4)
    flipped = sum(torch.allclose(o, p.flip(-1), atol=1e-4) for o, p in zip(out, plain))
    assert 0 < flipped < 16
    crops = data.augment(x, 8, (0.5,) * 3, (0.25,) * 3)
    assert crops.shape == (16, 3, 8, 8) and crops.dtype == torch.float32


def test_npz_in_medmnist_layout(tmp_path):
    """MedMNIST's own files (train/val/test_images (N, 28, 28) uint8, *_labels (N, 1)) read as they are."""
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if k == "images" else
                           (np.arange(n) % 2)[:, None]) for s, n in (("train", 20), ("val", 4), ("test", 6))
              for k in ("images", "labels")}
    np.savez(tmp_path / "pneumoniamnist_28.npz", **arrays)
    train = data.build_dataset("npz", "train", data_dir=str(tmp_path / "pneumoniamnist_28.npz"))
    test = data.build_dataset("npz", "test", data_dir=str(tmp_path / "pneumoniamnist_28.npz"))
    assert train.x.shape == (20, 1, 28, 28) and test.x.shape == (6, 1, 28, 28) and train.classes == ["0", "1"]
    assert torch.equal(train.x[:, 0], torch.from_numpy(arrays["train_images"]))
    assert train.y.tolist() == arrays["train_labels"][:, 0].tolist() and test.y.tolist() == [0, 1, 0, 1, 0, 1]


def test_bad_labels_are_named_in_every_format(tmp_path):
    """One per image, whole, 0 <= y < classes, for CIFAR's pickles, STL-10's binaries, npz (with and
    without class_names, test split included), MedMNIST and the X-ray CSV: the error names the file,
    the first bad index and its value."""
    write_cifar(tmp_path / "c")
    batch = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3"
    d = pickle.load(open(batch, "rb"), encoding="latin1")
    d["labels"][4] = 10
    pickle.dump(d, open(batch, "wb"), protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3: label 10 at index 4 is outside 0\.\.9"):
        data.build_dataset("cifar10", "train", data_dir=str(tmp_path / "c"))
    write_stl10(tmp_path / "s")
    np.array([3, 0, 2], np.uint8).tofile(tmp_path / "s" / "stl10_binary" / "train_y.bin")    # 0: not in 1..10
    with pytest.raises(ValueError, match=r"train_y.bin: label -1 at index 1 is outside 0\.\.9"):
        data.build_dataset("stl10", "train", data_dir=str(tmp_path / "s"))
    x = np.zeros((6, 4, 4, 3), np.uint8) + np.arange(6, dtype=np.uint8)[:, None, None, None] * 40
    cases = [(dict(y=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["a", "b"])), "train", "y: label 2 at index 2"),
             (dict(y=np.array([0, 1, 0, 1, 1, 0]), x_test=x[:2], y_test=np.array([1, -3])), "test",
              "y_test: label -3 at index 1"),
             (dict(y=np.array([0, 1, np.nan, 1, 0, 1])), "train", "y: label nan at index 2 is not a whole number"),
             (dict(y=np.array(["0", "1", "1", "0", "0", "1"])), "train", "y: label 0 at index 0 is not a whole number")]
    for i, (arrays, split, message) in enumerate(cases):
        np.savez(tmp_path / f"{i}.npz", x=x, **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{i}.npz: {message}")):
            data.build_dataset("npz", split, data_dir=str(tmp_path / f"{i}.npz"))
    # without class_names the classes run to the largest label of either split, so train and test agree
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 0, 1, 0, 1]), x_test=x[:2], y_test=np.array([2, 1]))
    assert data.build_dataset("npz", "train", data_dir=str(tmp_path / "ok.npz")).classes == ["0", "1", "2"]
    np.savez(tmp_path / "med.npz", train_images=x[..., 0], train_labels=np.zeros((6, 3), np.uint8),
             test_images=x[:2, ..., 0], test_labels=np.zeros((2, 3), np.uint8))          # multi-label: not ours
    with pytest.raises(ValueError, match=r"med.npz: y has shape \(6, 3\) but x holds 6 images"):
        data.build_dataset("npz", "train", data_dir=str(tmp_path / "med.npz"))
    (tmp_path / "labels.csv").write_text("id,label\na,x\nb,y\n,y\n")
    with pytest.raises(ValueError, match=r"labels.csv: line 4 has no id"):
        data.read_label_csv(str(tmp_path / "labels.csv"), "id", "label", "split")
