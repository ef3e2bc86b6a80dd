"""tools/lung_eval.py without the internet: its two sources written small in their exact layouts (GitHub's archive of
the Montgomery/Shenzhen repository, the JSRT repository's files one by one) and served from 127.0.0.1, the pinned
tree ids swapped for the fixtures' own as git computes them; then build, a changed file, a missing one and a rerun
that goes on, no server at all, and score with a tiny U-Net."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lung_eval
from conftest import ROOT
from test_download import tar_folder
from test_segment import TINY, radiograph

MCSZ_IDS = ["MCUCXR_0001_0", "MCUCXR_0002_1", "CHNCXR_0001_0", "CHNCXR_0002_1"]
JSRT_IDS = ["JPCLN001", "JPCNN001"]


def tree(repo, folder):
    return subprocess.run(["git", "-C", str(repo), "write-tree", f"--prefix={folder}/"], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def sources(tmp_path, served, monkeypatch):
    """The served folder holds GitHub's archive of the first repository and the second one's files under its
    commit's folder, as a mirror would; returns (mirror URL, served folder, the images and masks written)."""
    url, root = served
    files, trees = {}, {}
    mcsz = tmp_path / "mcsz"
    for k, i in enumerate(MCSZ_IDS):
        img, mask = radiograph(48, 48, k)
        mask[0, :4], mask[1, :4] = 100, 200                            # anti-aliased: grey under and over 127
        for folder, a in (("data/cxr", img), ("data/masks", mask)):
            os.makedirs(mcsz / folder, exist_ok=True)
            Image.fromarray(a).save(mcsz / folder / f"{i}.png")
            files[folder, i] = a
    (mcsz / "README.md").write_text("MultiResUNet\n")
    jsrt = root / f"JSRT-Segmentation-{lung_eval.JSRT}"
    for k, i in enumerate(JSRT_IDS):
        img, mask = radiograph(64, 64, 10 + k)
        half = mask[::2, ::2]                                          # SCR's masks: at half the image's size
        left, right = half.copy(), half.copy()
        left[:, 16:], right[:, :16] = 0, 0
        for folder, a, name in (("JSRT/jsrt_images/images", img, f"{i}.IMG.png"),
                                ("JSRT/masks/masks/left_lung_png", left, f"{i}.png"),
                                ("JSRT/masks/masks/right_lung_png", right, f"{i}.png")):
            os.makedirs(jsrt / folder, exist_ok=True)
            Image.fromarray(a).convert("P" if "images" in folder else "L").save(jsrt / folder / name)
            files[folder, i] = a
    for repo, folders in ((mcsz, ("data/cxr", "data/masks")), (jsrt, lung_eval.JSRT_FILES)):
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
        trees.update({f: tree(repo, f) for f in folders})
    subprocess.run(["rm", "-rf", str(jsrt / ".git")], check=True)
    tar_folder(mcsz, root / f"{lung_eval.MCSZ}.tar.gz", f"MultiResUNet-lung-segmentation-{lung_eval.MCSZ}/")
    monkeypatch.setattr(lung_eval, "TREES", trees)
    monkeypatch.setattr(lung_eval, "JSRT_IDS", JSRT_IDS)
    monkeypatch.setattr(lung_eval, "SIM", {"Montgomery normal": 1, "Shenzhen normal": 1, "JSRT normal": 1})
    monkeypatch.delenv("DSMAE_MIRROR", raising=False)
    return url, root, files


def build(data_dir, mirror):
    lung_eval.build(lung_eval.get_args(["build", "--data-dir", str(data_dir), "--mirror", str(mirror)]))


def png(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("by", ["url", "folder"])
def test_build_writes_both_sets_in_the_layout_predict_reads(sources, tmp_path, by, capsys):
    url, root, files = sources
    build(tmp_path / "data", url if by == "url" else root)
    real = tmp_path / "data" / "lung_eval" / "real"
    labels = dict(list(csv.reader(open(real / "labels.csv")))[1:])
    assert labels == {"MCUCXR_0001_0": "Montgomery normal", "MCUCXR_0002_1": "Montgomery TB", "CHNCXR_0001_0":
                      "Shenzhen normal", "CHNCXR_0002_1": "Shenzhen TB", "JPCLN001": "JSRT nodules",
                      "JPCNN001": "JSRT normal"}
    for i in MCSZ_IDS:                                  # the source's image, its mask at 0 / 255 over 127
        assert np.array_equal(png(real / "images" / f"{i}.png"), files["data/cxr", i])
        assert np.array_equal(png(real / "masks" / f"{i}.png"), np.where(files["data/masks", i] > 127, 255, 0))
    for i in JSRT_IDS:                                  # both lungs, enlarged to the image's size
        both = (files["JSRT/masks/masks/left_lung_png", i] | files["JSRT/masks/masks/right_lung_png", i]) > 127
        assert np.array_equal(png(real / "masks" / f"{i}.png"), np.kron(both, np.ones((2, 2))) * 255)
        assert png(real / "images" / f"{i}.png").shape == (64, 64)
    sim = tmp_path / "data" / "lung_eval" / "sim"
    rows = list(csv.reader(open(sim / "labels.csv")))[1:]
    assert sorted(rows) == sorted([f"{i}_{k}", k] for i in ("MCUCXR_0001_0", "CHNCXR_0001_0", "JPCNN001")
                                  for k in ("clean", "consolidation", "effusion", "haze"))
    assert len(os.listdir(sim / "dicom")) == len(os.listdir(sim / "masks")) == 12
    assert sorted(os.listdir(tmp_path / "data")) == [f"{lung_eval.MCSZ}.tar.gz", "lung_eval"]   # no .part, no cache
    build(tmp_path / "data", url)
    assert "is there already" in capsys.readouterr().out


def test_a_changed_file_is_refused_and_a_missing_one_resumes(sources, tmp_path):
    url, root, _ = sources
    mask = root / f"JSRT-Segmentation-{lung_eval.JSRT}" / "JSRT/masks/masks/left_lung_png/JPCNN001.png"
    good = mask.read_bytes()
    mask.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="JSRT/masks/masks/left_lung_png/ is not the pinned one .* expected "
                                         + lung_eval.TREES["JSRT/masks/masks/left_lung_png"]):
        build(tmp_path / "data", url)
    assert not os.path.exists(tmp_path / "data" / ".lung_eval_jsrt")       # fetched again from the start
    assert not os.path.exists(tmp_path / "data" / "lung_eval")
    mask.unlink()                                                          # a 404: what was fetched is kept
    with pytest.raises(FileNotFoundError, match="could not fetch .*left_lung_png/JPCNN001.png .*Rerun to go on"):
        build(tmp_path / "data", url)
    kept = os.listdir(tmp_path / "data" / ".lung_eval_jsrt" / "JSRT" / "jsrt_images" / "images")
    assert sorted(kept) == ["JPCLN001.IMG.png", "JPCNN001.IMG.png"]
    mask.write_bytes(good)
    build(tmp_path / "data", url)
    assert os.path.isdir(tmp_path / "data" / "lung_eval" / "real")


def test_a_broken_archive_is_one_line_removed_if_ours_and_kept_if_yours(sources, tmp_path):
    url, root, _ = sources
    archive = root / f"{lung_eval.MCSZ}.tar.gz"
    archive.write_bytes(archive.read_bytes()[:300])                       # cut short: not a whole archive
    with pytest.raises(ValueError, match=r"is not a whole archive \([^\n]*\); removed and rerun$"):
        build(tmp_path / "data", url)
    assert not os.path.exists(tmp_path / "data" / archive.name)
    (tmp_path / "data" / archive.name).write_bytes(archive.read_bytes())  # the same, put there by hand
    with pytest.raises(ValueError, match="delete it and rerun"):
        build(tmp_path / "data", url)
    assert os.path.exists(tmp_path / "data" / archive.name)


def test_no_server_is_one_line(tmp_path):
    (tmp_path / f"{lung_eval.MCSZ}.tar.gz.part").write_bytes(b"left by a kill")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lung_eval.py"), "build", "--data-dir",
                        str(tmp_path), "--mirror", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: could not fetch http://127.0.0.1:9/{lung_eval.MCSZ}.tar.gz")
    assert "--mirror" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []                                      # nothing half-written


def test_score_runs_predict_on_both_sets_and_counts_the_flag(sources, tmp_path):
    url, _, _ = sources
    build(tmp_path / "data", url)
    real, run = tmp_path / "data" / "lung_eval" / "real", tmp_path / "seg"
    subprocess.run([sys.executable, os.path.join(ROOT, "segment.py"), "train", "--data-dir", str(real / "images"),
                    "--masks", str(real / "masks"), "--output-dir", str(run)] + TINY + ["--val-count", "2"],
                   check=True, capture_output=True)
    out = tmp_path / "eval"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lung_eval.py"), "score", "--data-dir",
                    str(tmp_path / "data"), "--checkpoint", str(run / "best.pt"), "--output-dir", str(out), "--",
                    "--tta", "2"], check=True, capture_output=True)
    got = json.load(open(out / "lung_eval.json"))
    assert got["predict"] == ["--tta", "2"]
    rows = [r for part in ("real", "sim") for r in csv.DictReader(open(out / part / "masks.csv"))]
    t = got["table"]
    assert t["all"]["masks"] == len(rows) == 18
    # odd numbers: MCUCXR_0001_0, CHNCXR_0001_0, JPCLN001, JPCNN001 and the 12 simulated from three of them
    assert (t["dev: odd numbers"]["masks"], t["test: even numbers"]["masks"]) == (16, 2)
    assert t["test, real radiographs"]["masks"] == 2                      # MCUCXR_0002_1, CHNCXR_0002_1
    dice = np.array([float(r["dice"]) for r in rows])
    flag = np.array([bool(r["flag"]) for r in rows])
    assert t["all"]["bad"] == (dice < 0.85).sum() and abs(t["all"]["dice"] - dice.mean()) < 1e-9
    assert (t["all"]["bad_flagged"], t["all"]["others"]) == (flag[dice < 0.85].sum(), (dice >= 0.85).sum())
    assert t["all"]["others_flagged"] == flag[dice >= 0.85].sum()
    assert {g for g in t} >= {"Montgomery TB", "JSRT nodules", "clean", "haze"}
    md = open(out / "lung_eval.md").read()
    assert "| simulated: haze | 3 |" in md and "| Shenzhen TB | 1 |" in md
