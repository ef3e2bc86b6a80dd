"""The course labs cannot rot: every command of every handout (labs/lab*.md) runs here at a tiny size
(the handout's own flags, then a few more that shrink the model, the data and the epochs), and
every output the handout tells students to look at, and every file its measured numbers come from,
must exist afterwards. A renamed flag fails the command (argparse), a renamed output fails the check."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "labs"))
import measure  # noqa: E402

# labs 4 and 5 start by downloading real data; the test has no network, so it takes a copy laid out as
# `python data.py download` leaves it (openist/, pneumoniamnist.npz) from this folder, and without one writes
# small files in the same layout (write_downloads)
TEST_DATA = os.environ.get("DSMAE_TEST_DATA")
LABS_README = os.path.join(ROOT, "labs", "README.md")
NANO = ["--model", "vit_nano", "--img-size", "16", "--patch-size", "4"]
TINY = {  # appended to a handout's flags (argparse: the last value of a flag wins)
    "pretrain.py": ["--epochs", "1", "--max-steps", "2", "--knn-samples", "40", "--batch-size", "16",
                    "--decoder-dim", "32", "--decoder-depth", "1", *NANO],
    "linprobe.py": ["--epochs", "1"],
    "finetune.py": ["--epochs", "1", "--max-steps", "2", "--batch-size", "4"],
    "segment.py": ["--epochs", "1", "--max-steps", "2", "--img-size", "32", "--width", "4", "--depth", "2",
                   "--val-count", "3"],
    "cam.py": ["--max-images", "4"],
    "curriculum.py": ["--epochs", "1", "--search-epochs", "1", "--cls-epochs", "1", "--cls-search-epochs", "1",
                      "--max-train", "64", "--max-val", "16", "--lr-grid", "0.1", "--cls-lr-grid", "0.1",
                      "--img-size", "16"],
    "make_xray_dicoms.py": ["--limit", "14"],
}


def tiny(argv):
    """The handout's command line made tiny: flags appended per script (segment.py predict, and
    fine-tuning from a checkpoint, keep their model)."""
    script = os.path.basename(argv[0])
    extra = list(TINY.get(script, []))
    if script == "segment.py" and argv[1] == "predict":
        extra = []
    if script == "finetune.py" and "--checkpoint" not in argv and "--dataset" not in argv:
        extra += NANO
    if script == "finetune.py" and "--dataset" in argv:         # the X-ray models: a tiny ViT at their size
        extra += ["--model", "vit_nano"]
    if script == "linprobe.py" and "--checkpoint" not in argv:
        extra += NANO
    return argv + extra


def run_in_process(argv, path, line):
    """python SCRIPT ARGS as the script's own main would run it, in this process (one torch import for
    all the commands); an argparse error or any exit is a failed command."""
    import importlib.util
    script = os.path.join(ROOT, argv[0])
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(script))[0], script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        if hasattr(mod, "get_args"):
            mod.main(mod.get_args(argv[1:]))
        elif argv[0] == "data.py":                # python data.py download NAME: the copy is in place already
            [mod.fetch(name, argv[argv.index("--data-dir") + 1]) for name in argv[2:argv.index("--data-dir")]]
        else:                                     # tools/plot.py, tests/make_xray_dicoms.py: main(argv)
            mod.main(argv[1:])
    except SystemExit as e:
        pytest.fail(f"{os.path.basename(path)}: `{line}` stopped: {e}")


def write_downloads(name, data_dir):
    """What `python data.py download NAME` leaves, small: OpenIST's folder (24 radiographs, images/<id>.jpg with
    masks/<id>.png) or MedMNIST's npz ({train,val,test}_{images,labels}, 28 px, labels (N, 1), 1 = brighter)."""
    import numpy as np
    from PIL import Image
    from test_segment import radiograph
    if name == "openist":
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(data_dir, "openist", sub))
        for k in range(24):                   # segment.py train: over one batch of 16 besides the 3 held out
            img, mask = radiograph(48, 56, k)
            Image.fromarray(img).save(os.path.join(data_dir, "openist", "images", f"{k}-1-500-500-100.jpg"))
            Image.fromarray(mask).save(os.path.join(data_dir, "openist", "masks", f"{k}-1-500-500-100.png"))
        return
    rng, arrays = np.random.default_rng(0), {}
    for split, n in (("train", 120), ("val", 20), ("test", 40)):
        y = np.arange(n) % 2
        arrays[f"{split}_images"] = (rng.integers(0, 120, (n, 28, 28)) + 100 * y[:, None, None]).astype(np.uint8)
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    np.savez_compressed(os.path.join(data_dir, name + ".npz"), **arrays)


def paths_to_look_at(text):
    """Every `runs/...` path the handout names in backticks (a numbered epoch matches any epoch)."""
    return [re.sub(r"_\d{4}\.png$", "_*.png", p) for p in re.findall(r"`(runs/[^`\s]+)`", text)]


@pytest.mark.parametrize("path", measure.handouts(), ids=os.path.basename)
def test_every_lab_command_runs_and_its_outputs_exist(path, tmp_path, monkeypatch):
    text = open(path).read()
    runs, data_dir = str(tmp_path / "runs"), str(tmp_path / "data")
    if "data.py download" in text:
        os.makedirs(data_dir, exist_ok=True)
        for name in re.findall(r"data.py download (\S+)", text):
            if not TEST_DATA:
                write_downloads(name, data_dir)
                continue
            src = os.path.join(TEST_DATA, name + (".npz" if name.startswith("pneumoniamnist") else ""))
            if not os.path.exists(src):
                pytest.skip(f"no {name} in DSMAE_TEST_DATA={TEST_DATA}")
            os.symlink(src, os.path.join(data_dir, os.path.basename(src)))
    assert measure.commands(text) and measure.measures(text), "a handout needs commands and measured numbers"
    monkeypatch.chdir(ROOT)                       # the handouts' paths are relative to the repository
    for line in measure.commands(text):
        if line.startswith("SEED="):
            continue
        line = line.replace("$SEED", "0").replace("runs/", runs + "/").replace(" data/", f" {data_dir}/")
        argv = tiny(shlex.split(line)[1:] + (["--data-dir", data_dir] if "data.py download" in line else []))
        run_in_process(argv, path, line)
    for p in paths_to_look_at(text):
        found = glob.glob(p.replace("runs/", runs + "/"))
        assert found, f"{os.path.basename(path)} tells students to look at {p}, which was not written"
    for label, file, key, where in measure.measures(text):
        value = measure.read_number(file.replace("$SEED", "0").replace("runs/", runs + "/"), key, where)
        assert value is not None, f"{os.path.basename(path)}: '{label}' ({file}, {key}) was not written"


def test_teaching_comments_strip_cleanly(tmp_path):
    """The `##` comments the labs point at are whole lines, so the sed line of labs/README.md removes
    them all and leaves code that runs: here it strips a copy of the scripts, which must then compile,
    hold no `##` line, and run a DS-MAE forward and backward pass from the stripped models.py."""
    for f in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        lines = open(f).read().splitlines()
        assert not [l for l in lines if "##" in l and not re.match(r"\s*##", l) and '"' not in l], f
        shutil.copy(f, tmp_path)
    sed = re.search(r"^(sed -i .*\*\.py)$", open(LABS_README).read(), flags=re.M).group(1)
    subprocess.run(sed, shell=True, cwd=tmp_path, check=True)
    for f in sorted(tmp_path.glob("*.py")):
        text = f.read_text()
        assert not re.search(r"^\s*##", text, flags=re.M), f.name
        compile(text, str(f), "exec")
    code = ("import torch, models; torch.manual_seed(0); "
            "m = models.DSMAE(models.ViT(img_size=16, patch_size=4, **models.MODELS['vit_nano']), decoder_dim=32, "
            "decoder_depth=1); loss, _ = m(torch.randn(2, 3, 16, 16)); loss.backward(); m.update_teacher(0.9); "
            "print(float(loss))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and float(out.stdout) > 0, out.stderr
