"""Downloads, end to end and without the internet: an HTTP server on 127.0.0.1 serves small files written here in
each source's exact layout and names (CIFAR's and STL-10's archives, MedMNIST's npz, GitHub's archive of OpenIST),
the pinned digests are swapped for the fixtures' own, and every path of data.fetch is taken: the source, a mirror
URL, a mirror folder, a corrupt file, a connection dropped halfway, a 404, no server at all, a leftover .part,
archives that try to write outside their folder, a CIFAR pickle that tries to run code."""
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import ROOT
from test_data import write_cifar, write_stl10

md5 = lambda path: hashlib.md5(open(path, "rb").read()).hexdigest()


def tar_folder(src, archive, prefix=""):
    """A .tar.gz of the folder src, its members under prefix (as the real archives hold them)."""
    with tarfile.open(archive, "w:gz") as tar:
        for d, _, files in sorted(os.walk(src)):
            for f in sorted(files):
                tar.add(os.path.join(d, f), prefix + os.path.relpath(os.path.join(d, f), src))
    return str(archive)


def write_openist(tmp_path, n=4):
    """GitHub's archive of the OpenIST commit: OpenIST-<commit>/ holding Datasets/Chest_x-ray/<id>.jpg and its
    anti-aliased mask <id>@.png, beside other files. Returns the archive and the folder's tree id as git computes it."""
    repo = tmp_path / "openist_repo"
    folder = repo / "Datasets" / "Chest_x-ray"
    folder.mkdir(parents=True)
    (repo / "README.md").write_text("OpenIST\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(folder / f"{i}-1-500-500-100.jpg")
        mask = np.zeros((40, 50), np.uint8)
        mask[10:30, 5:20], mask[10:30, 30:45], mask[9, 5:20] = 255, 255, 100        # a grey, anti-aliased edge
        Image.fromarray(mask).save(folder / f"{i}-1-500-500-100@.png")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    tree = subprocess.run(["git", "-C", str(repo), "write-tree", "--prefix=Datasets/Chest_x-ray/"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "served" / "archive").mkdir()
    return tar_folder(repo, tmp_path / "served" / "archive" / f"{data.OPENIST}.tar.gz", f"OpenIST-{data.OPENIST}/"), \
        tree


@pytest.fixture
def sources(tmp_path, served, monkeypatch):
    """Every dataset written in its source's layout, served, and DOWNLOADS pointed at it with its digest."""
    url, root = served
    made = tmp_path / "made"
    cifar = write_cifar(made / "c10")
    write_cifar(made / "c100", hundred=True)
    stl = write_stl10(made / "stl")
    (root / "kriz").mkdir()
    (root / "zenodo").mkdir()
    files = {"cifar10": tar_folder(made / "c10", root / "kriz" / "cifar-10-python.tar.gz"),
             "cifar100": tar_folder(made / "c100", root / "kriz" / "cifar-100-python.tar.gz"),
             "stl10": tar_folder(made / "stl", root / "kriz" / "stl10_binary.tar.gz")}
    rng = np.random.default_rng(1)
    arrays = {f"{s}_{k}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if k == "images" else
              rng.integers(0, 2, (n, 1), dtype=np.uint8) for s, n in (("train", 12), ("val", 4), ("test", 6))
              for k in ("images", "labels")}
    np.savez_compressed(root / "zenodo" / "pneumoniamnist.npz", **arrays)
    files["pneumoniamnist"] = str(root / "zenodo" / "pneumoniamnist.npz")
    files["openist"], tree = write_openist(tmp_path)
    for name, path in files.items():
        rel = os.path.relpath(path, root)
        monkeypatch.setitem(data.DOWNLOADS, name, (f"{url}/{rel}", f"tree {tree}" if name == "openist" else md5(path),
                                                   data.DOWNLOADS[name][2]))
    monkeypatch.delenv("DSMAE_MIRROR", raising=False)
    return dict(url=url, root=root, files=files, cifar=cifar, stl=stl, arrays=arrays, tree=tree)


def test_the_pinned_digests_are_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100, STL10
    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100), ("stl10", STL10)):
        assert data.DOWNLOADS[name][:3] == (cls.url, cls.tgz_md5, cls.base_folder)


def test_every_dataset_from_its_source_then_read_as_by_hand(sources, tmp_path, capsys):
    out = tmp_path / "data"
    for name in ("cifar10", "cifar100", "stl10", "pneumoniamnist", "openist"):
        data.fetch(name, str(out))
    assert sorted(os.listdir(out)) == sorted(["cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar-100-python",
                                              "cifar-100-python.tar.gz", "stl10_binary", "stl10_binary.tar.gz",
                                              "pneumoniamnist.npz", "openist", f"OpenIST-{data.OPENIST}.tar.gz"])
    train = data.build_dataset("cifar10", "train", data_dir=str(out))
    assert torch.equal(train.x[6:12].reshape(6, -1), torch.from_numpy(sources["cifar"]["data_batch_2"][0]))
    assert len(data.build_dataset("cifar100", "test", data_dir=str(out))) == 6
    assert torch.equal(data.build_dataset("stl10", "train", data_dir=str(out)).x, torch.from_numpy(sources["stl"]["train"]))
    pneu = data.build_dataset("npz", "test", data_dir=str(out / "pneumoniamnist.npz"))
    assert pneu.y.tolist() == sources["arrays"]["test_labels"][:, 0].tolist() and pneu.x.shape == (6, 1, 28, 28)
    # OpenIST laid out for segment.py; the anti-aliased mask edge (100 of 255) is not lung
    assert sorted(os.listdir(out / "openist")) == ["images", "masks"]
    assert len(os.listdir(out / "openist" / "images")) == len(os.listdir(out / "openist" / "masks")) == 4
    xr = data.build_dataset("dicom", "train", data_dir=str(out / "openist" / "images"), img_size=50,
                            masks=str(out / "openist" / "masks"), split_fractions=(1, 0, 0))
    assert int(xr.masks[0].sum()) == 2 * 20 * 15 and "no licence" in capsys.readouterr().out.lower()
    # asked again: nothing is fetched (the server could be gone) and nothing overwritten
    for name in ("cifar10", "openist"):
        assert data.fetch(name, str(out), mirror="http://127.0.0.1:9/nothing")


def test_a_mirror_url_folder_or_variable_holds_the_same_files(sources, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, path in sources["files"].items():
        file = f"OpenIST-{data.OPENIST}.tar.gz" if name == "openist" else os.path.basename(path)
        (mirror / file).write_bytes(open(path, "rb").read())
        (sources["root"] / "m").mkdir(exist_ok=True)
        (sources["root"] / "m" / file).write_bytes(open(path, "rb").read())
    for n in data.DOWNLOADS:                                 # the sources are gone: only the mirrors answer
        monkeypatch.setitem(data.DOWNLOADS, n, ("http://127.0.0.1:9/gone/" + os.path.basename(data.DOWNLOADS[n][0]),
                                                *data.DOWNLOADS[n][1:]))
    assert os.path.isdir(data.fetch("cifar10", str(tmp_path / "a"), mirror=sources["url"] + "/m/"))
    assert os.path.isdir(data.fetch("openist", str(tmp_path / "b"), mirror=str(mirror)))
    monkeypatch.setenv("DSMAE_MIRROR", str(mirror))
    assert os.path.isfile(data.fetch("pneumoniamnist", str(tmp_path / "c")))
    (mirror / "stl10_binary.tar.gz").write_bytes(b"not the pinned archive")
    with pytest.raises(ValueError, match="MD5 .* expected " + data.DOWNLOADS["stl10"][1]):   # checked all the same
        data.fetch("stl10", str(tmp_path / "d"))
    assert not os.listdir(tmp_path / "d")


def test_corrupt_dropped_missing_and_unreachable_leave_nothing_and_say_one_line(sources, tmp_path, monkeypatch):
    out, url = tmp_path / "data", sources["url"]
    good = data.DOWNLOADS["cifar10"]
    (sources["root"] / "kriz" / "bad.tar.gz").write_bytes(b"\x1f\x8b corrupt")
    cases = [(f"{url}/kriz/bad.tar.gz", ValueError, f"MD5 {md5(sources['root'] / 'kriz' / 'bad.tar.gz')}, expected "
                                                     f"{good[1]}"),
             (f"{url}/drop/kriz/cifar-10-python.tar.gz", ValueError, "expected " + good[1]),    # cut halfway
             (f"{url}/kriz/missing.tar.gz", FileNotFoundError, "HTTP Error 404"),
             ("http://127.0.0.1:9/kriz/cifar-10-python.tar.gz", FileNotFoundError, "cifar-10-python.tar.gz (or its "
                                                                                   "unpacked cifar-10-batches-py)")]
    for src, error, said in cases:
        monkeypatch.setitem(data.DOWNLOADS, "cifar10", (src, *good[1:]))
        with pytest.raises(error) as e:
            data.fetch("cifar10", str(out))
        assert said in str(e.value) and src.split("/")[-1] in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert os.listdir(out) == []                          # no file, no .part, no half-unpacked folder
    openist = data.DOWNLOADS["openist"]                       # no MD5 to catch it: the archive itself cannot be read
    monkeypatch.setitem(data.DOWNLOADS, "openist", (openist[0].replace(url, url + "/drop"), *openist[1:]))
    with pytest.raises(ValueError, match=f"OpenIST-{data.OPENIST}.tar.gz is not a whole archive"):
        data.fetch("openist", str(out))
    assert os.listdir(out) == []
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", good)
    (out / "cifar-10-python.tar.gz.part").write_bytes(b"left by a run killed halfway")
    assert os.path.isdir(data.fetch("cifar10", str(out)))     # started afresh, checked, unpacked
    assert sorted(os.listdir(out)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_file_put_by_hand_is_checked_and_never_deleted(sources, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "cifar-100-python.tar.gz").write_bytes(b"someone else's file")
    with pytest.raises(ValueError, match="cifar-100-python.tar.gz: MD5 .* delete it"):
        data.fetch("cifar100", str(out))
    assert (out / "cifar-100-python.tar.gz").read_bytes() == b"someone else's file"
    (out / "cifar-100-python.tar.gz").write_bytes(open(sources["files"]["cifar100"], "rb").read())
    assert os.path.isdir(data.fetch("cifar100", str(out)))   # the right one, put by hand: used, not fetched


@pytest.mark.parametrize("member", ["../evil", "/tmp/evil", "link"])
def test_an_archive_writing_outside_its_folder_is_refused_whole(sources, tmp_path, monkeypatch, member):
    archive = sources["root"] / "kriz" / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if member != "link" else None)
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", (f"{sources['url']}/kriz/evil.tar.gz", md5(archive),
                                                   "cifar-10-batches-py"))
    with pytest.raises(ValueError, match=f"member '{member}' would land outside"):
        data.fetch("cifar10", str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "evil") and not os.path.exists("/tmp/evil")
    assert "cifar-10-batches-py" not in os.listdir(tmp_path / "data")


def test_openist_with_one_byte_changed_is_refused(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(data.DOWNLOADS, "openist", (*data.DOWNLOADS["openist"][:1], "tree " + "0" * 40, "openist"))
    with pytest.raises(ValueError, match="not the pinned one"):
        data.fetch("openist", str(tmp_path / "data"))
    assert os.listdir(tmp_path / "data") == []                 # ours, and wrong: the archive goes too


def test_a_cifar_pickle_that_would_run_code_is_refused_unread(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR batch \(it names posix.system"):
        data.build_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert not marker.exists()


def test_the_command_line_says_one_line(sources, tmp_path):
    """`python data.py download NAME` against the local server as a mirror, with the real pinned digests: the
    fixture is not the real file, so it stops with the one line that names both digests, and exit status 1."""
    res = subprocess.run([sys.executable, "data.py", "download", "pneumoniamnist", "--data-dir", str(tmp_path / "d"),
                          "--mirror", sources["url"] + "/zenodo"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    last = res.stderr.strip().splitlines()[-1]                 # after the progress bar
    assert res.returncode == 1 and last.startswith("error: ") and "expected 28209eda62fecd6e6a2d98b1501bb15f" in last \
        and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(tmp_path / "d") == []
    res = subprocess.run([sys.executable, "data.py", "download", "imagenet"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "invalid choice" in res.stderr
