"""Chest X-rays: DICOMs written here with pydicom decode pixel for pixel as the standard says;
labels, splits, masks, variants, the cache and bad files behave as documented."""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from make_xray_dicoms import write_dicom

# real radiographs from other hospitals (CR, MONOCHROME1/2, JPEG and JPEG 2000): a local copy, when there is one
SHARED = Path(os.environ.get("DSMAE_TEST_DATA", "/nonexistent")) / "dicom"


def linear_window(x, c, w):  # PS3.3 C.11.2.1.2.1, by hand
    out = np.empty_like(x)
    lo, hi = x <= c - 0.5 - (w - 1) / 2, x > c - 0.5 + (w - 1) / 2
    out[lo], out[hi] = 0.0, 1.0
    mid = ~(lo | hi)
    out[mid] = (x[mid] - (c - 0.5)) / (w - 1) + 0.5
    return out


@pytest.fixture
def stored12():
    return np.random.default_rng(0).integers(0, 4096, (16, 16)).astype(np.uint16)


def test_monochrome2_12bit_rescale_window(tmp_path, stored12):
    write_dicom(tmp_path / "a.dcm", stored12, bits_stored=12, slope=2, intercept=-1024, center=1500, width=3000)
    want = linear_window(stored12 * 2.0 - 1024, 1500, 3000)
    assert np.allclose(data.read_dicom(str(tmp_path / "a.dcm")), want, atol=1e-6)
    # through the whole loader (no resize at 16 px): uint8 of the same values, pixel for pixel
    ds = data.build_dataset("dicom", "train", data_dir=str(tmp_path), img_size=16, split_fractions=(1, 0, 0))
    assert torch.equal(ds.x[0, 0], torch.from_numpy(np.rint(want * 255).astype(np.uint8)))


def test_monochrome1_inverted_and_high_bits_ignored(tmp_path, stored12):
    # bits above BitsStored carry garbage in some writers: they must not reach the pixels
    write_dicom(tmp_path / "a.dcm", stored12 | 0xF000, photometric="MONOCHROME1", bits_stored=12,
                center=2048, width=4096)
    assert np.allclose(data.read_dicom(str(tmp_path / "a.dcm")), 1 - linear_window(stored12.astype(float), 2048, 4096),
                       atol=1e-6)


def test_signed16_without_window_uses_percentiles(tmp_path):
    v = np.random.default_rng(1).integers(-3000, 3000, (12, 12)).astype(np.int16)
    write_dicom(tmp_path / "a.dcm", v, bits_stored=16, signed=True)
    got = data.read_dicom(str(tmp_path / "a.dcm"), window_percentile=0)
    assert np.allclose(got, (v - v.min()) / (v.max() - v.min()), atol=1e-6)
    lo, hi = np.percentile(v.astype(float), (5, 95))
    got = data.read_dicom(str(tmp_path / "a.dcm"), window_percentile=5)
    assert np.allclose(got, np.clip((v - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_linear_exact_and_inverse_presentation(tmp_path, stored12):
    write_dicom(tmp_path / "a.dcm", stored12, bits_stored=12, center=2000, width=1000, voi_function="LINEAR_EXACT",
                presentation_shape="INVERSE")
    want = 1 - np.clip((stored12 - 2000.0) / 1000 + 0.5, 0, 1)
    assert np.allclose(data.read_dicom(str(tmp_path / "a.dcm")), want, atol=1e-6)


def test_non_images_and_undecodable_syntax_named(tmp_path, stored12):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless
    write_dicom(tmp_path / "a.dcm", stored12, bits_stored=12)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "report.dcm")
    with pytest.raises(ValueError, match="report.dcm: no pixel data"):
        data.read_dicom(str(tmp_path / "report.dcm"))
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = stored12.tobytes() * 2
    ds.save_as(tmp_path / "cine.dcm")
    with pytest.raises(ValueError, match="cine.dcm: multi-frame"):
        data.read_dicom(str(tmp_path / "cine.dcm"))
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg-ls stream\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "ls.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match=r"ls.dcm: cannot decode transfer syntax JPEG-LS.*install pyjpegls"):
        data.read_dicom(str(tmp_path / "ls.dcm"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="no real DICOMs: set DSMAE_TEST_DATA to a folder with dicom/")
def test_real_dicoms_decode_with_dark_lungs():
    files = sorted(SHARED.glob("*.dcm"))
    assert len(files) >= 3
    for f in files:
        x = data.read_dicom(str(f))
        assert x.ndim == 2 and x.min() >= 0 and x.max() <= 1 and x.std() > 0.1, f.name
    # lung fields (left, right) darker than the mediastinum, MONOCHROME1 and MONOCHROME2 alike;
    # boxes as fractions of the height and width, located by eye on these files
    boxes = {"anupama_test2_chest_CR.dcm": ((.2, .5, .3, .45), (.2, .5, .62, .8), (.2, .5, .5, .57)),   # MONOCHROME1
             "nema_RG1_J2KI_chest_CR.dcm": ((.3, .6, .2, .4), (.3, .6, .6, .8), (.3, .6, .47, .53)),   # MONOCHROME1
             "siim_acr_6904_chest_CR.dcm": ((.3, .6, .2, .4), (.3, .6, .6, .8), (.3, .6, .47, .53))}   # MONOCHROME2
    for name, (left, right, middle) in boxes.items():
        x = data.read_dicom(str(SHARED / name))
        H, W = x.shape
        box = lambda b: x[int(b[0] * H):int(b[1] * H), int(b[2] * W):int(b[3] * W)].mean()
        assert (box(left) + box(right)) / 2 < box(middle) - 0.05, name


def make_study(root, n=12, size=16, masks=True, labels=("a", "b", "c")):
    """n small DICOMs with a left-half-ish lung mask each, and a labels.csv cycling the labels."""
    rng = np.random.default_rng(0)
    (root / "dcm" / "sub").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,label"]
    for i in range(n):
        folder = root / "dcm" / ("sub" if i % 2 else "")
        write_dicom(folder / f"im{i:02d}.dcm", rng.integers(0, 256, (size, size)).astype(np.uint8))
        m = np.zeros((size, size), np.uint8)
        m[2:size - 2, 1:size // 2] = 255
        m[3, 1 + i % 5] = 0
        if masks:
            Image.fromarray(m).save(root / "masks" / f"im{i:02d}.png")
        rows.append(f"im{i:02d},{labels[i % len(labels)]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def xray(root, split="train", img_size=16, **kw):
    opts = dict(labels=str(root / "labels.csv"), masks=str(root / "masks"), cache_dir=str(root / "cache"))
    opts.update(kw)
    return data.build_dataset("dicom", split, data_dir=str(root / "dcm"), img_size=img_size, **opts)


def test_labels_split_and_classes(tmp_path):
    root = make_study(tmp_path)
    parts = {s: xray(root, s) for s in ("train", "val", "test")}
    ids = [i for s in parts.values() for i in s.ids]
    assert sorted(ids) == [f"im{i:02d}" for i in range(12)]            # disjoint and complete
    assert parts["train"].classes == ["a", "b", "c"]
    for s in parts.values():
        assert [["a", "b", "c"][int(c)] for c in s.y] == [["a", "b", "c"][int(i[2:]) % 3] for i in s.ids]
    assert torch.bincount(parts["train"].y).tolist() == [3, 3, 3]      # stratified: 70% of each class of 4
    assert xray(root, "test").ids == parts["test"].ids and xray(root, "test", seed=1).ids != parts["test"].ids
    sub = xray(root, "train", classes=["c", "a"])
    assert sub.classes == ["a", "c"] and set(sub.y.tolist()) == {0, 1} and len(sub) == 6
    with pytest.raises(ValueError, match="'z' is not a label"):
        xray(root, classes=["a", "z"])
    # a split column is used as given
    (root / "split.csv").write_text("id,label,split\n" + "".join(
        f"im{i:02d},a,{'test' if i < 2 else 'train'}\n" for i in range(12)))
    assert xray(root, "test", labels=str(root / "split.csv")).ids == ["im00", "im01"]


def test_label_csv_errors(tmp_path):
    root = make_study(tmp_path)
    (root / "extra.csv").write_text((root / "labels.csv").read_text() + "gone,a\n")
    with pytest.raises(ValueError, match="not found under .*'gone'"):
        xray(root, labels=str(root / "extra.csv"))
    (root / "short.csv").write_text("\n".join((root / "labels.csv").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match="'im11'.*no row in"):
        xray(root, labels=str(root / "short.csv"))
    assert len(xray(root, labels=str(root / "short.csv"), skip_bad=True, split_fractions=(1, 0, 0))) == 11
    with pytest.raises(ValueError, match="no column 'finding'"):
        xray(root, label_column="finding")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.build_dataset("dicom", "train", data_dir=str(tmp_path / "nowhere"), img_size=16)


def test_variants_and_stats(tmp_path):
    root = make_study(tmp_path)
    full, black, gray = (xray(root, variant=v) for v in data.VARIANTS)
    m = full.masks.bool()
    assert full.masks.shape == full.x.shape and set(full.masks.unique().tolist()) == {0, 1}
    assert torch.equal(black.x[m], full.x[m]) and (black.x[~m] == 0).all()
    level = round(full.x.float().mean().item())      # the training split's mean gray, in uint8 levels
    assert torch.equal(gray.x[m], full.x[m]) and (gray.x[~m] == level).all()
    for ds in (full, black, gray):
        assert ds.mean == data.channel_stats(ds.x)[0] and ds.std == data.channel_stats(ds.x)[1]
    assert black.mean[0] < full.mean[0]
    with pytest.raises(ValueError, match="needs lung masks"):
        xray(root, variant="seg-black", masks=None)
    with pytest.raises(ValueError, match="needs lung masks"):
        data.build_dataset("synthetic", "train", variant="seg-gray")
    rgb = xray(root, channels=3)
    assert rgb.x.shape[1] == 3 and torch.equal(rgb.x[:, 2], full.x[:, 0]) and rgb.mean == full.mean * 3


def test_resize_keeps_aspect_and_orientation():
    img = np.zeros((20, 40), np.float32)
    img[:, :10] = 1.0                                  # a bright band on the left
    out = data.fit_square(img, 20)
    assert out.shape == (20, 20) and (out[:5] == 0).all() and (out[15:] == 0).all()   # padded top and bottom
    assert out[10, 1] == 255 and out[10, 15] == 0                                   # band still on the left
    mask = data.fit_square(img, 20, nearest=True)
    assert set(np.unique(mask).tolist()) <= {0, 255} and np.array_equal(mask > 0, out > 127)
    assert data.fit_square(img, 20, keep_aspect=False)[:, :4].min() == 255           # stretched, no padding


def test_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    root = make_study(tmp_path, n=4, labels=("a",))
    first = xray(root, split_fractions=(1, 0, 0))
    assert len(list((root / "cache").glob("xray_16px_*.npz"))) == 1
    real = data.read_radiograph
    monkeypatch.setattr(data, "read_radiograph", lambda *a: pytest.fail("decoded again instead of using the cache"))
    assert torch.equal(xray(root, split_fractions=(1, 0, 0)).x, first.x)
    monkeypatch.setattr(data, "read_radiograph", real)
    write_dicom(root / "dcm" / "im00.dcm", np.full((16, 16), 7, np.uint8))
    os.utime(root / "dcm" / "im00.dcm", ns=(1, 1))                 # a changed file, even with an old time
    xray(root, img_size=24, split_fractions=(1, 0, 0))         # another size: a cache of its own, kept
    again = xray(root, split_fractions=(1, 0, 0))
    assert (again.x[again.ids.index("im00")] == 0).all()      # constant image -> percentile window -> 0
    assert not torch.equal(again.x, first.x)
    assert len(list((root / "cache").glob("xray_16px_*.npz"))) == 1     # rebuilt in place: no stale cache left
    assert len(list((root / "cache").glob("xray_24px_*.npz"))) == 1


def _decode_in_rank(rank, world, root, store, out):
    """One DDP rank (gloo): decode the study, record how many files this rank decoded itself."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls, real = [], data.read_radiograph
    data.read_radiograph = lambda *a: (calls.append(1), real(*a))[1]
    args = data.add_data_args(argparse.ArgumentParser()).parse_args(["--split-fractions", "1,0,0"])
    args.dataset, args.data_dir, args.seed, args.num_workers = "dicom", root, 0, 1
    ds = data.load_split(args, "train", 16)
    np.save(os.path.join(out, f"rank{rank}.npy"), np.array([len(calls), int(ds.x.long().sum())]))
    dist.destroy_process_group()


def test_ddp_ranks_share_one_decode(tmp_path):
    root = make_study(tmp_path, n=6)
    torch.multiprocessing.spawn(_decode_in_rank, args=(2, str(root / "dcm"), str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    (n0, sum0), (n1, sum1) = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert n0 == 6 and n1 == 0 and sum0 == sum1           # rank 1 mapped rank 0's decoded copy


def test_corrupt_file_named_and_skipped(tmp_path):
    root = make_study(tmp_path, n=6, labels=("a",))
    f = root / "dcm" / "sub" / "im03.dcm"
    f.write_bytes(f.read_bytes()[:-100])                           # truncated pixel data
    with pytest.raises(ValueError, match="im03.dcm"):
        xray(root)
    ds = xray(root, skip_bad=True, split_fractions=(1, 0, 0))
    assert len(ds) == 5 and "im03" not in ds.ids
    assert "im03.dcm" in (root / "cache" / "bad_files.txt").read_text()


def test_flags_reach_the_loader(tmp_path):
    root = make_study(tmp_path)
    p = data.add_data_args(argparse.ArgumentParser())
    args = p.parse_args(["--labels", str(root / "labels.csv"), "--masks", str(root / "masks"), "--variant",
                         "seg-black", "--classes", "a,b", "--cache-dir", str(root / "cache"), "--no-keep-aspect"])
    ds = data.build_dataset("dicom", "train", data_dir=str(root / "dcm"), img_size=16, **data.data_options(args))
    assert ds.classes == ["a", "b"] and (ds.x[ds.masks == 0] == 0).all()


def test_every_script_takes_dicom(tmp_path):
    import finetune
    import linprobe
    import pretrain
    root = make_study(tmp_path, n=24, labels=("a", "b"))
    common = ["--dataset", "dicom", "--data-dir", str(root / "dcm"), "--labels", str(root / "labels.csv"),
              "--masks", str(root / "masks"), "--variant", "seg-gray", "--cache-dir", str(root / "cache"),
              "--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--device", "cpu", "--no-compile"]
    pretrain.main(pretrain.get_args(common + ["--method", "mae", "--batch-size", "8", "--decoder-dim", "32",
                                              "--decoder-depth", "1", "--max-steps", "2", "--knn-samples", "50",
                                              "--output-dir", str(tmp_path / "pre")]))
    ckpt = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=False)
    assert ckpt["data"]["dataset"] == "dicom" and ckpt["args"]["mask_ratio"] == 0.9     # X-ray default
    assert len(ckpt["data"]["mean"]) == 1
    ft = finetune.main(finetune.get_args(common + ["--checkpoint", str(tmp_path / "pre" / "ckpt.pt"),
                                                   "--checkpoint-key", "student", "--batch-size", "8",
                                                   "--max-steps", "2", "--output-dir", str(tmp_path / "ft")]))
    assert len(ft["per_class"]) == 2 and ft["step"] == 2
    assert "val_top1" in ft and ft["best"]["split"] == "val"          # best.pt chosen on val, not on test
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=False)
    assert best["data"]["classes"] == ["a", "b"]
    lp = linprobe.main(linprobe.get_args(common + ["--checkpoint", str(tmp_path / "pre" / "ckpt.pt"),
                                                   "--checkpoint-key", "student", "--epochs", "1",
                                                   "--output-dir", str(tmp_path / "lp")]))
    assert 0 <= lp["mean_per_class"] <= 100


def test_hospital_exports_read_as_a_user_expects(tmp_path, capsys):
    """Issue 28: a labels CSV from Excel (byte-order mark, semicolons, a row pasted twice), the DICOMDIR index an
    export writes beside its images, a 16-bit PNG export, OpenIST's anti-aliased masks, an empty mask."""
    root = make_study(tmp_path, n=6, labels=("a", "b"))
    rows = (root / "labels.csv").read_text().strip().splitlines()
    (root / "labels.csv").write_bytes(("\ufeff" + "\n".join(r.replace(",", ";") for r in rows + [rows[3]]) + "\n")
                                      .encode("utf-8"))
    write_dicom(root / "dcm" / "DICOMDIR", np.zeros((4, 4), np.uint8))        # an index: never read as an image
    ds = xray(root, split_fractions=(1, 0, 0))
    assert sorted(ds.ids) == [f"im{i:02d}" for i in range(6)] and ds.classes == ["a", "b"]
    assert "1 row(s) repeat an earlier row word for word" in capsys.readouterr().out
    # 16-bit export: windowed as a DICOM without a window would be, not clipped to 255
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)          # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "x16.png")
    x = data.read_radiograph(str(tmp_path / "x16.png"))
    assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1 and 0.45 < x.mean() < 0.55
    # masks: lung where over half the mask's maximum; a mask with no lung pixel is named
    aa = np.zeros((8, 8), np.uint8)
    aa[2:6, 2:6], aa[1, 2:6] = 255, 90                                        # an anti-aliased upper edge
    Image.fromarray(aa).save(tmp_path / "aa.png")
    assert data.read_mask(str(tmp_path / "aa.png"), (8, 8)).sum() == 16
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "im04.png")
    with pytest.raises(ValueError, match="im04.png has no lung pixel"):
        xray(root, split_fractions=(1, 0, 0))
    assert "im04" not in xray(root, split_fractions=(1, 0, 0), skip_bad=True).ids
