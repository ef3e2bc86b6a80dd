"""Where does a classifier look? CAM, Grad-CAM and ViT attention maps, overlays, and AIL (the
fraction of the map's mass inside the lungs: thesis section 3.3.1, Table 4.15, Figs. C.1-C.8).

    python cam.py --checkpoint runs/finetune_synthetic_scratch_vit_micro/best.pt --device cpu
    python cam.py --dataset dicom --data-dir DCM --labels labels.csv --masks MASKS \\
        --checkpoint runs/full/ckpt.pt --checkpoint runs/seg/ckpt.pt --method gradcam --output-dir runs/cam
    python cam.py --checkpoint runs/curriculum/final.pt --method cam ...   # a ResNet (GAP + linear)

Methods:
  cam        CNNs with global average pooling + linear head: the head's weights of the target class
             over the feature maps the pool reads (Zhou et al. 2016).
  gradcam    any CNN or ViT: the gradient of the target logit, averaged per channel, weights the
             activations of the target layer; ReLU (Selvaraju et al. 2017). CNN: the feature maps
             entering the last global pool; ViT: the input of the last block's attention (its
             patch tokens reshaped to the patch grid, the class token left out).
  attention  ViTs: the class token's attention over the patches in the last block, per head and
             averaged, through the explicit attention path (the fused kernel never forms it).
The target class is the prediction (--target pred), the label (true) or a class index.

AIL = sum of the ReLU'd map inside the lung mask / its sum over the whole image, after resizing
the raw map (bilinear) to the image's resolution; maps are min-max normalised for display only.
Each checkpoint is evaluated on the variant (full / seg-black / seg-gray) it was trained on
unless --variant says otherwise; the lung masks are the same for all.

Writes to --output-dir, per model <name>/: panels/<id>.png (image | map | overlay, titled with
prediction, truth and AIL), grid.png (the first --grid images), cam.csv (one row per image);
and summary.csv / summary.md: AIL mean and std per model, over all, correct and incorrect images,
next to the lung area fraction (the AIL of a map spread evenly: the level that means "no preference");
with several checkpoints also compare.png, the same images side by side.
There are no training flags (--epochs, --compile, --precision): maps are computed in fp32,
uncompiled, so that hooks see the real modules.
"""
import argparse
import csv
import math
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models


def target_class(s):
    """--target: pred, true, or a class index (whether the model has that class is checked once it is loaded)."""
    try:
        return s if s in ("pred", "true") else str(data.NONNEG_INT(s))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{s} is not pred, true or a class index (an integer >= 0)") from None


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="classifier checkpoint (finetune.py, curriculum.py); repeat to compare models")
    p.add_argument("--name", action="append", default=None, help="one per --checkpoint (default: its folder)")
    p.add_argument("--method", default="gradcam", choices=["cam", "gradcam", "attention"])
    p.add_argument("--target", default="pred", type=target_class, help="pred (default), true, or a class index")
    p.add_argument("--layer", default=None, help="dotted module name whose output to use (default: see above)")
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--split", default="test")
    p.add_argument("--output-dir", default="runs/cam")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=data.POS_INT, default=64)
    p.add_argument("--img-size", type=data.POS_INT, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=data.SEED, default=0, help="seed of the dataset's split")
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4)
    p.add_argument("--max-images", type=data.NONNEG_INT, default=0, help="only the first N images of the split (0: "
                   "all)")
    p.add_argument("--panels", type=data.Number(int, "[-1, inf)"), default=-1, help="write panels for the first N "
                   "images (-1: all)")
    p.add_argument("--grid", type=data.NONNEG_INT, default=16, help="images in each model's grid.png")
    p.add_argument("--panel-size", type=data.Number(int, "[96, inf)"), default=192, help="pixels per tile in the "
                   "panels")
    data.add_data_args(p)
    p.set_defaults(variant=None)              # None: each checkpoint's own training variant
    data.finish_parser(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- maps

def default_layer(model):
    """(module, "in" | "out"): where the maps come from when --layer is not given.

    ViT (has blocks and a class token): the input of the last block's attention, i.e. the output
    of blocks[-1].norm1. The block's own output would not do for a class-token head: after the
    last attention nothing mixes tokens, so the patch tokens there get no gradient.
    CNN: the input of the last global average pool, i.e. exactly the maps the head sees (for
    ResNets the output of layer4); without such a pool, the output of the last Conv2d.
    """
    if hasattr(model, "blocks") and hasattr(model, "cls_token"):
        return model.blocks[-1].norm1, "out"
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if pools:
        return pools[-1], "in"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("no global pool and no Conv2d in the model: name a layer with --layer")
    return convs[-1], "out"


@contextmanager
def recording(module, where="out"):
    """Record the input ("in") or output ("out") tensor of module during forward passes.

    With gradients enabled the tensor is swapped for a detached leaf that requires grad, so a
    backward pass runs only through the part of the network after it. The hook is removed on
    exit, also on an exception: nothing leaks over a dataset.
    """
    rec = {}

    def grab(t):
        if torch.is_grad_enabled():
            t = t.detach().requires_grad_(True)
        rec["act"] = t
        return t

    if where == "in":
        handle = module.register_forward_pre_hook(lambda m, args: (grab(args[0]),) + tuple(args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: grab(out))
    try:
        yield rec
    finally:
        handle.remove()


def token_grid(model, x, n_tokens):
    """(h, w) of the patch grid of a ViT fed x: from the model's patch size (16x16 for 32 px and
    patch 2 or 96 px and patch 6), else the largest square grid that fits in n_tokens (the rest:
    leading class or register tokens)."""
    p = getattr(model, "patch_size", None)
    if p is not None:
        ph, pw = (p, p) if isinstance(p, int) else p
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
    else:
        h = w = math.isqrt(n_tokens)
    assert 0 < h * w <= n_tokens, f"{n_tokens} tokens cannot hold a {h}x{w} patch grid"
    return h, w


def as_maps(act, model, x):
    """Activations as (B, C, h, w) maps: CNN maps pass through; ViT tokens (B, n, D) lose the
    leading class token(s) and their patch tokens are reshaped to the grid, row by row."""
    if act.ndim == 4:
        return act
    h, w = token_grid(model, x, act.shape[1])
    return act[:, act.shape[1] - h * w:].transpose(1, 2).reshape(act.shape[0], act.shape[2], h, w)


def pick_target(logits, target, y=None):
    """(B,) class per image: the prediction, the label, or a fixed index."""
    if target == "pred":
        return logits.argmax(dim=1)
    if target == "true":
        if y is None:
            raise ValueError("--target true needs labels")
        return y.to(logits.device)
    c = int(target)
    if not 0 <= c < logits.shape[1]:
        raise ValueError(f"target class {c} is not one of the model's {logits.shape[1]} classes")
    return torch.full((logits.shape[0],), c, dtype=torch.long, device=logits.device)


def head_weight(model, channels):
    """Weights (classes, C) of the last Linear reading C features: the head after the pool."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
    if not lins:
        raise ValueError(f"CAM needs global average pooling and a linear head on {channels} channels; "
                         f"this model has none: use --method gradcam")
    return lins[-1].weight


@contextmanager
def evaluating(model):
    """Eval mode (no dropout, BN with running statistics: images stay independent), restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def class_map(model, x, method="gradcam", target="pred", y=None, layer=None):
    """Maps for a batch x (B, C, H, W), normalised as the model expects.

    Returns (maps (B, h, w) >= 0 at the layer's resolution, logits (B, K), target classes (B,),
    per-head maps (B, heads, h, w) for method "attention", else None).
    """
    with evaluating(model):
        if method == "attention":
            if not hasattr(model, "get_last_selfattention"):
                raise ValueError("--method attention needs a ViT with get_last_selfattention")
            with torch.no_grad():
                logits = model(x)
                attn = model.get_last_selfattention(x)             # (B, heads, 1 + N, 1 + N)
            cls_row = attn[:, :, 0]                                # what the class token reads
            heads = as_maps(cls_row.transpose(1, 2), model, x)     # (B, heads, h, w), class token dropped
            return heads.mean(dim=1), logits, pick_target(logits, target, y), heads
        module, where = layer or default_layer(model)
        if method == "cam":
            with torch.no_grad(), recording(module, where) as rec:
                logits = model(x)
                if rec["act"].ndim != 4:
                    raise ValueError("CAM needs a CNN with global average pooling and a linear head; "
                                     "for a ViT use --method gradcam or attention")
                A = rec["act"]                                     # (B, C, h, w)
                cls = pick_target(logits, target, y)
                w = head_weight(model, A.shape[1])[cls]            # (B, C)
                return F.relu(torch.einsum("bc,bchw->bhw", w.float(), A.float())), logits, cls, None
        if method != "gradcam":
            raise ValueError(f"unknown method {method!r}")
        ## Grad-CAM: how much would the class score change if a feature map grew? Average that
        ## gradient over the map to weigh each channel, sum the weighted maps, keep the positive
        ## part: the places that argue FOR the class. Coarse (a 8x8 grid here) but model-agnostic
        with torch.enable_grad(), recording(module, where) as rec:
            logits = model(x)
            cls = pick_target(logits, target, y)
            # images are independent in eval mode: the gradient of the sum is each image's own
            score = logits.gather(1, cls[:, None]).sum()
            (grad,) = torch.autograd.grad(score, rec["act"])       # no .grad left on the parameters
        A, G = as_maps(rec["act"].detach(), model, x), as_maps(grad, model, x)
        alpha = G.float().mean(dim=(2, 3), keepdim=True)           # (B, C, 1, 1) channel weights
        return F.relu((alpha * A.float()).sum(dim=1)), logits.detach(), cls, None


# ----------------------------------------------------------------------------- AIL

def resize_map(maps, size):
    """(B, h, w) -> (B, H, W) bilinear, clamped at 0 (bilinear weights are convex: a no-op
    unless the input had negatives)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0].clamp_min(0)


def resize_mask(masks, size):
    """(B, 1, H', W') or (B, H', W') 0/1 -> (B, H, W) float 0/1, nearest neighbour."""
    m = masks.float() if masks.ndim == 4 else masks.float()[:, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest-exact")
    return (m[:, 0] > 0.5).float()


def ail(maps, masks, size=None):
    """Attention inside the lungs, (B,) in [0, 1]: mass of the ReLU'd raw maps inside the mask
    over their mass in the whole image, both at `size` (default: the mask's, i.e. the image's).
    NaN where a map is zero everywhere."""
    size = tuple(size or masks.shape[-2:])
    m = resize_map(F.relu(maps.float()), size)
    inside = (m * resize_mask(masks, size).to(m.device)).sum(dim=(1, 2))
    total = m.sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


# ----------------------------------------------------------------------------- pictures

JET = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])
JET_AT = np.array([0, .125, .375, .625, .875, 1])


def colormap(v):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, a jet-like ramp (dark blue -> red)."""
    v = np.clip(v, 0, 1)
    return (np.stack([np.interp(v, JET_AT, JET[:, c]) for c in range(3)], axis=-1) * 255).round().astype(np.uint8)


def tiles(img, heat, mask=None):
    """uint8 image (C, H, W), raw map at the image's size (H, W), optional mask (H, W) ->
    (image, heat map, overlay) as (H, W, 3) uint8; the map min-max normalised for display only,
    the lung outline drawn on the overlay."""
    im = img.permute(1, 2, 0).numpy()
    im = np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im[..., :3]
    h = heat.numpy()
    h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
    hm = colormap(h)
    over = (0.5 * im + 0.5 * hm).round().astype(np.uint8)
    if mask is not None:
        m = mask.float()[None, None]
        edge = (m - -F.max_pool2d(-m, 3, stride=1, padding=1))[0, 0].numpy() > 0    # mask minus its erosion
        over[edge] = (255, 255, 255)
    return im, hm, over


def font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                          # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def save_panel(path, parts, title, size):
    """Tiles side by side at size x size, under a title line (thesis Fig. C.1)."""
    from PIL import Image, ImageDraw
    pad = max(size // 8, 18)
    panel = Image.new("RGB", (size * len(parts), size + pad), "white")
    for i, a in enumerate(parts):
        panel.paste(Image.fromarray(a).resize((size, size), Image.BILINEAR), (i * size, pad))
    ImageDraw.Draw(panel).text((4, 2), title, fill="black", font=font(max(pad - 6, 10)))
    panel.save(path)


def save_grid(path, overlays, captions, size=128, cols=8):
    from PIL import Image, ImageDraw
    pad, rows = 16, math.ceil(len(overlays) / cols)
    grid = Image.new("RGB", (size * min(cols, len(overlays)), (size + pad) * rows), "white")
    draw, f = ImageDraw.Draw(grid), font(11)
    for i, (a, c) in enumerate(zip(overlays, captions)):
        x, y = (i % cols) * size, (i // cols) * (size + pad)
        grid.paste(Image.fromarray(a).resize((size, size), Image.BILINEAR), (x, y + pad))
        draw.text((x + 2, y + 1), c, fill="black", font=f)
    grid.save(path)


def stats(values):
    """(mean, std, n) of the finite values, in percent."""
    v = np.array([a for a in values if np.isfinite(a)]) * 100
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


# ----------------------------------------------------------------------------- main

def load_images(args, img_size, variant, in_chans):
    """The split to explain, at img_size, in the variant the model was trained on."""
    opts = dict(data.data_options(args), variant=variant)
    if args.dataset == "dicom":
        opts["channels"] = in_chans                  # 1 or 3, as the model was trained
    try:
        return data.build_dataset(args.dataset, args.split, data_dir=args.data_dir, img_size=img_size,
                                  download=args.download, seed=args.seed, num_workers=args.num_workers, **opts)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def explain(model, meta, ds, args, name, device, out_dir):
    """Maps, AIL, panels, grid and CSV of one model on ds; returns the CSV rows and the grid's
    (overlay, caption) pairs."""
    layer = (model.get_submodule(args.layer), "out") if args.layer else None
    classes = [str(c) for c in meta["classes"]]
    n = min(len(ds), args.max_images) if args.max_images else len(ds)
    n_panels = n if args.panels < 0 else min(args.panels, n)
    os.makedirs(os.path.join(out_dir, "panels"), exist_ok=True)
    rows, overlays, captions = [], [], []
    for i in range(0, n, args.batch_size):
        xb = ds.x[i:min(i + args.batch_size, n)]
        yb = ds.y[i:i + len(xb)] if ds.y is not None else None
        x = data.preprocess(xb.to(device), meta["img_size"], meta["mean"], meta["std"])
        maps, logits, cls, heads = class_map(model, x, args.method, args.target, yb, layer)
        full = resize_map(maps, xb.shape[-2:]).cpu()               # (B, H, W): the image's resolution
        masks = ds.masks[i:i + len(xb)] if ds.masks is not None else None
        a = ail(full, masks) if masks is not None else torch.full((len(xb),), float("nan"))
        prob = logits.float().softmax(dim=1).cpu()
        pred = prob.argmax(dim=1)
        for k in range(len(xb)):
            j = i + k
            iid = ds.ids[j] if ds.ids is not None else str(j)
            true = str(ds.classes[int(yb[k])]) if yb is not None else "-"
            row = dict(id=iid, true=true, predicted=classes[int(pred[k])], score=round(float(prob[k, pred[k]]), 4),
                       target=classes[int(cls[k])], ail=round(float(a[k]), 4))
            rows.append(row)
            if j >= max(n_panels, args.grid):
                continue
            im, hm, over = tiles(xb[k], full[k], masks[k, 0] if masks is not None else None)
            if j < n_panels:
                parts = [im, hm, over]
                if heads is not None:                              # attention: one more tile per head
                    parts += [tiles(xb[k], h)[1] for h in resize_map(heads[k].cpu(), xb.shape[-2:])]
                ail_txt = f"{row['ail'] * 100:.1f}%" if masks is not None else "n/a"
                save_panel(os.path.join(out_dir, "panels", f"{iid}.png"), parts,
                           f"{name} | pred {row['predicted']} ({row['score']:.2f}) | true {true} | AIL {ail_txt}",
                           args.panel_size)
            if j < args.grid:
                overlays.append(over)
                ok = "" if true == "-" else (" ok" if true == row["predicted"] else " X")
                captions.append(f"{row['predicted']}{ok}" + (f" {row['ail'] * 100:.0f}%" if masks is not None else ""))
    if overlays:
        save_grid(os.path.join(out_dir, "grid.png"), overlays, captions)
    with open(os.path.join(out_dir, "cam.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows, list(zip(overlays, captions))


def summarise(name, variant, method, rows, masks=None):
    """AIL mean / std (percent) over all, correct and incorrect images; lung_area is the mean
    fraction of the image inside the mask: the AIL of a map spread evenly, the level to beat."""
    labelled = [r for r in rows if r["true"] != "-"]
    correct = [r["ail"] for r in labelled if r["true"] == r["predicted"]]
    wrong = [r["ail"] for r in labelled if r["true"] != r["predicted"]]
    s = dict(model=name, variant=variant, method=method, n=len(rows),
             top1=round(100 * len(correct) / len(labelled), 2) if labelled else float("nan"),
             # AIL is undefined where the ReLU'd map is zero everywhere: counted, never averaged
             zero_maps=sum(not np.isfinite(r["ail"]) for r in rows) if masks is not None else 0,
             lung_area=round(100 * masks[:len(rows)].float().mean().item(), 2) if masks is not None else float("nan"))
    for key, vals in (("all", [r["ail"] for r in rows]), ("correct", correct), ("incorrect", wrong)):
        m, sd, k = stats(vals)
        s.update({f"ail_{key}_mean": round(m, 2), f"ail_{key}_std": round(sd, 2), f"n_{key}": k})
    return s


def table(summaries):
    """Markdown comparison table, AIL in percent as mean +- std (n)."""
    cell = lambda s, k: "n/a" if s[f"n_{k}"] == 0 else f"{s[f'ail_{k}_mean']:.1f} ± {s[f'ail_{k}_std']:.1f} ({s[f'n_{k}']})"
    lines = ["| model | variant | method | images | top-1 | AIL % all | AIL % correct | AIL % incorrect | zero maps "
             "| lung area % |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {s['model']} | {s['variant']} | {s['method']} | {s['n']} | {s['top1']:.1f} | {cell(s, 'all')} | "
              f"{cell(s, 'correct')} | {cell(s, 'incorrect')} | {s['zero_maps']} | {s['lung_area']:.1f} |"
              for s in summaries]
    return "\n".join(lines)


def main(args):
    # ---- setup
    device = models.resolve_device(args.device)
    names = args.name or [os.path.basename(os.path.dirname(os.path.abspath(c))) for c in args.checkpoint]
    if len(names) != len(args.checkpoint):
        raise SystemExit(f"error: {len(names)} --name for {len(args.checkpoint)} --checkpoint")
    if len(set(names)) < len(names):                     # two best.pt in one folder, say
        names = [f"{n}_{os.path.splitext(os.path.basename(c))[0]}" for n, c in zip(names, args.checkpoint)]
    models.output_dir(args.output_dir)
    summaries, images, shown = [], {}, {}
    for path, name in zip(args.checkpoint, names):
        # ---- model: any classifier this project writes, in eval mode
        if not os.path.isfile(path):
            raise SystemExit(f"error: --checkpoint {path}: no such file")
        try:
            model, meta = models.load_classifier(path, device)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if args.method == "attention" and meta["kind"] != "vit":
            raise SystemExit(f"error: --method attention needs a ViT; {path} holds a {meta['kind']}")
        saved = models.read_checkpoint(path).get("args") or {}
        variant = args.variant or saved.get("variant") or "full"

        # ---- data: the split at the resolution the maps and AIL are computed at
        img_size = args.img_size or meta["img_size"]
        key = (img_size, variant, meta["in_chans"])
        if key not in images:
            images[key] = load_images(args, img_size, variant, meta["in_chans"])
        ds = images[key]
        if len(ds) == 0:
            raise SystemExit(f"error: the {args.split} split of {args.dataset} is empty")
        if ds.y is not None and [str(c) for c in ds.classes] != [str(c) for c in meta["classes"]]:
            print(f"{name}: warning: the model's classes {meta['classes']} are not the dataset's {ds.classes}")
        if ds.masks is None:
            print(f"{name}: no lung masks (--masks DIR with --dataset dicom): AIL is n/a")

        # ---- maps, pictures, per-image CSV, per-model summary
        try:                                             # a method the model cannot take, a class it lacks
            rows, shown[name] = explain(model, meta, ds, args, name, device, os.path.join(args.output_dir, name))
        except ValueError as e:
            raise SystemExit(f"error: {path}: {e}")
        summaries.append(summarise(name, variant, args.method, rows, ds.masks))
        del model

    if len(shown) > 1:          # the same images side by side, one column per model (the images
        n = min(len(v) for v in shown.values())          # are in file order, the same for every variant)
        pairs = [(o, f"{m}: {c}") for i in range(n) for m, v in shown.items() for o, c in [v[i]]]
        save_grid(os.path.join(args.output_dir, "compare.png"), *zip(*pairs), size=160, cols=len(shown))

    md = table(summaries)
    print(md)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summaries[0]))
        w.writeheader()
        w.writerows(summaries)
    return summaries


if __name__ == "__main__":
    main(get_args())
