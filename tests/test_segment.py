"""segment.py: its U-Net's shapes, Dice/IoU and the
connected-component post-processing against hand computations, a tiny training run end to end
(checkpoints, log, an exact resume), predict's masks read back pixel-exact through data.py's
--masks, and bad input stopping with one line that names the file."""
import csv
import json
import os
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

import data
import segment
from make_xray_dicoms import write_dicom

TINY = ["--img-size", "32", "--width", "4", "--depth", "2", "--batch-size", "4", "--epochs", "2", "--val-count", "3",
        "--warmup-epochs", "0.5", "--device", "cpu", "--precision", "fp32", "--num-workers", "1"]


def radiograph(h, w, seed):
    """A dark pair of 'lungs' in a bright 'body' on black, uint8 (h, w), and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    body = (xx - 0.5) ** 2 / 0.2 + (yy - 0.55) ** 2 / 0.25 < 1
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    lungs = ((xx - 0.32 - dx) ** 2 / 0.018 + (yy - 0.5 - dy) ** 2 / 0.08 < 1) | \
            ((xx - 0.68 - dx) ** 2 / 0.016 + (yy - 0.5 - dy) ** 2 / 0.07 < 1)
    img = np.where(lungs, 70, np.where(body, 190, 5)) + rng.integers(-20, 21, (h, w))
    return img.clip(0, 255).astype(np.uint8), (lungs * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    """PNG radiographs 40 wide x 30 high with masks (one radiograph filed twice), the same as
    DICOMs (every other one MONOCHROME1, one portrait), and a trained tiny U-Net."""
    d = tmp_path_factory.mktemp("cxr")
    for sub in ("png", "masks", "dcm"):
        os.makedirs(d / sub)
    for k in range(15):
        img, mask = radiograph(40 if k == 14 else 30, 30 if k == 14 else 40, 0 if k == 13 else k)  # 14: portrait
        if k < 14:                                 # k=13 repeats k=0's pixels: the twin
            Image.fromarray(img).save(d / "png" / f"im{k:02d}.png")
            Image.fromarray(mask).save(d / "masks" / f"im{k:02d}.png")
        write_dicom(d / "dcm" / f"im{k:02d}.dcm", 255 - img if k % 2 else img,
                    photometric="MONOCHROME1" if k % 2 else "MONOCHROME2")
    out = d / "run"
    segment.main(segment.get_args(["train", "--data-dir", str(d / "png"), "--masks", str(d / "masks"),
                                   "--output-dir", str(out), "--cache-dir", str(d / "cache")] + TINY))
    return dict(dir=d, png=str(d / "png"), masks=str(d / "masks"), dcm=str(d / "dcm"), run=out)


# ----------------------------------------------------------------------------- the U-Net, Dice, components

@pytest.mark.parametrize("shape,depth", [((37, 50), 3), ((16, 16), 2), ((5, 3), 4)])
def test_unet_output_shape_any_size(shape, depth):
    net = segment.UNet(in_chans=1, width=4, depth=depth)
    x = torch.randn(2, 1, *shape, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 1, *shape)
    y.sum().backward()                                 # the padding is differentiable, every pixel gets a gradient
    assert x.grad.abs().min() > 0
    assert segment.UNet(**net.config()).load_state_dict(net.state_dict())


def test_dice_iou_by_hand():
    pred, true = torch.zeros(3, 4, 4, dtype=torch.bool), torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, 0, :4] = True                              # 4 pixels
    true[0, 0, 1:4], true[0, 1, :3] = True, True      # 6 pixels, 3 shared
    true[1, 2, 2] = True                               # image 1: nothing predicted
    dice, iou = segment.dice_iou(pred, true)            # image 2: both empty, a perfect 1
    assert torch.allclose(dice, torch.tensor([2 * 3 / (4 + 6), 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(iou, torch.tensor([3 / (4 + 6 - 3), 0.0, 1.0], dtype=torch.float64))


def test_seg_loss_small_when_right():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    good, _ = segment.seg_loss((target * 2 - 1) * 20, target)
    bad, parts = segment.seg_loss((1 - target * 2) * 20, target)
    assert good < 0.05 < 1.0 < bad and set(parts) == {"dice_loss", "bce"}


def flood_fill(m, conn):
    """Reference labelling: component areas by breadth-first search."""
    seen, areas = np.zeros_like(m, bool), []
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if conn == 8 else [])
    for start in zip(*np.nonzero(m)):
        if seen[start]:
            continue
        seen[start], queue, n = True, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            n += 1
            for dy, dx in steps:
                v = (y + dy, x + dx)
                if 0 <= v[0] < m.shape[0] and 0 <= v[1] < m.shape[1] and m[v] and not seen[v]:
                    seen[v] = True
                    queue.append(v)
        areas.append(n)
    return sorted(areas, reverse=True)


def test_components_keep_two_lungs_fill_hole():
    m = np.zeros((30, 40), bool)
    m[3:25, 4:16] = True                               # left lung, 22 x 12
    m[4:24, 22:33] = True                              # right lung, 20 x 11, with a 3 x 2 hole
    m[10:13, 26:28] = False
    m[27:29, 36:38] = True                             # a stray blob, 2 x 2
    m[25, 16] = True                                   # touches the left lung at a corner only: 8-connected
    labels, areas = segment.label_components(m)
    assert areas.tolist() == [22 * 12 + 1, 20 * 11 - 6, 4] and labels.max() == 3
    assert segment.label_components(m, connectivity=4)[1].tolist() == [22 * 12, 20 * 11 - 6, 4, 1]
    filled = segment.fill_holes(m)
    assert filled[4:24, 22:33].all() and (filled ^ m).sum() == 6
    kept = segment.postprocess(m, k=2)                 # the two largest, holes filled
    assert not kept[27:29, 36:38].any() and kept[3:25, 4:16].all() and kept[25, 16] and kept[4:24, 22:33].all()
    assert not segment.fill_holes(np.pad(np.ones((3, 3), bool), 1) ^ np.pad(np.ones((1, 1), bool), 2))[0].any()
    # against flood fill on random masks, both connectivities
    rng = np.random.default_rng(0)
    for _ in range(40):
        r = rng.random(tuple(rng.integers(1, 14, 2))) < rng.random()
        for conn in (4, 8):
            labels, areas = segment.label_components(r, conn)
            assert areas.tolist() == flood_fill(r, conn)
            assert ((labels > 0) == r).all()
            assert [int((labels == i + 1).sum()) for i in range(len(areas))] == areas.tolist()


def test_judge_flags_one_lung_areas_and_shapes_unlike_the_training_masks():
    args = segment.get_args(["predict", "--checkpoint", "x.pt", "--data-dir", "x"])
    two = np.zeros((20, 20), bool)
    two[2:18, 2:8], two[2:18, 11:17] = True, True
    prob = np.where(two, 0.95, 0.05)
    assert segment.judge(two, prob, 0.01, None, args) == dict(lung_fraction=0.48, confidence=0.95, components=2,
                                                                doubt=0.01, shape="", flag="")
    # the shape score: 1 - Dice with the closest training shape, whatever the mask's size and place
    blob = np.zeros((20, 20), bool)
    blob[5:15, 5:15] = True
    shapes = torch.stack([segment.shape_code(blob), segment.shape_code(two)])   # the closest counts
    big = np.zeros((60, 50), bool)
    big[10:50, 5:20], big[10:50, 27:42] = True, True   # the same two lungs, larger, elsewhere
    assert segment.judge(big, np.where(big, 0.95, 0.05), 0.0, shapes, args)["shape"] == 0.0
    cut = two.copy()
    cut[10:, 2:8] = False                              # the left lung stops halfway down: half the box empty
    code = segment.shape_code(cut)
    expected = 1 - 2 * (code & shapes[1]).sum().item() / (code.sum() + shapes[1].sum()).item()
    assert expected > args.max_shape and segment.judge(cut, prob, 0.0, shapes, args)["shape"] == round(expected, 4)
    assert segment.judge(cut, prob, 0.0, shapes, args)["flag"] == "odd shape"
    assert segment.judge(two, prob, args.max_doubt + 0.01, shapes, args)["flag"] == "doubtful"
    one = two.copy()
    one[:, 10:] = False
    assert segment.judge(one, prob, 0.0, None, args)["flag"] == "one lung"
    assert segment.judge(np.zeros((20, 20), bool), prob, 0.0, shapes, args)["flag"] == "empty"    # said once
    assert segment.judge(np.ones((20, 20), bool), np.full((20, 20), 0.6), 0.0, None, args)["flag"] == \
        "one lung;large;unsure"


def test_views_undo_and_convex_hulls_fill_only_the_notches():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 20:44, 16:40] = 1
    for view in segment.VIEWS:                       # warped and back: the same square, up to the interpolation
        back = segment.warp(segment.warp(x, *view), *view, back=True)
        assert (back > 0.5).sum() == x.sum() and ((back > 0.5) == (x > 0.5)).all(), view
    m = np.zeros((20, 30), bool)
    m[2:18, 3:10], m[8:12, 6:10] = True, False      # a lung with a notch on its inner side
    m[2:18, 15:25], m[2:5, 15:18] = True, False     # and one with a corner cut
    h = segment.convex_hulls(m)
    assert (h >= m).all() and h[8:12, 6:10].all() and h[2:5, 15:18].sum() == 3 and h.sum() == m.sum() + 16 + 3


# ----------------------------------------------------------------------------- segment.py train

def test_split_keeps_identical_images_together():
    x = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8)
    x[7] = x[3]
    x[12] = x[3]
    for seed in range(20):
        tr, va, dups = segment.split_by_radiograph(x, 5, seed)
        assert dups == 2 and sorted(tr + va) == list(range(20)) and len(va) >= 5
        assert len({3, 7, 12} & set(va)) in (0, 3)


def test_augment_moves_image_and_mask_together():
    args = segment.get_args(["train", "--data-dir", "x", "--masks", "y", "--rotate", "10"])
    x = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 8:24, 6:20] = 200
    m = (x > 0).to(torch.uint8)
    torch.manual_seed(0)
    img, mask = segment.augment(x, m, args, (0.0,), (1.0,))
    assert img.shape == mask.shape == (4, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(mask, m.float())            # moved ...
    inside = img[mask.bool()].mean() - img[~mask.bool()].mean()
    assert inside > 0.5                                # ... and the bright square still under its mask


def test_opacify_brightens_inside_the_body_only_and_each_kind_where_it_says():
    img = torch.full((8, 1, 32, 32), 0.2)
    within = torch.zeros_like(img, dtype=torch.bool)
    within[..., 4:28, 4:28] = True                             # the body; the rest is padding
    mask = torch.zeros_like(img)
    mask[..., 8:24, 6:14] = mask[..., 8:24, 18:26] = 1
    torch.manual_seed(0)
    assert torch.equal(segment.opacify(img, mask, 0.0, within=within), img)            # p = 0: untouched
    out = segment.opacify(img, mask, 1.0, within=within)
    assert torch.equal(out[~within], img[~within])             # the padding stays as it was
    assert (out >= img - 1e-6).all() and out.max() <= 1        # toward a brighter level, never past white
    assert ((out - img).flatten(1).amax(1) > 0.05).all()        # p = 1: every image opacified
    band = segment.opacify(img, mask, 1.0, ("band",), within=within) - img
    assert band[..., 24:28, :].mean() > 2 * band[..., 4:8, :].mean()                    # the chest's lower part
    side = segment.opacify(img, mask, 1.0, ("side",), within=within) - img
    assert ((side[..., 4:10].mean((1, 2, 3)) - side[..., 22:28].mean((1, 2, 3))).abs() > 0.05).all()  # one side
    torch.manual_seed(1)
    a = segment.opacify(img, mask, 0.5)
    torch.manual_seed(1)
    assert torch.equal(a, segment.opacify(img, mask, 0.5))     # the seed decides: a run resumes exactly


def test_equalize_spreads_each_image_over_the_range_and_keeps_the_padding_black():
    x = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    x[0, 0, 2:14, 2:14] = (torch.arange(144).view(12, 12) // 4 + 125).to(torch.uint8)    # a dull image: 125..160
    x[1, 0, 2:14, 2:14] = (torch.arange(144).view(12, 12) + 50).to(torch.uint8)
    y = segment.equalize(x)
    assert (y[x == 0] == 0).all()
    for i in range(2):
        v, order = y[i][x[i] > 0], x[i][x[i] > 0].argsort(stable=True)
        assert v.max() == 255 and v.min() < 20                 # the whole range, whatever the input's
        assert (v[order].diff() >= 0).all()                    # brighter stays brighter


def test_train_writes_checkpoints_and_log(cxr):
    run = cxr["run"]
    assert {"ckpt.pt", "best.pt", "log.jsonl", "args.json"} <= set(os.listdir(run))
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["dice_p10"] <= r["dice"] <= 1 and 0 <= r["iou"] <= 1 for r in rows)
    ckpt = torch.load(run / "best.pt", weights_only=True)   # a plain dict: no pickled objects
    assert ckpt["unet_config"] == dict(in_chans=1, width=4, depth=2) and ckpt["data"]["img_size"] == 32
    assert ckpt["data"]["equalize"] and ckpt["args"]["opacity"] == 0.5   # the defaults; predict equalises too
    assert ckpt["args"]["mode"] == "train" and ckpt["best"] == max(r["dice"] for r in rows)
    assert len(ckpt["val_ids"]) in (3, 4)             # 4 when the twins cross the count together
    net = segment.UNet(**ckpt["unet_config"])
    net.load_state_dict(ckpt["model"])
    assert ("im00" in ckpt["val_ids"]) == ("im13" in ckpt["val_ids"])   # the twins on one side
    # the training masks' shape codes, for predict's shape score: of the training split only
    train_ids = sorted(set(f"im{k:02d}" for k in range(14)) - set(ckpt["val_ids"]))
    assert ckpt["shapes"].dtype == torch.bool and ckpt["shapes"].shape == (2 * len(train_ids), 32 * 32)
    mirrored = ckpt["shapes"].view(-1, 2, 32, 32)         # each mask, then its mirror image
    assert torch.equal(mirrored[:, 1], mirrored[:, 0].flip(-1)) and not torch.equal(mirrored[:, 1], mirrored[:, 0])
    lungs = segment.shape_code(np.asarray(Image.open(os.path.join(cxr["masks"], train_ids[0] + ".png"))) > 0)
    closest = lambda code: segment.dice_iou(ckpt["shapes"], code.expand_as(ckpt["shapes"]))[0].max()
    assert closest(lungs) > 0.9 > closest(segment.shape_code(np.ones((30, 40), bool)))   # a box is no lung pair


def test_train_resumes_exactly(cxr, tmp_path):
    argv = ["train", "--data-dir", cxr["png"], "--masks", cxr["masks"], "--output-dir", str(tmp_path),
            "--cache-dir", str(cxr["dir"] / "cache")] + TINY
    straight = torch.load(cxr["run"] / "ckpt.pt", weights_only=True)
    out = segment.main(segment.get_args(argv + ["--max-steps", "3", "--save-every", "0"]))   # saved every step,
    # stopped in the second epoch
    assert out["step"] == 3 < straight["step"] and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    out = segment.main(segment.get_args(argv))         # picks up ckpt.pt by itself
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert out["step"] == resumed["step"] == straight["step"]
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


# ----------------------------------------------------------------------------- segment.py predict

@pytest.mark.parametrize("h,w", [(30, 40), (40, 30), (31, 40), (40, 27), (7, 40)])
def test_unfit_square_inverts_fit_square(h, w):
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 3) ** 2 < 1).astype(np.float32)
    S = max(h, w)                                      # no resize: only the crop, exact
    back = segment.unfit_square(torch.from_numpy(data.fit_square(m, S, nearest=True)).float() / 255, h, w)
    assert back.shape == (h, w) and np.array_equal(back.numpy() > 0.5, m > 0)
    back = segment.unfit_square(torch.from_numpy(data.fit_square(m, 24, nearest=True)).float() / 255, h, w)
    assert segment.dice_iou(torch.from_numpy(back.numpy() > 0.5)[None], torch.from_numpy(m > 0)[None])[0] > 0.85


def test_predict_masks_read_back_by_data_py(cxr, tmp_path):
    out = tmp_path / "masks"
    res = segment.main(segment.get_args(["predict", "--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir",
                                         cxr["dcm"], "--output-dir", str(out), "--device", "cpu", "--grid", "4"]))
    ids = sorted(f"im{k:02d}" for k in range(15))
    assert sorted(r["id"] for r in res["rows"]) == ids and (out / "overlay.png").exists()
    masks = {i: np.asarray(Image.open(out / f"{i}.png")) for i in ids}
    for i, m in masks.items():                         # 0/255 at the image's own size
        assert m.shape == ((40, 30) if i == "im14" else (30, 40))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert sum(m.any() for m in masks.values()) >= 10  # not a trivially empty read-back
    rows = list(csv.DictReader(open(out / "masks.csv")))
    assert [r["id"] for r in rows] == ids and set(rows[0]) >= {"lung_fraction", "confidence", "components", "flag"}
    shapes = torch.load(cxr["run"] / "best.pt", weights_only=True)["shapes"]   # each written mask's shape score
    for r in rows:
        code = segment.shape_code(masks[r["id"]] > 0)
        assert float(r["shape"]) == round(1 - segment.dice_iou(shapes, code.expand_as(shapes))[0].max().item(), 4)
    # data.py's --masks reads them back pixel-exact (fitted to its img_size as every mask is)
    ds = data.build_dataset("dicom", data_dir=cxr["dcm"], img_size=32, masks=str(out), split_fractions=(1, 0, 0),
                            cache_dir=str(tmp_path / "cache"), num_workers=1)
    for i, mask in zip(ds.ids, ds.masks):
        want = data.fit_square(np.asarray(Image.open(out / f"{i}.png")) / 255.0, 32, nearest=True) > 0
        assert np.array_equal(mask[0].numpy() > 0, want)


# ----------------------------------------------------------------------------- bad input: one line, naming the file

def test_predict_with_labels_and_reference_writes_dice_per_label(cxr, tmp_path):
    """--labels groups the Dice against --reference per label in dice.csv (a finding, a source): each group's numbers
    are those of its masks.csv rows, and "all" is every scored mask."""
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("id,label\n" + "".join(f"im{k:02d},{'sick' if k % 3 == 0 else 'clean'}\n" for k in range(14)))
    out = tmp_path / "masks"
    segment.main(segment.get_args(["predict", "--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", cxr["png"],
                                   "--output-dir", str(out), "--device", "cpu", "--reference", cxr["masks"],
                                   "--labels", str(tmp_path / "labels.csv")]))
    rows = list(csv.DictReader(open(out / "masks.csv")))
    assert {r["id"]: r["label"] for r in rows} == {f"im{k:02d}": "sick" if k % 3 == 0 else "clean" for k in range(14)}
    groups = {r["label"]: r for r in csv.DictReader(open(out / "dice.csv"))}
    assert set(groups) == {"all", "sick", "clean"} and int(groups["all"]["images"]) == 14
    for g in ("sick", "clean"):
        dice = [float(r["dice"]) for r in rows if r["label"] == g]
        assert int(groups[g]["images"]) == len(dice) == (5 if g == "sick" else 9)
        assert float(groups[g]["dice_mean"]) == pytest.approx(np.mean(dice), abs=1e-4)
        assert float(groups[g]["dice_min"]) == pytest.approx(min(dice), abs=1e-4)
        assert int(groups[g]["flagged"]) == sum(bool(r["flag"]) for r in rows if r["label"] == g)


def test_labels_named_all_or_missing_and_a_reference_that_matches_nothing(cxr, tmp_path, capsys):
    """A label called "all" gets its own row after the overall one (it once appended to the list it iterated: a hang);
    ids missing from --labels go to "(no label)" and are counted aloud; the CSV's own column names are flags, and
    its split column, which predict does not use, is not checked; a --reference without one matching mask says so."""
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("image;finding;split\n" + "".join(f"im{k:02d}.dcm;{'all' if k < 4 else 'clean'};training\n"
                                                  for k in range(10)))
    predict = lambda out, *a: segment.main(segment.get_args(
        ["predict", "--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", cxr["png"], "--output-dir",
         str(tmp_path / out), "--device", "cpu", "--tta", "0", *a]))
    predict("a", "--reference", cxr["masks"], "--labels", str(tmp_path / "labels.csv"), "--id-column", "image",
            "--label-column", "finding")
    assert "4 of 14 images have no row in --labels" in capsys.readouterr().out
    groups = [(r["label"], int(r["images"])) for r in csv.DictReader(open(tmp_path / "a" / "dice.csv"))]
    assert groups == [("all", 14), ("(no label)", 4), ("all", 4), ("clean", 6)]
    with pytest.raises(SystemExit, match=r"error: .*labels\.csv has no column 'id'.*--id-column"):
        predict("b", "--labels", str(tmp_path / "labels.csv"))
    os.makedirs(tmp_path / "other")
    predict("c", "--reference", str(tmp_path / "other"))
    assert "no mask in --reference" in capsys.readouterr().out and not (tmp_path / "c" / "dice.csv").exists()


def test_hull_fills_the_written_masks_but_masks_csv_judges_the_network_s_own(cxr, tmp_path):
    run = lambda out, *a: segment.main(segment.get_args(["predict", "--checkpoint", str(cxr["run"] / "best.pt"),
                                                         "--data-dir", cxr["png"], "--output-dir", str(tmp_path / out),
                                                         "--device", "cpu", *a]))["rows"]
    plain, hull = run("plain"), run("hull", "--hull")
    assert plain == hull                               # the same scores, flags and fractions
    grew = 0
    for r in plain:
        a, b = (np.asarray(Image.open(tmp_path / d / f"{r['id']}.png")) > 0 for d in ("plain", "hull"))
        assert not (a & ~b).any()                      # the hull only adds
        grew += int(b.sum() > a.sum())
    assert grew > 0


def test_a_checkpoint_without_training_shapes_predicts_with_no_shape_score(cxr, tmp_path, capsys):
    ckpt = torch.load(cxr["run"] / "best.pt", weights_only=True)
    del ckpt["shapes"]                                 # as written before the shape codes were kept
    torch.save(ckpt, tmp_path / "old.pt")
    res = segment.main(segment.get_args(["predict", "--checkpoint", str(tmp_path / "old.pt"), "--data-dir", cxr["png"],
                                         "--output-dir", str(tmp_path / "masks"), "--device", "cpu", "--grid", "0"]))
    assert "holds no training shapes" in capsys.readouterr().out
    assert res["rows"] and all(r["shape"] == "" and "odd shape" not in r["flag"] for r in res["rows"])


def test_resume_refuses_a_checkpoint_trained_with_other_settings(cxr, tmp_path):
    """A finished run rerun with a changed flag (or after a default changed) stops with one line instead of
    continuing, or silently keeping, a model trained otherwise; flags that only say where and how fast it runs
    (--device, --num-workers, --save-every) do not count."""
    argv = ["train", "--data-dir", cxr["png"], "--masks", cxr["masks"], "--output-dir", str(tmp_path),
            "--cache-dir", str(cxr["dir"] / "cache")] + TINY
    segment.main(segment.get_args(argv + ["--max-steps", "2"]))
    with pytest.raises(SystemExit, match=r"error: .*ckpt\.pt was trained with other settings \({'scale': \(0\.25, "
                                         r"0\.1\)"):
        segment.main(segment.get_args(argv + ["--scale", "0.1"]))
    out = segment.main(segment.get_args(argv + ["--num-workers", "2", "--save-every", "5"]))
    assert out["step"] == torch.load(cxr["run"] / "ckpt.pt", weights_only=True)["step"]


def test_bad_input_names_the_file(cxr, tmp_path):
    d = tmp_path
    os.makedirs(d / "imgs"), os.makedirs(d / "masks"), os.makedirs(d / "empty")
    for k in range(3):
        img, mask = radiograph(30, 40, k)
        Image.fromarray(img).save(d / "imgs" / f"a{k}.png")
        if k != 1:
            Image.fromarray(mask).save(d / "masks" / f"a{k}.png")
    flags = ["--masks", str(d / "masks"), "--output-dir", str(d / "run"), "--cache-dir", str(d / "cache")] + TINY
    train = lambda *a: segment.main(segment.get_args(["train"] + flags + list(a)))
    with pytest.raises(SystemExit, match=r"error: .*a1\.png: no mask a1\.png"):           # an image without a mask
        train("--data-dir", str(d / "imgs"))
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(d / "masks" / "a1.png")
    with pytest.raises(SystemExit, match=r"error: .*a1\.png.* is 40x20 but the image is 40x30"):   # another size
        train("--data-dir", str(d / "imgs"))
    with pytest.raises(SystemExit, match=r"error: no \.dcm .*empty"):                      # no images at all
        train("--data-dir", str(d / "empty"))
    with pytest.raises(SystemExit, match="2"):                                             # no --masks: usage error
        segment.get_args(["train", "--data-dir", str(d / "imgs")])
    predict = lambda *a: segment.main(segment.get_args(["predict", "--device", "cpu", "--output-dir",
                                                        str(d / "out")] + list(a)))
    with pytest.raises(SystemExit, match=r"error: no \.dcm .*empty"):
        predict("--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", str(d / "empty"))
    with pytest.raises(SystemExit, match=r"error: --labels .*nolabels\.csv: no such file"):
        predict("--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", str(d / "imgs"), "--labels",
                str(d / "nolabels.csv"))
    (d / "notckpt.pt").write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=r"error: .*notckpt\.pt is not a readable"):
        predict("--checkpoint", str(d / "notckpt.pt"), "--data-dir", str(d / "imgs"))
    (d / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SystemExit, match=r"error: .*broken\.png: unreadable image"):
        predict("--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", str(d / "imgs"))
    res = predict("--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", str(d / "imgs"), "--skip-bad")
    assert len(res["rows"]) == 3 and "broken.png" in res["bad"][0]


# ----------------------------------------------------------------------------- the whole pipeline

def test_dicoms_without_masks_to_segmented_training_and_ail(cxr, tmp_path):
    """The thesis' pipeline on a DICOM folder that has no masks: segment.py predict writes them,
    finetune.py trains on the lungs on black (--masks, --variant seg-black) and cam.py measures AIL
    over the same predicted masks."""
    import cam
    import finetune
    masks = tmp_path / "masks"
    segment.main(segment.get_args(["predict", "--checkpoint", str(cxr["run"] / "best.pt"), "--data-dir", cxr["dcm"],
                                   "--output-dir", str(masks), "--device", "cpu"]))
    labels = tmp_path / "labels.csv"                 # portrait or not: any label will do for the plumbing
    labels.write_text("id,label\n" + "".join(f"im{k:02d},{'a' if k % 2 else 'b'}\n" for k in range(15)))
    xray = ["--dataset", "dicom", "--data-dir", cxr["dcm"], "--labels", str(labels), "--masks", str(masks),
            "--split-fractions", "0.6,0.2,0.2", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    finetune.main(finetune.get_args(xray + ["--variant", "seg-black", "--model", "vit_nano", "--img-size", "16",
                                            "--patch-size", "4", "--batch-size", "4", "--epochs", "2", "--mixup", "0",
                                            "--cutmix", "0", "--randaug-n", "0", "--output-dir", str(tmp_path / "ft")]))
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["variant"] == "seg-black" and ckpt["args"]["masks"] == str(masks)
    summary = cam.main(cam.get_args(xray + ["--checkpoint", str(tmp_path / "ft" / "ckpt.pt"), "--method", "gradcam",
                                            "--output-dir", str(tmp_path / "cam")]))
    s = summary[0]
    assert s["variant"] == "seg-black" and s["n"] >= 2 and 0 < s["lung_area"] < 100
    assert s["n_all"] + s["zero_maps"] == s["n"]     # every image has an AIL, or a map that is zero everywhere
