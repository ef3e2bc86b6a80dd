"""cam.py: CAM, Grad-CAM, ViT attention maps, AIL, hooks, and the command line end to end."""
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cam
from models import MODELS, ViT


class GapNet(nn.Module):
    """conv -> ReLU -> (optional spatial gate) -> global average pool -> linear: the CAM network."""

    def __init__(self, in_chans=3, width=8, classes=3, gate=None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.register_buffer("gate", gate if gate is not None else torch.ones(1, 1, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x) * self.gate).flatten(1))


class GatedViT(nn.Module):
    """A ViT whose class score reads only the patch tokens where gate (grid) is 1: the final tokens
    are multiplied by the gate (the class token by 0) and averaged into a linear head."""

    def __init__(self, gate, img_size=16, patch_size=4, classes=3):
        super().__init__()
        self.vit = ViT(img_size=img_size, patch_size=patch_size, **MODELS["vit_nano"])
        self.patch_size = patch_size
        self.register_buffer("token_gate", torch.cat([torch.zeros(1), gate.flatten().float()])[None, :, None])
        self.gate = nn.Identity()                      # the layer whose output the maps are taken from
        self.head = nn.Linear(self.vit.embed_dim, classes)

    def forward(self, x):
        z = self.gate(self.vit.forward_features(x) * self.token_gate)       # (B, 1 + N, D)
        return self.head(z[:, 1:].mean(dim=1))


def count_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def quadrant_mass(maps, size):
    """Fraction of each map's mass in the top-left quadrant after resizing to the image."""
    m = cam.resize_map(maps, (size, size))
    return m[:, :size // 2, :size // 2].sum(dim=(1, 2)) / m.sum(dim=(1, 2))


def test_gradcam_equals_cam_up_to_positive_scale():
    torch.manual_seed(0)
    model, x = GapNet(), torch.randn(4, 3, 12, 12)
    for target in ("pred", "1"):
        c, logits, cls, _ = cam.class_map(model, x, "cam", target)
        g, logits_g, cls_g, _ = cam.class_map(model, x, "gradcam", target)
        assert torch.equal(cls, cls_g) and torch.allclose(logits, logits_g)
        assert (c.flatten(1).amax(1) > 0).all()
        # alpha_k = w_ck / (h w): Grad-CAM = CAM / (h w), image by image
        torch.testing.assert_close(g * 12 * 12, c, rtol=1e-4, atol=1e-5)
        ratio = (g.flatten(1) * 144 / c.flatten(1).clamp_min(1e-12))[c.flatten(1) > 1e-3]
        assert ratio.min() > 0.999 and ratio.max() < 1.001


def test_cnn_cam_mass_in_the_quadrant_the_score_reads():
    torch.manual_seed(0)
    gate = torch.zeros(1, 1, 16, 16)
    gate[..., :8, :8] = 1
    model, x = GapNet(gate=gate), torch.rand(6, 3, 16, 16)
    for method in ("cam", "gradcam"):
        maps = cam.class_map(model, x, method)[0]
        assert maps.shape == (6, 16, 16)
        torch.testing.assert_close(quadrant_mass(maps, 16), torch.ones(6))  # maps at the image's resolution
        assert maps[:, 8:].abs().max() == 0 and maps[:, :, 8:].abs().max() == 0


def test_vit_gradcam_mass_in_the_quadrant_and_class_token_excluded():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    # the top-left quadrant of the 4x4 grid: the mass after resizing to the image
    quad = torch.zeros(4, 4)
    quad[:2, :2] = 1
    model = GatedViT(quad)
    maps = cam.class_map(model, x, "gradcam", layer=(model.gate, "out"))[0]
    assert maps.shape == (4, 4, 4)
    live = maps.flatten(1).sum(1) > 0                   # a ReLU'd map can be zero everywhere
    assert live.sum() >= 2
    torch.testing.assert_close(quadrant_mass(maps[live], 4), torch.ones(int(live.sum())))
    assert (quadrant_mass(maps[live], 16) > 0.75).all()    # after resizing: bilinear bleeds half a patch
    # an asymmetric gate (row 0, columns 0-2) is found exactly where it is: an off-by-one around
    # the class token or a transposed reshape would put mass elsewhere on the grid
    row = torch.zeros(4, 4)
    row[0, :3] = 1
    model = GatedViT(row)
    maps = cam.class_map(model, x, "gradcam", "0", layer=(model.gate, "out"))[0]
    assert maps[:, 1:].abs().max() == 0 and maps[:, :, 3].abs().max() == 0
    assert (maps[:, 0, :3].sum(dim=1) > 0).all()


def test_vit_default_layer_and_attention_maps():
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=2, num_classes=3, **MODELS["vit_nano"])     # a 16x16 grid
    x = torch.randn(2, 3, 32, 32)
    maps, logits, cls, heads = cam.class_map(vit, x, "gradcam")
    assert heads is None                                                  # only attention has per-head maps
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all() and (maps >= 0).all()
    assert (maps.flatten(1).sum(1) > 0).all()             # a class-token head still gets a gradient there
    mean, logits, cls, heads = cam.class_map(vit, x, "attention")
    assert heads.shape == (2, 2, 16, 16) and mean.shape == (2, 16, 16)
    torch.testing.assert_close(mean, heads.mean(dim=1))
    attn = vit.get_last_selfattention(x)[:, :, 0]                         # rows of a softmax
    torch.testing.assert_close(heads.flatten(2).sum(-1) + attn[:, :, 0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="gradcam"):
        cam.class_map(vit, x, "cam", layer=(vit.blocks[-1], "out"))        # CAM is for GAP + linear CNNs


def test_target_true_and_index():
    torch.manual_seed(0)
    model, x, y = GapNet(), torch.randn(3, 3, 8, 8), torch.tensor([2, 0, 1])
    assert torch.equal(cam.class_map(model, x, "gradcam", "true", y)[2], y)
    assert (cam.class_map(model, x, "cam", "2")[2] == 2).all()
    with pytest.raises(ValueError):
        cam.class_map(model, x, "cam", "7")


def test_hooks_removed_and_no_parameter_gradients():
    torch.manual_seed(0)
    cnn, vit = GapNet(), ViT(img_size=16, patch_size=4, num_classes=3, **MODELS["vit_nano"])
    cnn.train()
    before = count_hooks(cnn), count_hooks(vit)
    for _ in range(3):
        cam.class_map(cnn, torch.randn(2, 3, 8, 8), "cam")
        cam.class_map(cnn, torch.randn(2, 3, 8, 8), "gradcam")
        cam.class_map(vit, torch.randn(2, 3, 16, 16), "gradcam")
        cam.class_map(vit, torch.randn(2, 3, 16, 16), "attention")
        with pytest.raises(ValueError):                                      # hooks go on an error too
            cam.class_map(cnn, torch.randn(2, 3, 8, 8), "gradcam", "9")
    assert (count_hooks(cnn), count_hooks(vit)) == before == (0, 0)
    assert all(p.grad is None for p in list(cnn.parameters()) + list(vit.parameters()))
    assert cnn.training and vit.training                                     # mode restored


def test_ail_exact_fraction_and_bounds():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 20, 24, generator=g)
    masks = (torch.rand(5, 1, 20, 24, generator=g) > 0.6).to(torch.uint8)
    want = (maps * masks[:, 0]).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
    torch.testing.assert_close(cam.ail(maps, masks), want)
    # ReLU first: negative values never count (and never cancel positive ones)
    torch.testing.assert_close(cam.ail(maps - 2 * (maps < 0.3), masks),
                               (F.relu(maps - 2 * (maps < 0.3)) * masks[:, 0]).sum((1, 2))
                               / F.relu(maps - 2 * (maps < 0.3)).sum((1, 2)))
    small = torch.rand(5, 5, 6, generator=g)                                 # resized to the mask's size
    assert torch.allclose(cam.ail(small, torch.ones(5, 1, 20, 24, dtype=torch.uint8)), torch.ones(5))
    outside = torch.zeros(2, 4, 4)
    outside[:, :, 2:] = 1                                                    # right half of a 4x4 map
    left = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    left[..., :6] = 1                                                        # bilinear bleed stops at column 6
    assert (cam.ail(outside, left) == 0).all()
    assert torch.isnan(cam.ail(torch.zeros(1, 4, 4), left[:1])).all()


def test_ail_resizes_maps_and_masks_consistently():
    # non-square, three different sizes: map (4, 6), mask (8, 12), image (16, 24)
    maps = torch.zeros(1, 4, 6)
    maps[0, 0, 0] = 1.0                                                      # top-left corner only
    tl = torch.zeros(1, 1, 8, 12, dtype=torch.uint8)
    tl[..., :4, :6] = 1                                                      # top-left quadrant
    for flip, expect_high in (((), True), ((-1,), False), ((-2,), False), ((-2, -1), False)):
        mask = tl.flip(flip) if flip else tl
        a = cam.ail(maps, mask, size=(16, 24)).item()
        assert (a > 0.99) if expect_high else (a < 0.01), (flip, a)
    # mask and complement always add up to 1, at any size
    g = torch.Generator().manual_seed(1)
    m, k = torch.rand(3, 7, 5, generator=g), (torch.rand(3, 1, 9, 13, generator=g) > 0.5).to(torch.uint8)
    torch.testing.assert_close(cam.ail(m, k, (18, 26)) + cam.ail(m, 1 - k, (18, 26)), torch.ones(3))
    # the same as resizing by hand: bilinear map, nearest mask
    big = F.interpolate(m[:, None], size=(18, 26), mode="bilinear", align_corners=False)[:, 0]
    km = F.interpolate(k.float(), size=(18, 26), mode="nearest-exact")[:, 0]
    torch.testing.assert_close(cam.ail(m, k, (18, 26)), (big * km).sum((1, 2)) / big.sum((1, 2)))


def test_colormap_and_panel(tmp_path):
    c = cam.colormap(np.linspace(0, 1, 5)[None])
    assert c.shape == (1, 5, 3) and c.dtype == np.uint8
    assert tuple(c[0, 0]) == (0, 0, 128) and tuple(c[0, -1]) == (128, 0, 0)     # dark blue -> dark red
    img = torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8)
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[4:12, 2:8] = 1
    im, hm, over = cam.tiles(img, torch.rand(16, 16), mask)
    assert im.shape == hm.shape == over.shape == (16, 16, 3)
    assert (over[4, 2:8] == 255).all() and (over[7, 5] != 255).any()          # outline, not the inside
    cam.save_panel(tmp_path / "p.png", [im, hm, over], "pred a | true b | AIL 50%", 64)
    from PIL import Image
    assert Image.open(tmp_path / "p.png").size == (192, 64 + 18)


def write_xrays(root, n=12, size=24):
    """PNG radiograph exports with masks and a labels CSV with a split column: class 1 images have
    a bright blob in the left lung region, class 0 none."""
    from PIL import Image
    os.makedirs(root / "images"), os.makedirs(root / "masks")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(40, 90, (size, size + 4)).astype(np.uint8)
        mask = np.zeros_like(img)
        mask[4:20, 3:11] = mask[4:20, 17:25] = 255
        if i % 2:
            img[8:14, 4:10] = 230
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        rows.append(dict(id=f"im{i}", label="blob" if i % 2 else "none", split="test" if i >= 8 else "train"))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "label", "split"])
        w.writeheader()
        w.writerows(rows)


def test_command_line_two_checkpoints_on_xrays(tmp_path):
    """Two classifier checkpoints in finetune.py's format (a ViT, and one that says it was trained
    on seg-black), PNG X-rays with masks: panels, grids, CSVs and the comparison table."""
    write_xrays(tmp_path / "xr")
    torch.manual_seed(0)
    paths = []
    for variant in ("full", "seg-black"):
        vit = ViT(img_size=16, patch_size=4, in_chans=1, num_classes=2, **MODELS["vit_nano"])
        d = tmp_path / variant
        d.mkdir()
        torch.save(dict(model=vit.state_dict(), encoder_config=vit.config(), num_classes=2, pool="cls",
                        data=dict(dataset="dicom", mean=[0.3], std=[0.2], classes=["blob", "none"]),
                        args=dict(variant=variant)), d / "ckpt.pt")
        paths += ["--checkpoint", str(d / "ckpt.pt")]
    out = tmp_path / "out"
    base = ["--dataset", "dicom", "--data-dir", str(tmp_path / "xr" / "images"), "--labels",
            str(tmp_path / "xr" / "labels.csv"), "--masks", str(tmp_path / "xr" / "masks"), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "3", "--grid", "3", "--panel-size", "96"]
    summ = cam.main(cam.get_args(base + paths + ["--method", "gradcam", "--output-dir", str(out)]))
    assert [s["model"] for s in summ] == ["full", "seg-black"] and [s["variant"] for s in summ] == ["full", "seg-black"]
    for s in summ:
        assert s["n"] == 4 and s["n_all"] + s["zero_maps"] == 4 and 0 <= s["ail_all_mean"] <= 100
        with open(out / s["model"] / "cam.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["id"] for r in rows] == ["im10", "im11", "im8", "im9"]       # file name order
        assert set(rows[0]) >= {"id", "true", "predicted", "score", "ail"}
        ails = np.array([float(r["ail"]) for r in rows])                    # nan: a map zero everywhere
        assert ((ails >= 0) & (ails <= 1)).sum() == s["n_all"] and np.isnan(ails).sum() == s["zero_maps"]
        assert len(os.listdir(out / s["model"] / "panels")) == 4 and (out / s["model"] / "grid.png").exists()
    assert "AIL % correct" in (out / "summary.md").read_text() and (out / "summary.csv").exists()
    assert (out / "compare.png").exists()
    # the attention maps of the same checkpoints, one panel per image with a tile per head
    summ = cam.main(cam.get_args(base + paths + ["--method", "attention", "--output-dir", str(out / "att"),
                                                 "--panels", "1"]))
    from PIL import Image
    assert Image.open(out / "att" / "full" / "panels" / "im10.png").size[0] == 96 * (3 + 2)     # 96 px tiles, 2 heads


def test_resnet_cam_at_layer4_equals_gradcam():
    """A torchvision ResNet from models.build_resnet: the default layer is the input of its average
    pool (layer4's output); CAM and Grad-CAM agree there up to the scale 1 / (h w)."""
    import models
    torch.manual_seed(0)
    net = models.build_resnet("resnet18", in_chans=1, img_size=16)
    net.fc = nn.Linear(net.out_dim, 2)
    net.train()                                     # class_map switches to eval (BN running stats) and back
    x = torch.randn(3, 1, 16, 16)
    assert cam.default_layer(net) == (net.avgpool, "in")
    c, _, cls, _ = cam.class_map(net, x, "cam")
    g, _, _, _ = cam.class_map(net, x, "gradcam")
    assert c.shape == (3, 2, 2)                     # 16 px, CIFAR stem: layer4 at 1/8
    torch.testing.assert_close(g * 4, c, rtol=1e-4, atol=1e-6)
    assert net.training and count_hooks(net) == 0
