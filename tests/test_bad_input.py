"""Every script, given bad input, stops with one line that names the file or flag and says what to
do: a SystemExit with a non-zero code, never another exception (which a user would see as a
traceback). One table; add a row whenever a new case is found.

The scripts run in this process (main(get_args(argv))), so that an exception other than SystemExit
fails the test with its traceback, exactly what the user would have seen."""
import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain
from conftest import TINY_PRETRAIN, separable_npz
from make_xray_dicoms import write_dicom

CPU = ["--device", "cpu"]
GEOM = ["--model", "vit_nano", "--img-size", "16", "--patch-size", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad (and a few good) inputs, written once in the formats the scripts read."""
    d = tmp_path_factory.mktemp("bad")
    f = dict(dir=d, good=separable_npz(d / "good.npz", n_per_class=10))
    x = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3)).astype(np.uint8)
    np.savez(d / "ylen.npz", x=x, y=np.zeros(19, np.int64))
    np.savez(d / "float.npz", x=x.astype(np.float32))
    np.savez(d / "const.npz", x=np.full_like(x, 7), y=np.arange(20) % 2)
    np.savez(d / "nolabels.npz", x=x)
    np.savez(d / "neglabel.npz", x=x, y=np.where(np.arange(20) == 5, -1, np.arange(20) % 2))
    np.savez(d / "fraclabel.npz", x=x, y=np.where(np.arange(20) == 2, 0.5, np.arange(20) % 2))
    for c in ("a", "b"):                                     # a folder dataset with one corrupt PNG
        os.makedirs(d / "folder" / c)
        for i in range(4):
            Image.fromarray(x[i]).save(d / "folder" / c / f"{i}.png")
    (d / "folder" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.makedirs(d / "dcm"), os.makedirs(d / "masks")         # a mask of another size than its image
    for i in range(4):
        write_dicom(d / "dcm" / f"im{i}.dcm", x[i, :, :, 0])
        Image.fromarray(np.full((16, 12 if i == 2 else 16), 255, np.uint8)).save(d / "masks" / f"im{i}.png")
    (d / "emptylabel.csv").write_text("id,label\nim0,a\nim1,\nim2,b\nim3,a\n")
    # issue 28: what hospital exports and students' folders hold
    (d / "contradict.csv").write_text("id;label\nim0;a\nim1;b\nim2;b\nim3;a\nim1;a\n")        # semicolons, im1 twice
    (d / "latin1.csv").write_bytes("id,label\nim0,a\nim1,pneumonía\nim2,a\nim3,a\n".encode("latin-1"))
    (d / "rare.csv").write_text("id,label,split\nim0,a,train\nim1,a,train\nim2,a,test\nim3,b,test\n")
    (d / "badsplit.csv").write_text("id,label,split\nim0,a,train\nim1,a,\nim2,a,test\nim3,b,test\n")
    (d / "afile").write_text("not a folder\n")
    os.makedirs(d / "folder_empty_class" / "b")
    os.makedirs(d / "folder_empty_class" / "a")
    for i in range(4):
        Image.fromarray(x[i]).save(d / "folder_empty_class" / "a" / f"{i}.png")
    (d / "trunc.npz").write_bytes(open(f["good"], "rb").read()[:300])
    os.makedirs(d / "empty")
    (d / "notckpt.pt").write_text("these are not the weights you are looking for\n")
    pretrain.main(pretrain.get_args(TINY_PRETRAIN + ["--max-steps", "1", "--knn-samples", "20",
                                                     "--output-dir", str(d / "pre")]))
    f["pre"] = str(d / "pre" / "ckpt.pt")
    os.makedirs(d / "trunc")
    (d / "trunc" / "ckpt.pt").write_bytes(open(f["pre"], "rb").read()[:5000])
    return f


# (script, argv with {placeholders} from the fixture, text the one line must contain)
CASES = [
    # data: missing, wrong shape / dtype / length, constant, corrupt, unlabelled, masks of another size
    ("pretrain", "--dataset npz --data-dir {dir}/missing.npz", "missing.npz"),
    ("pretrain", "--dataset npz --data-dir {dir}/ylen.npz", "ylen.npz: y has shape (19,) but x holds 20"),
    ("linprobe", "--dataset npz --data-dir {dir}/ylen.npz", "ylen.npz: y has shape"),
    ("pretrain", "--dataset npz --data-dir {dir}/float.npz", "float.npz: x must be uint8"),
    ("pretrain", "--dataset npz --data-dir {dir}/const.npz", "const.npz: channel 0 is constant"),
    ("finetune", "--dataset npz --data-dir {dir}/const.npz", "const.npz: channel 0 is constant"),
    ("pretrain", "--dataset folder --data-dir {dir}/folder --img-size 16 --patch-size 4", "broken.png"),
    ("pretrain", "--dataset folder --data-dir {dir}/folder --img-size 16 --patch-size 4", "--skip-bad"),
    ("pretrain", "--dataset folder --data-dir {dir}/folder --img-size 60000 --patch-size 16", "GiB in memory (uint8)"),
    ("linprobe", "--dataset npz --data-dir {dir}/nolabels.npz", "no labels"),
    ("finetune", "--dataset npz --data-dir {dir}/nolabels.npz", "no labels"),
    ("pretrain", "--dataset dicom --data-dir {dir}/dcm --masks {dir}/masks --img-size 16 --patch-size 4",
     "im2.png is 12x16 but the image is 16x16"),
    ("pretrain", "--dataset dicom --data-dir {dir}/empty --img-size 16 --patch-size 4", "no .dcm"),
    ("pretrain", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/nolabels.csv --img-size 16 --patch-size 4",
     "--labels {dir}/nolabels.csv: no such file"),
    # labels: named with the file, the first bad index and its value (issue 20)
    ("linprobe", "--dataset npz --data-dir {dir}/neglabel.npz", "neglabel.npz: y: label -1 at index 5 is outside 0..1"),
    ("finetune", "--dataset npz --data-dir {dir}/fraclabel.npz", "fraclabel.npz: y: label 0.5 at index 2 is not a whole"),
    ("pretrain", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/emptylabel.csv --img-size 16 --patch-size 4",
     "emptylabel.csv: line 3 has no label"),
    # issue 28: contradictory rows, another encoding, a class with no training image, a half-filled split column,
    # an empty class folder, a truncated npz, outputs that cannot be written
    ("finetune", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/contradict.csv --img-size 16 --patch-size 4",
     "contradict.csv: image 'im1' is on line 3 as ('b', None) and on line 6 as ('a', None)"),
    ("finetune", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/latin1.csv --img-size 16 --patch-size 4",
     "latin1.csv: not UTF-8 text (byte 26): save it as UTF-8 CSV"),
    ("finetune", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/rare.csv --img-size 16 --patch-size 4",
     "rare.csv: class 'b' has no training image (1 in all)"),
    ("finetune", "--dataset dicom --data-dir {dir}/dcm --labels {dir}/badsplit.csv --img-size 16 --patch-size 4",
     "badsplit.csv: line 3: image im1 has split ''; use train, val or test"),
    ("pretrain", "--dataset folder --data-dir {dir}/folder_empty_class --img-size 16 --patch-size 4",
     "folder_empty_class/b holds no images"),
    ("linprobe", "--dataset npz --data-dir {dir}/trunc.npz", "trunc.npz is not a readable .npz"),
    ("pretrain", "--output-dir {dir}/afile " + " ".join(GEOM), "--output-dir {dir}/afile: File exists; choose a folder"),
    ("linprobe", "--output-dir {dir}/afile/sub", "--output-dir {dir}/afile/sub: Not a directory"),
    ("cam", "--checkpoint {pre} --output-dir /proc/dsmae", "--output-dir /proc/dsmae: No such file or directory"),
    ("cam", "--checkpoint {dir}/notckpt.pt", "notckpt.pt is not a readable classifier checkpoint"),
    # settings
    ("pretrain", "--img-size 18 --patch-size 4", "--img-size 18 is not divisible by --patch-size 4"),
    ("pretrain", "--lam 2", "argument --lam: 2 is not a number in [0, 1]"),           # ranges: tests/test_flags.py
    ("pretrain", "--batch-size 0", "argument --batch-size: 0 is not an integer >= 1"),
    ("pretrain", "--noise-ratio 1.5", "argument --noise-ratio: 1.5 is not a number in (0, 1]"),
    ("pretrain", "--method mae --mask-ratio 0.01 " + " ".join(GEOM), "--mask-ratio 0.01 masks 0 of the 16 patches"),
    ("pretrain", "--decoder-input regressor --lam 1", "--decoder-input regressor chains the two branches"),
    ("pretrain", "--target-blocks 7", "--target-blocks 7: vit_micro has 6 blocks"),
    ("finetune", "--checkpoint {pre} --img-size 18", "image size 18 is not divisible by the patch size 4"),
    ("curriculum", "--stages relloc --img-size 8", "relloc at --img-size 8: cells of 2 px"),
    ("cam", "--checkpoint {pre} --target banana", "banana is not pred, true or a class index"),
    ("pretrain", "--batch-size 100000 --model vit_nano", "fewer than one step"),
    ("pretrain", "--device banana", "--device banana: not a device"),
    ("curriculum", "--stages rotation,jigsaw", "unknown stage 'jigsaw'"),
    # checkpoints: not one, truncated, of another kind, missing
    ("linprobe", "--checkpoint {dir}/notckpt.pt", "notckpt.pt is not a readable pretrain.py checkpoint"),
    ("finetune", "--checkpoint {dir}/notckpt.pt", "notckpt.pt is not a readable pretrain.py checkpoint"),
    ("finetune", "--checkpoint {dir}/nothere.pt", "--checkpoint {dir}/nothere.pt: no such file"),
    ("pretrain", "--output-dir {dir}/trunc " + " ".join(GEOM), "{dir}/trunc/ckpt.pt is not a readable checkpoint"),
    ("cam", "--checkpoint {pre}", "neither a finetune.py nor a curriculum.py classifier"),
    ("linprobe", "--checkpoint {pre} --model vit_micro", "not vit_micro"),
    # degenerate training: the message says which checkpoint exists
    ("pretrain", "--output-dir {dir}/nan --noise-std 1e39 --log-every 1 --max-steps 3 --knn-samples 20 "
     + " ".join(GEOM), "loss is nan at step 1: stopping; no checkpoint was written"),
]
NO_GPU = [(s, f"--device cuda {a}", "--device cuda: this machine has 0 CUDA GPU(s)")
          for s, a in (("pretrain", ""), ("finetune", ""), ("linprobe", ""), ("cam", "--checkpoint {pre}"),
                       ("curriculum", ""))]


def run(script, argv, capsys):
    """(exit code, everything the script printed) for a run that must stop with SystemExit."""
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:              # any other exception: the test fails, traceback shown
        mod.main(mod.get_args(argv))
    out = capsys.readouterr()
    code = stop.value.code
    return (1 if isinstance(code, str) else code), (code if isinstance(code, str) else "") + out.err + out.out


@pytest.mark.parametrize("script,argv,expected", CASES + ([] if torch.cuda.is_available() else NO_GPU),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_bad_input_stops_with_one_named_line(script, argv, expected, files, capsys, tmp_path):
    fill = lambda s: s.format(dir=files["dir"], pre=files["pre"])
    argv = fill(argv).split() + (CPU if "--device" not in argv else []) + \
        (["--output-dir", str(tmp_path)] if "--output-dir" not in argv else [])
    code, message = run(script, argv, capsys)
    assert code != 0
    assert fill(expected) in message, message
    assert "Traceback" not in message


def test_folder_skip_bad_leaves_the_corrupt_file_out(files, capsys):
    import data
    ds = data.build_dataset("folder", "train", data_dir=str(files["dir"] / "folder"), img_size=16, skip_bad=True)
    assert len(ds) == 8                                      # the 8 good images (10% of 4 per class rounds to none held out)
    assert "broken.png" in capsys.readouterr().out


def test_full_disk_removes_the_partial_file_and_says_what_survives(tmp_path, monkeypatch, capsys):
    """A write that fails midway (ENOSPC): no .tmp is left behind, the message says whether an
    earlier checkpoint survives, and that one is untouched."""
    real = torch.save

    def full_disk(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code, message = run("pretrain", TINY_PRETRAIN + ["--max-steps", "1", "--output-dir", str(tmp_path)], capsys)
    assert code != 0 and "No space left on device" in message and "there was no earlier" in message
    assert os.listdir(tmp_path) and not [f for f in os.listdir(tmp_path) if f.startswith("ckpt.pt")]

    monkeypatch.setattr(torch, "save", real)
    pretrain.main(pretrain.get_args(TINY_PRETRAIN + ["--max-steps", "1", "--output-dir", str(tmp_path)]))
    before = open(tmp_path / "ckpt.pt", "rb").read()
    monkeypatch.setattr(torch, "save", full_disk)
    code, message = run("pretrain", TINY_PRETRAIN + ["--max-steps", "2", "--output-dir", str(tmp_path)], capsys)
    assert "the previous" in message and "is intact" in message
    assert open(tmp_path / "ckpt.pt", "rb").read() == before and not os.path.exists(tmp_path / "ckpt.pt.tmp")
