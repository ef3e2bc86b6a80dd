"""curriculum.py and the ResNet / classifier helpers at the end of models.py (CPU, seconds)."""
import csv

import numpy as np
import pytest
import torch

import finetune
from models import build_resnet, evaluate, load_classifier


def separable_npz(path, n_per_class=24, size=16, seed=0, channels=3):
    """Four classes that differ in colour (grey level with one channel): easy for any classifier."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=np.int16)
    if channels == 1:
        colours = np.array([[20], [90], [160], [235]], dtype=np.int16)
    y = np.repeat(np.arange(4), n_per_class)
    x = colours[y][:, None, None, :] + rng.integers(-15, 16, (len(y), size, size, channels))
    np.savez(path, x=x.clip(0, 255).astype(np.uint8), y=y, class_names=np.array(["r", "g", "b", "y"]))
    return str(path)


# ----------------------------------------------------------------------------- models.py: ResNet, load_classifier

@pytest.mark.parametrize("img_size,small_stem", [(16, True), (64, True), (72, False)])
def test_build_resnet_stem_follows_the_image_size(img_size, small_stem):
    net = build_resnet("resnet18", in_chans=1, img_size=img_size)
    assert net.out_dim == 512 and net.conv1.in_channels == 1
    assert (net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, torch.nn.Identity)) == small_stem
    assert net(torch.randn(2, 1, img_size, img_size)).shape == (2, 512)
    assert not any(k.startswith("fc.") for k in net.state_dict())


def test_load_classifier_reads_a_finetune_checkpoint(tmp_path):
    path = separable_npz(tmp_path / "sep.npz")
    finetune.main(finetune.get_args([
        "--dataset", "npz", "--data-dir", path, "--model", "vit_nano", "--img-size", "16", "--patch-size", "4",
        "--device", "cpu", "--no-compile", "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--mixup", "0",
        "--cutmix", "0", "--randaug-n", "0", "--pool", "mean", "--output-dir", str(tmp_path / "ft")]))
    ckpt = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    model, meta = load_classifier(str(tmp_path / "ft" / "best.pt"))
    assert not model.training and meta["kind"] == "vit" and meta["pool"] == "mean"
    assert meta["num_classes"] == 4 and meta["classes"] == ["r", "g", "b", "y"] and meta["img_size"] == 16
    assert meta["in_chans"] == 3 and meta["mean"] == tuple(ckpt["data"]["mean"])
    ref = finetune.load_encoder(None, model="vit_nano", img_size=16, patch_size=4, num_classes=4, global_pool="avg")
    ref.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(x), ref.eval()(x))


# ----------------------------------------------------------------------------- curriculum.py: views and labels

import curriculum  # noqa: E402
import data  # noqa: E402
from models import MODELS, ViT  # noqa: E402


def test_rotation_labels_match_the_applied_rotation():
    x = torch.zeros(3, 1, 8, 8)
    x[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])              # a marker in the top-left corner
    v, labels = curriculum.rotate_batch(x)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):
        assert torch.equal(v[i], torch.rot90(x[i % 3], int(labels[i]), dims=(1, 2)))
    # a quarter turn counter-clockwise takes the top-left corner to the bottom-left
    assert v[3, 0, 7, 0] == 1.0 and v[6, 0, 7, 7] == 1.0 and v[9, 0, 0, 7] == 1.0


def test_relloc_labels_match_the_neighbour_and_patches_do_not_overlap():
    S, gap, jitter = 30, 4, 1
    rows, cols = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    x = torch.stack([rows, cols]).float().expand(400, -1, -1, -1)          # pixels hold their own coordinates
    centre, neighbour, label, corners = curriculum.relloc_pairs(x, gap, jitter)
    c, p = S // 3, S // 3 - gap
    assert centre.shape == (400, 2, p, p) and set(label.tolist()) == set(range(8))
    for k, patch in enumerate((centre, neighbour)):                       # patches cut where corners say
        assert torch.equal(patch[:, 0, 0, 0], corners[:, k, 0].float())
        assert torch.equal(patch[:, 1, 0, 0], corners[:, k, 1].float())
    cell = (neighbour[:, :, p // 2, p // 2] // c).long()                   # (row, col) cell of the neighbour
    assert torch.equal(cell[:, 0] * 3 + cell[:, 1], label + (label >= 4))  # row-major, centre skipped
    assert (centre[:, :, p // 2, p // 2] // c == 1).all()
    # separated on at least one axis by gap - 2 * jitter pixels
    lo_c, lo_n = corners[:, 0], corners[:, 1]
    sep = torch.maximum(lo_n - (lo_c + p), lo_c - (lo_n + p)).max(dim=1).values
    assert (sep >= gap - 2 * jitter).all()


# ----------------------------------------------------------------------------- curriculum.py: pretext tasks

def tiny_task(name, **kw):
    torch.manual_seed(0)
    ds = data.synthetic_shapes("train", 16, n=8)
    backbone = ViT(img_size=16, patch_size=4, **MODELS["vit_nano"])
    aug = lambda x: data.augment(x, 16, ds.mean, ds.std)
    plain = lambda x: data.preprocess(x, 16, ds.mean, ds.std)
    if kw:
        cls = dict(moco=curriculum.MoCo, dino=curriculum.DINO, swav=curriculum.SwAV)[name]
        return cls(backbone, 32, aug, plain, **kw), backbone, ds
    args = curriculum.get_args(["--backbone", "vit_nano", "--img-size", "16", "--patch-size", "4", "--prototypes", "16",
                                "--dino-dim", "64", "--decoder-dim", "32", "--decoder-depth", "1"])
    return curriculum.make_task(name, backbone, 32, aug, plain, args, 8, 10, 8), backbone, ds


LRS = dict(rotation=0.1, relloc=0.1, moco=0.1, swav=1.0, simclr=0.1, byol=0.1, dino=0.003, mae=3e-3, dsmae=3e-3)


@pytest.mark.parametrize("name", curriculum.PRETEXT)
def test_each_pretext_loss_decreases_on_a_tiny_batch(name):
    if name == "dino":      # teacher and centre held fixed: with both moving, DINO's loss is not monotone
        task, _, ds = tiny_task("dino", out_dim=64, ema=1.0, center_momentum=1.0)
    else:
        task, _, ds = tiny_task(name)
    opt = curriculum.make_optimizer(curriculum.optimizer_kind(name), task, LRS[name])
    losses = []
    for step in range(6):
        torch.manual_seed(1)                                   # the same views every step
        loss, _ = task(ds.x, ds.y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        task.step_done(step, 6)
        losses.append(loss.item())
    first = losses[1] if name == "moco" else losses[0]        # MoCo: from the first real queue on
    assert losses[-1] < first, losses


def test_moco_queue_is_fifo_with_keys_from_the_key_encoder():
    task, backbone, ds = tiny_task("moco", queue=12, ema=0.5)
    opt = torch.optim.SGD(task.parameters(), lr=0.5)
    v = [data.preprocess(ds.x, 16, ds.mean, ds.std)[i:i + 4] for i in (0, 4)]
    keys = []
    for step in range(4):                                     # 4 x 4 keys into a queue of 12: wraps once
        loss, _ = task.contrast(v[0], v[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            k = torch.nn.functional.normalize(task.key(v[1]), dim=1)
            q = torch.nn.functional.normalize(task.projector(backbone(v[1])), dim=1)
        keys.append(k)                                        # before the update: what contrast() enqueued
        task.step_done(step, 4)
        if step:
            assert not torch.allclose(k, q, atol=1e-4)          # the key encoder is not the query encoder
    want = torch.cat([keys[3], keys[1], keys[2]])              # step 3 overwrote the oldest (step 0)
    assert torch.allclose(task.queue, want, atol=1e-6) and int(task.ptr) == 4


def test_swav_sinkhorn_marginals():
    scores = torch.randn(32, 8) * 0.3
    q = curriculum.sinkhorn(scores, eps=0.05, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-5)          # each sample: one unit
    q = curriculum.sinkhorn(scores, eps=0.05, iters=200)
    assert torch.allclose(q.sum(0), torch.full((8,), 32 / 8), atol=1e-3)  # each prototype: an equal share
    assert (q >= 0).all()


def test_adamw_does_not_decay_tokens_biases_or_norms():
    task, _, _ = tiny_task("mae")
    opt = curriculum.make_optimizer("adamw", task, 1e-3)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainable = {name: p for name, p in task.named_parameters() if p.requires_grad}
    assert sorted(decay) == sorted(id(p) for p in trainable.values())          # each parameter once
    no_decay = [n for n, p in trainable.items() if decay[id(p)] == 0.0]
    assert {"model.mask_token", "model.encoder.cls_token"} <= set(no_decay)  # the drift that was found
    assert "model.encoder.blocks.0.norm1.weight" in no_decay and "model.encoder.blocks.0.attn.qkv.bias" in no_decay
    assert all(decay[id(p)] == 0.05 for n, p in trainable.items()
               if p.ndim > 1 and n.split(".")[-1] not in ("cls_token", "mask_token", "pos_embed"))


def test_a_misspelt_task_keyword_is_an_error():
    with pytest.raises(TypeError):
        tiny_task("moco", queu=12)


def test_switching_heads_keeps_the_backbone_bit_identical():
    task, backbone, ds = tiny_task("rotation")
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    task(ds.x)[0].backward()
    opt.step()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    args = curriculum.get_args(["--backbone", "vit_nano", "--img-size", "16", "--prototypes", "16"])
    for name in ("moco", "swav", "byol", "classify"):
        new = curriculum.make_task(name, backbone, 32, task.aug, task.plain, args, 8, 10, 8)
        assert not any(p is q for p in new.parameters() for q in task.head.parameters())
        state = backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before.items() if not k.startswith("head."))


# ----------------------------------------------------------------------------- curriculum.py: search, resume, checkpoint

def tiny_run(data_path, out, *extra):
    return curriculum.get_args(["--dataset", "npz", "--data-dir", data_path, "--output-dir", str(out), "--device", "cpu",
                                "--epochs", "2", "--search-epochs", "1", "--cls-epochs", "2", "--cls-search-epochs", "1",
                                "--batch-size", "16", "--cls-batch-size", "16", "--lr-grid", "0.01,0.05",
                                "--val-fraction", "0.25", *extra])


def test_lr_search_picks_the_best_value_and_the_classifier_round_trips(tmp_path):
    """Scratch ResNet on four grey levels: lr 0 cannot learn (chance), 0.1 can; the search must pick 0.1,
    and load_classifier must give back the classifier that was tested."""
    path = separable_npz(tmp_path / "grey.npz", n_per_class=16, size=8, channels=1)
    res = curriculum.main(tiny_run(path, tmp_path / "run", "--backbone", "resnet18", "--img-size", "8", "--stages", "",
                                   "--cls-lr-grid", "0,0.1", "--crop-scale", "1.0"))
    trials = res["stages"][-1]["trials"]
    assert res["stages"][-1]["lr"] == 0.1 == float(max(trials, key=trials.get)) and trials["0.1"] > trials["0"]
    model, meta = load_classifier(res["checkpoint"])
    assert meta["kind"] == "cnn" and meta["num_classes"] == 4 and meta["in_chans"] == 1 and meta["img_size"] == 8
    test = data.build_dataset("npz", "test", data_dir=path)
    again = evaluate(model, test.x, test.y, lambda x: data.preprocess(x, 8, meta["mean"], meta["std"]), 4)
    assert again["top1"] == res["metrics"]["top1"] and again["per_class"] == res["metrics"]["per_class"]


class Killed(Exception):
    """Stands in for a kill during a trial."""


def test_resume_skips_finished_stages_and_trials(tmp_path, monkeypatch):
    path = separable_npz(tmp_path / "sep.npz", n_per_class=12, size=16)
    vit = ["--backbone", "vit_nano", "--img-size", "16", "--patch-size", "4"]
    curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation"))
    rotation_final = torch.load(tmp_path / "run" / "rotation" / "final.pt", weights_only=True)["model"]

    calls, killed, real = [], [], curriculum.train_epochs

    def spy(task, opt, ds, lr, e0, e1, epochs, batch_size, seed, device, amp, desc, *a):
        calls.append((desc, e0))
        if desc == "relloc lr 0.01" and e0 == 0:                # the first relloc trial starts from rotation's end
            state = task.backbone.state_dict()
            assert all(torch.equal(state[k], v) for k, v in rotation_final.items())
        if desc == "relloc lr 0.05" and not killed:
            killed.append(1)
            raise Killed                                        # killed during the second trial
        return real(task, opt, ds, lr, e0, e1, epochs, batch_size, seed, device, amp, desc, *a)

    monkeypatch.setattr(curriculum, "train_epochs", spy)
    with pytest.raises(Killed):
        curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation,relloc"))
    calls.clear()
    res = curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation,relloc"))
    names = [c[0] for c in calls]
    assert not any(n.startswith("rotation") for n in names)             # finished stage: read back
    assert "relloc lr 0.01" not in [n for n, e0 in calls if e0 == 0]     # finished trial: read back
    assert ("relloc lr 0.05", 0) in calls and any(n.startswith("classify") for n in names)
    assert res["stages"][0]["stage"] == "rotation" and res["stages"][1]["stage"] == "relloc"
    with open(tmp_path / "run" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[1]["stages"] == "rotation+relloc" and rows[1]["seed"] == "0"
    with pytest.raises(SystemExit, match="other settings"):           # same folder, other settings: refused
        curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation", "--crop-scale", "0.3"))
    for other in (["--cls-mode", "linear"], ["--split-fractions", "0.5,0.2,0.3"]):      # data and classifier too
        with pytest.raises(SystemExit, match="other settings"):
            curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation", *other))
    with pytest.raises(SystemExit, match="rotation-classify"):     # cls_* flags: the pretext stage is reused
        curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation", "--cls-epochs", "3"))
    model, meta = load_classifier(res["checkpoint"])
    assert meta["kind"] == "vit" and meta["classes"] == ["r", "g", "b", "y"]
    # a stage written before a flag existed is reused while the new flag is at its default
    final = tmp_path / "run" / "rotation" / "final.pt"
    done = torch.load(final, weights_only=True)
    del done["config"]["proj_dim"]
    torch.save(done, final)
    calls.clear()
    curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation"))
    assert not any(n.startswith("rotation") for n, _ in calls)
    with pytest.raises(SystemExit, match="proj_dim"):
        curriculum.main(tiny_run(path, tmp_path / "run", *vit, "--stages", "rotation", "--proj-dim", "64"))


def test_results_rows_keep_the_files_columns(tmp_path):
    path = str(tmp_path / "r.csv")
    curriculum.append_row(path, dict(stages="a", top1=1.0))
    curriculum.append_row(path, dict(stages="b", seed=3, top1=2.0))          # a column the file lacks: dropped
    curriculum.append_row(path, dict(top1=3.0))                              # a column it lacks: empty
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["stages", "top1"], ["a", "1.0"], ["b", "2.0"], ["", "3.0"]]
