"""The held-out lung-mask evaluation of docs/segmentation.md, rebuilt from its public sources and scored.

    python data.py download openist && python segment.py train --data-dir data/openist/images \\
        --masks data/openist/masks --output-dir runs/segment                       # the model, 7 minutes
    python tools/lung_eval.py build                     # data/lung_eval/: about 420 MB fetched once, 1.3 GB written
    python tools/lung_eval.py score --checkpoint runs/segment/best.pt               # runs/lung_eval/lung_eval.md
    python tools/lung_eval.py score --checkpoint runs/segment/best.pt -- --hull     # flags after -- go to predict

build fetches, at pinned commits, two public GitHub repositories holding three sets of radiographs from other
hospitals than OpenIST's (segment.py's training set), with lung masks drawn by people in OpenIST's convention (the
visible lung field):
  Montgomery County, USA (138: 80 normal, 58 tuberculosis) and Shenzhen, China (566: 279 normal, 287 tuberculosis),
    512 x 512, masks thresholded at 127: rochadiego/MultiResUNet-lung-segmentation, GitHub's archive of the commit;
  JSRT, Japan (247: 93 normal, 154 with a nodule), 2048 x 2048, with the SCR lung masks (left and right at 1024,
    joined and enlarged): AnishHota/JSRT-Segmentation, its 741 files one by one (its archive adds 2 GB of raw data).
What is pinned is git's tree id of each folder used, computed here from the files: whatever an archive's or a
mirror's bytes, the content is the commit's. It writes data/lung_eval/real/ (images/<id>.png, masks/<id>.png at 0 or
255, labels.csv: id, label as set and finding) and sim/: 100 of the normals (25, 50, 25, drawn with seed 0) through
tests/make_xray_dicoms.py --sick, each as a DICOM clean and with a simulated consolidation, effusion and haze over its
known mask (docs/segmentation.md says what a simulated set cannot show). Their licences are for research, with
citation; nobody may redistribute them, so they are fetched on request from the source and never shipped.
--mirror (or $DSMAE_MIRROR), a URL or a folder, holds the same files under the same names: the archive
(<commit>.tar.gz, the last part of its GitHub URL), and the JSRT files under JSRT-Segmentation-<commit>/ (the
repository at that commit); the same tree ids are checked.

score runs segment.py predict as a user would (its defaults, with --labels and --reference) on both sets and writes
lung_eval.md and lung_eval.json to --output-dir: per set the masks, mean Dice, 10th percentile, and the flag's catch
(of the masks under 0.85 Dice, the share flagged; of the others, the share flagged), also for the halves on which
predict's thresholds were chosen (radiographs with an odd number) and tested (even). It runs segment.py as a
program and imports no stage script. Radiographs of ieee8023/covid-chestxray-dataset, and sets made from it, are
kept out of this evaluation and of all tuning: they are left for an independent check.
"""
import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository: the scripts run there
sys.path.insert(0, ROOT)
import data  # noqa: E402

MCSZ_REPO, MCSZ = "rochadiego/MultiResUNet-lung-segmentation", "234c65ba9f3cd7e4c9f84b476745ff928694470f"
JSRT_REPO, JSRT = "AnishHota/JSRT-Segmentation", "047d3193a744c4cd62b5dd1b217a6e9e63db8446"
TREES = {"data/cxr": "e69fd5d9f0bd4141393cfee05dc8d83e5e16d481",            # git's tree ids at those commits
         "data/masks": "452ed1aa10939aa3926648eeb9506b8035f39544",
         "JSRT/jsrt_images/images": "94c4de85a78f2f6efcd33e0e365f8376ed8f860a",
         "JSRT/masks/masks/left_lung_png": "e54546ae3dbaf001a6d42d6c6e054a04482b1f65",
         "JSRT/masks/masks/right_lung_png": "458819fdac3d858620eab65b0c25f30bf565f552"}
JSRT_IDS = [f"JPCLN{i:03d}" for i in range(1, 155)] + [f"JPCNN{i:03d}" for i in range(1, 94)]   # nodule, none
JSRT_FILES = {"JSRT/jsrt_images/images": "{}.IMG.png", "JSRT/masks/masks/left_lung_png": "{}.png",
              "JSRT/masks/masks/right_lung_png": "{}.png"}
SETS = {"MCUCXR": "Montgomery", "CHNCXR": "Shenzhen"}
ORDER = ["Montgomery normal", "Montgomery TB", "Shenzhen normal", "Shenzhen TB", "JSRT normal", "JSRT nodules",
         "clean", "consolidation", "effusion", "haze"]
SIM = {"Montgomery normal": 25, "Shenzhen normal": 50, "JSRT normal": 25}    # the normals the simulated set is made of
BAD = 0.85                                                                   # a mask under this Dice is a bad one


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch the sources and write data/lung_eval/{real,sim}")
    s = sub.add_parser("score", help="segment.py predict on both sets, and the table")
    for q in (b, s):
        q.add_argument("--data-dir", default="data", help="lung_eval/ is built and read here")
    b.add_argument("--mirror", default=None, help="a URL or folder with the same files (default: $DSMAE_MIRROR)")
    s.add_argument("--checkpoint", required=True, help="segment.py train's best.pt")
    s.add_argument("--output-dir", default="runs/lung_eval")
    s.add_argument("predict", nargs="*", help="after --: flags for segment.py predict (--hull, --max-doubt 1, ...)")
    return data.finish_parser(p).parse_args(argv)


# ----------------------------------------------------------------------------- fetch, and check against the pins

def check(folder, blobs, where):
    if (tree := data.git_tree(blobs)) != TREES[folder]:
        raise ValueError(f"{where}: its {folder}/ is not the pinned one (git tree {tree}, expected {TREES[folder]}): "
                         f"a changed or corrupt copy")


def fetch_archive(root, mirror):
    """Montgomery and Shenzhen: {folder: {name: bytes}} from GitHub's archive of the commit, fetched once by
    data.fetch (beside as .part, renamed; a mirror; one line without a network), its content checked here."""
    data.DOWNLOADS["lung_eval"] = (f"https://github.com/{MCSZ_REPO}/archive/{MCSZ}.tar.gz",
                                   f"tree {TREES['data/cxr']}", None)     # no folder: data.fetch leaves it packed
    path = os.path.join(root, f"{MCSZ}.tar.gz")
    fetched = not os.path.exists(path)
    if fetched:
        print("Montgomery and Shenzhen: about 120 MB")
    data.fetch("lung_eval", root, mirror)
    blobs = {"data/cxr": {}, "data/masks": {}}
    try:
        with tarfile.open(path) as tar:
            for m in tar:                      # read, never extracted: the files are written below under our names
                folder, _, name = m.name.partition("/")[2].rpartition("/")
                if m.isfile() and folder in blobs:
                    blobs[folder][name] = tar.extractfile(m).read()
        for folder in blobs:
            check(folder, blobs[folder], path)
    except (ValueError, tarfile.TarError, EOFError, OSError) as e:
        if fetched:
            os.remove(path)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__             # tarfile's errors span lines
        raise ValueError(f"{e if isinstance(e, ValueError) else f'{path} is not a whole archive ({why})'}; "
                         f"{'removed' if fetched else 'delete it'} and rerun") from None
    return blobs


def fetch_jsrt(cache, mirror):
    """JSRT: {folder: {name: bytes}}, file by file from the commit (or the mirror); files already fetched are kept
    in cache, so an interrupted build resumes."""
    base = (mirror.rstrip("/") + "/" if "://" in mirror else os.path.join(mirror, "")) + f"JSRT-Segmentation-{JSRT}" \
        if mirror else f"https://raw.githubusercontent.com/{JSRT_REPO}/{JSRT}"
    todo = [f"{folder}/{pattern.format(i)}" for folder, pattern in JSRT_FILES.items() for i in JSRT_IDS]

    def get(rel):
        dst = os.path.join(cache, rel)
        if not os.path.exists(dst):
            src = base + "/" + rel if "://" in base else os.path.join(base, rel)
            try:
                if "://" in src:
                    with urllib.request.urlopen(src, timeout=60) as r:
                        body = r.read()
                else:
                    body = open(src, "rb").read()
            except Exception as e:
                raise FileNotFoundError(f"could not fetch {src} ({type(e).__name__}: {e}). Rerun to go on (what was "
                                        f"fetched is kept in {cache}), or point --mirror at a copy") from None
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst + ".part", "wb") as f:
                f.write(body)
            os.replace(dst + ".part", dst)
        return rel

    print(f"fetching JSRT's {len(todo)} files from {base} -> {cache} (about 300 MB)")
    pool = ThreadPoolExecutor(8)
    try:
        list(tqdm(pool.map(get, todo), total=len(todo), desc="JSRT", unit="file"))
    finally:                                                        # the first failure stops the rest
        pool.shutdown(cancel_futures=True)
    blobs = {folder: {} for folder in JSRT_FILES}
    for rel in todo:
        folder, _, name = rel.rpartition("/")
        blobs[folder][name] = open(os.path.join(cache, rel), "rb").read()
    for folder in blobs:
        try:
            check(folder, blobs[folder], base)
        except ValueError as e:
            shutil.rmtree(cache)                                    # fetch it all again, from the source
            raise ValueError(f"{e}; {cache} removed, rerun to fetch again") from None
    return blobs


# ----------------------------------------------------------------------------- build: real/ and sim/

def lungs(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 127


def build(args):
    out = os.path.join(args.data_dir, "lung_eval")
    if os.path.exists(out):
        print(f"{out} is there already (delete it to build it again)")
        return
    mirror, cache = args.mirror or os.environ.get("DSMAE_MIRROR"), os.path.join(args.data_dir, ".lung_eval_jsrt")
    mcsz, jsrt = fetch_archive(args.data_dir, mirror), fetch_jsrt(cache, mirror)
    part = out + ".part"                                            # written beside, renamed when whole
    shutil.rmtree(part, ignore_errors=True)
    for d in ("real/images", "real/masks", "normals/images", "normals/masks"):
        os.makedirs(os.path.join(part, d))
    # (id, label): MCUCXR_0001_0 is Montgomery's, _0 normal, _1 tuberculosis; JPCLN001 JSRT's with a nodule
    rows = [(n[:-4], f"{SETS[n[:6]]} {'TB' if n.endswith('_1.png') else 'normal'}") for n in sorted(mcsz["data/cxr"])]
    rows += [(i, "JSRT nodules" if i.startswith("JPCLN") else "JSRT normal") for i in JSRT_IDS]
    rng = np.random.default_rng(0)
    sim = {i for label, n in SIM.items() for i in rng.choice(sorted(i for i, g in rows if g == label), n, False)}
    for i, label in tqdm(rows, desc="real/", unit="image"):          # one at a time: JSRT's masks are 4 MB each
        if label.startswith("JSRT"):                                # SCR's masks are drawn at 1024 px: enlarged
            png = jsrt["JSRT/jsrt_images/images"][f"{i}.IMG.png"]
            both = lungs(jsrt["JSRT/masks/masks/left_lung_png"][f"{i}.png"]) | \
                lungs(jsrt["JSRT/masks/masks/right_lung_png"][f"{i}.png"])
            mask = np.asarray(Image.fromarray(both).resize(Image.open(io.BytesIO(png)).size, Image.NEAREST))
        else:
            png, mask = mcsz["data/cxr"][f"{i}.png"], lungs(mcsz["data/masks"][f"{i}.png"])
        for d in ("real",) + (("normals",) if i in sim else ()):
            with open(os.path.join(part, d, "images", f"{i}.png"), "wb") as f:
                f.write(png)                                        # the source's bytes
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(part, d, "masks", f"{i}.png"))
    with open(os.path.join(part, "real", "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("id", "label")] + rows)
    if subprocess.run([sys.executable, os.path.join(ROOT, "tests", "make_xray_dicoms.py"),
                       os.path.join(part, "normals"), os.path.join(part, "sim"), "--sick"]).returncode:
        shutil.rmtree(part)
        raise ValueError("tests/make_xray_dicoms.py could not write the simulated set (its message is above); "
                         f"{part} removed, the sources kept: rerun")
    shutil.rmtree(os.path.join(part, "normals"))
    os.replace(part, out)
    shutil.rmtree(cache)
    print(f"{out}: real/ {len(rows)} radiographs with lung masks, sim/ {4 * len(sim)} DICOMs. Research use, cite the "
          f"sources (docs/segmentation.md); not to share")


# ----------------------------------------------------------------------------- score: predict, then the table

def catch(rows):
    """Masks, mean Dice, 10th percentile; the bad masks (under BAD) and how many flagged; the others, likewise."""
    d, f = np.array([r["dice"] for r in rows]), np.array([r["flagged"] for r in rows])
    bad = d < BAD
    return dict(masks=len(d), dice=float(d.mean()), p10=float(np.quantile(d, 0.1)), bad=int(bad.sum()),
                bad_flagged=int(f[bad].sum()), others=int((~bad).sum()), others_flagged=int(f[~bad].sum()))


def score(args):
    rows = []
    for part, images in (("real", "images"), ("sim", "dicom")):
        src, dst = os.path.join(args.data_dir, "lung_eval", part), os.path.join(args.output_dir, part)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} not found: run `python tools/lung_eval.py build --data-dir "
                                    f"{args.data_dir}` first")
        cmd = [sys.executable, os.path.join(ROOT, "segment.py"), "predict", "--checkpoint", args.checkpoint,
               "--data-dir", os.path.join(src, images), "--labels", os.path.join(src, "labels.csv"),
               "--reference", os.path.join(src, "masks"), "--output-dir", dst] + args.predict
        print(" ".join(cmd))
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"error: segment.py predict failed on {src} (its message is above)")
        with open(os.path.join(dst, "masks.csv"), newline="") as f:
            for r in csv.DictReader(f):
                rows.append(dict(id=r["id"], label=r["label"], dice=float(r["dice"]), flagged=bool(r["flag"]),
                                 odd=int(re.search(r"\d+", r["id"]).group()) % 2 == 1, real=part == "real"))
    groups = {"all": rows, "dev: odd numbers": [r for r in rows if r["odd"]],
              "test: even numbers": [r for r in rows if not r["odd"]],
              "test, real radiographs": [r for r in rows if not r["odd"] and r["real"]],
              **{label: [r for r in rows if r["label"] == label] for label in ORDER}}
    table = {g: catch(rs) for g, rs in groups.items() if rs}
    pct = lambda k, n: f"{100 * k / n:.0f}% ({k}/{n})" if n else "- (none)"
    lines = [f"Lung masks of {args.checkpoint} on the held-out sets (tools/lung_eval.py; bad: Dice under {BAD})", "",
             "| set | masks | mean Dice | 10th percentile | bad masks flagged | others flagged |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {('simulated: ' if g in ORDER[6:] else '') + g} | {t['masks']} | {t['dice']:.3f} | {t['p10']:.3f} "
              f"| {pct(t['bad_flagged'], t['bad'])} | {pct(t['others_flagged'], t['others'])} |"
              for g, t in table.items()]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "lung_eval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.output_dir, "lung_eval.json"), "w") as f:
        json.dump(dict(checkpoint=args.checkpoint, predict=args.predict, table=table), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    a = get_args()
    try:
        build(a) if a.command == "build" else score(a)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
