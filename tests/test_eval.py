"""finetune.py, linprobe.py and the shared evaluation helpers in models.py."""
import os

import numpy as np
import pytest
import torch

import data
import finetune
import linprobe
import pretrain
from conftest import TINY_PRETRAIN, separable_npz
from models import ViT, extract_features, load_encoder, per_class_accuracy

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny pretrain.py checkpoints: DS-MAE (student + teacher) and MAE (student only)."""
    out = {}
    for method in ("dsmae", "mae"):
        d = tmp_path_factory.mktemp(method)
        pretrain.main(pretrain.get_args(TINY_PRETRAIN + ["--knn-samples", "50", "--max-steps", "2", "--method", method,
                                                         "--output-dir", str(d)]))
        out[method] = str(d / "ckpt.pt")
    return out


def test_load_student_and_teacher_strictly(ckpts):
    ck = torch.load(ckpts["dsmae"], weights_only=True)
    for key in ("student", "teacher"):
        enc = load_encoder(ckpts["dsmae"], key)
        ref = ck["encoder" if key == "student" else "teacher"]
        assert set(enc.state_dict()) == set(ref)
        assert all(torch.equal(enc.state_dict()[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="no teacher"):
        load_encoder(ckpts["mae"], "teacher")
    with pytest.raises(ValueError, match="vit_tiny"):
        load_encoder(ckpts["dsmae"], "student", model="vit_tiny")
    with pytest.raises(ValueError, match="patch_size"):
        load_encoder(ckpts["dsmae"], "student", patch_size=8)


def test_new_image_size_rebuilds_the_positional_embedding(ckpts):
    with pytest.warns(UserWarning, match="grid 4x4"):
        enc = load_encoder(ckpts["dsmae"], "teacher", img_size=32)
    assert enc.grid == 8 and enc(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    ref = load_encoder(ckpts["dsmae"], "teacher")
    assert torch.equal(enc.blocks[0].mlp.fc1.weight, ref.blocks[0].mlp.fc1.weight)


def test_scratch_baseline_needs_no_checkpoint():
    enc = load_encoder(None, model="vit_nano", img_size=16, patch_size=4, num_classes=5)
    assert enc(torch.randn(3, 3, 16, 16)).shape == (3, 5)


def test_per_class_accuracy():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    assert per_class_accuracy(pred, y, 3).tolist() == pytest.approx([0.5, 2 / 3, 1.0])


def test_finetune_learns_a_separable_set(tmp_path):
    path = separable_npz(tmp_path / "sep.npz")
    res = finetune.main(finetune.get_args([
        "--dataset", "npz", "--data-dir", path, "--model", "vit_nano", "--img-size", "16", "--patch-size", "4",
        "--device", "cpu", "--no-compile", "--batch-size", "16", "--epochs", "4", "--warmup-epochs", "0.5",
        "--blr", "0.02", "--mixup", "0", "--cutmix", "0", "--randaug-n", "0", "--output-dir", str(tmp_path / "ft")]))
    assert res["best"]["top1"] >= 90 and res["mean_per_class"] >= 90
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert best["num_classes"] == 4 and best["data"]["classes"] == ["r", "g", "b", "y"]


@pytest.mark.parametrize("flag, flips", [([], True), (["--no-hflip"], False)])
def test_finetune_hflip_flag_reaches_the_augmentation(tmp_path, monkeypatch, flag, flips):
    seen, augment = [], data.augment

    def spy(*a, flip=True, **k):
        seen.append(flip)
        return augment(*a, flip=flip, **k)
    monkeypatch.setattr(data, "augment", spy)
    finetune.main(finetune.get_args(["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--device",
                                     "cpu", "--no-compile", "--batch-size", "16", "--max-steps", "2",
                                     "--output-dir", str(tmp_path)] + flag))
    assert seen == [flips, flips]


def test_finetune_from_a_checkpoint_with_the_full_recipe_and_resume(tmp_path, ckpts):
    args = ["--checkpoint", ckpts["dsmae"], "--device", "cpu", "--no-compile", "--batch-size", "8", "--epochs", "2",
            "--mixup", "0.8", "--cutmix", "1.0", "--randaug-n", "2", "--smoothing", "0.1", "--drop-path", "0.1",
            "--output-dir", str(tmp_path / "a")]
    finetune.main(finetune.get_args(args + ["--max-steps", "3"]))
    res = finetune.main(finetune.get_args(args + ["--max-steps", "6"]))        # resumes at step 3
    finetune.main(finetune.get_args(args[:-1] + [str(tmp_path / "b"), "--max-steps", "6"]))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert res["step"] == 6 and a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(SystemExit, match=r"ckpt\.pt was trained with other settings \({'mixup': \(0\.8, 0\.0\)"):
        finetune.main(finetune.get_args(args + ["--max-steps", "8", "--mixup", "0"]))


@pytest.mark.parametrize("extra,message", [
    (["--checkpoint", "/nonexistent/ckpt.pt"], "no such file"),
    (["--model", "vit_tiny", "--checkpoint", "CKPT"], "vit_tiny"),
])
def test_evaluation_scripts_reject_bad_input(tmp_path, ckpts, extra, message):
    extra = [ckpts["dsmae"] if e == "CKPT" else e for e in extra]
    for script in (finetune, linprobe):
        with pytest.raises(SystemExit, match=message):
            script.main(script.get_args(["--device", "cpu", "--output-dir", str(tmp_path)] + extra))


def test_unlabelled_or_inconsistent_data_is_rejected(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(60) % 5, class_names=np.array(["a", "b", "c"]))
    common = ["--dataset", "npz", "--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--device", "cpu",
              "--output-dir", str(tmp_path / "out")]
    for script in (finetune, linprobe):
        with pytest.raises(SystemExit, match="no labels"):
            script.main(script.get_args(common + ["--data-dir", str(tmp_path / "unlabelled.npz")]))
    for script in (finetune, linprobe):                # labels 3 and 4 with three class names: named at the door
        with pytest.raises(SystemExit, match=r"bad.npz: y: label 3 at index 3 is outside 0\.\.2 \(3 classes; 24 such"):
            script.main(script.get_args(common + ["--data-dir", str(tmp_path / "bad.npz")]))


@pytest.mark.parametrize("augment", [False, True])
def test_probe_leaves_the_encoder_untouched(tmp_path, ckpts, monkeypatch, augment):
    seen = {}

    def spy(*a, **k):
        seen["encoder"] = load_encoder(*a, **k)
        return seen["encoder"]

    monkeypatch.setattr(linprobe, "load_encoder", spy)
    path = separable_npz(tmp_path / "sep.npz")
    res = linprobe.main(linprobe.get_args(["--checkpoint", ckpts["dsmae"], "--dataset", "npz", "--data-dir", path,
                                           "--device", "cpu", "--epochs", "3", "--batch-size", "32",
                                           "--output-dir", str(tmp_path)]
                                          + (["--augment"] if augment else [])))
    teacher = torch.load(ckpts["dsmae"], weights_only=True)["teacher"]
    enc = seen["encoder"]
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(enc.state_dict()[k].cpu(), teacher[k]) for k in teacher)
    assert res["knn_top1"] == 100 and res["linear_top1"] >= 75      # colours: easy even for a 2-step encoder


def test_cached_features_equal_fresh_ones(tmp_path, ckpts):
    path = separable_npz(tmp_path / "sep.npz")
    args = linprobe.get_args(["--checkpoint", ckpts["dsmae"], "--dataset", "npz", "--data-dir", path, "--device", "cpu",
                              "--epochs", "2", "--batch-size", "32", "--pool", "both", "--output-dir", str(tmp_path),
                              "--precision", "fp32"])
    first = linprobe.main(args)
    cache = [f for f in os.listdir(tmp_path) if f.startswith("features_")]
    assert len(cache) == 1
    cached = torch.load(tmp_path / cache[0], weights_only=True)
    import data
    train = data.build_dataset("npz", "train", data_dir=path)
    enc = load_encoder(ckpts["dsmae"], "teacher")
    fresh = extract_features(enc, train.x, lambda x: data.preprocess(x, 16, train.mean, train.std))
    assert torch.equal(cached["train"][0], fresh[0]) and torch.equal(cached["train"][1], fresh[1])
    again = linprobe.main(args)                                  # second run reads the cache
    assert again["linear_top1"] == first["linear_top1"] and again["knn_top1"] == first["knn_top1"]
    os.utime(ckpts["dsmae"])                                     # a changed checkpoint means new features
    linprobe.main(args)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("features_")]) == 2


def test_encoder_loads_into_timm_with_identical_features():
    timm = pytest.importorskip("timm")   # not a dependency; runs where timm is installed
    enc = ViT(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3).eval()
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                            num_classes=10).eval()
    missing, unexpected = vit.load_state_dict(enc.state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(x), vit.forward_features(x), atol=1e-5)


def test_label_budget_takes_evenly_spaced_images_of_every_class(tmp_path, ckpts):
    path = separable_npz(tmp_path / "sep.npz")                  # 4 classes of 40, sorted by class
    full = data.build_dataset("npz", "train", data_dir=path)
    few = full.first(8)
    assert len(few) == 8 and torch.bincount(few.y).tolist() == [2, 2, 2, 2] and few.mean == full.mean
    assert torch.equal(few.x[0], full.x[0]) and torch.equal(few.x[-1], full.x[-1])
    res = linprobe.main(linprobe.get_args(["--checkpoint", ckpts["dsmae"], "--dataset", "npz", "--data-dir", path,
                                           "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--max-train", "8",
                                           "--output-dir", str(tmp_path)]))
    assert res["train_images"] == 8


def test_auto_key_takes_the_teacher_where_there_is_one(ckpts):
    for method, key in (("dsmae", "teacher"), ("mae", "encoder")):
        ref = torch.load(ckpts[method], weights_only=True)[key]
        enc = load_encoder(ckpts[method])                          # key "auto", the scripts' default
        assert all(torch.equal(enc.state_dict()[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="has no teacher encoder"):
        load_encoder(ckpts["mae"], "teacher")
