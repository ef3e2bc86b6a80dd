"""Write radiographs as DICOM files with pydicom: the tests' fixtures, and an example that turns
the OpenIST radiographs (with lung masks) into a DICOM folder like a hospital export.

    python data.py download openist                     # data/openist/images/<id>.jpg, masks/<id>.png
    python tests/make_xray_dicoms.py data/openist /tmp/cxr_dicom [--extra FOLDER_OF_REAL_DCM_FILES]
    python tests/make_xray_dicoms.py data/openist /tmp/flip --both-sides

Every other image is written as MONOCHROME1 (inverted pixel values, as CR plates store them)
and all as 12-bit data with a rescale slope/intercept and a window, so the loader's whole
modality LUT -> window -> inversion path is exercised; masks are copied as <id>.png and a
labels.csv (id, label) is written, the label being the image's left/right orientation: half the
radiographs are mirrored. --both-sides writes every distinct radiograph twice instead, as itself
(<id>, "original") and mirrored (<id>_f, "flipped"), with a split column that keeps both of a
radiograph (and the OpenIST twins, identical pixels under two ids) in one of train / val / test
(70 / 10 / 20 %, seeded): the CAM study of docs/cam.md. --sick writes every radiograph four times instead,
as it is ("clean") and with one simulated opacity of known extent over its lung mask (the label): a consolidated
lower part of one lung, an effusion under a meniscus, a haze over both (sick_lungs); the mask stays the lung.
"""
import argparse
import csv
import os
import shutil

import numpy as np


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, signed=False, slope=None,
                intercept=None, center=None, width=None, voi_function=None, presentation_shape=None):
    """Write a 2-D integer array as an uncompressed single-frame CR DICOM file."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    pixels = np.asarray(pixels)
    bits_alloc = 8 if pixels.dtype.itemsize == 1 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"          # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored = bits_alloc, bits_stored or bits_alloc
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "US"
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_function:
        ds.VOILUTFunction = voi_function
    if presentation_shape:
        ds.PresentationLUTShape = presentation_shape
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[bits_alloc, signed]
    ds.PixelData = pixels.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def sick_lungs(img, mask, rng):
    """{kind: image} for a float radiograph (H, W) in [0, 1] and its bool lung mask: clean, and each opacity
    blended toward the soft tissue's brightness inside the lungs, following their outline as disease does (unlike
    segment.py's training augmentation, whose edges never follow the lungs)."""
    from PIL import Image, ImageFilter
    H, W = mask.shape
    blur = lambda a, s: np.asarray(Image.fromarray((a * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(s)),
                                   np.float32) / 255
    level = np.percentile(img[~mask & (img > 0.05)], 90)                 # as bright as the mediastinum
    cloud = blur(rng.random((H, W)).astype(np.float32), W / 60)
    cloud = (cloud - cloud.min()) / (cloud.max() - cloud.min() + 1e-6)
    cols = np.nonzero(mask.any(0))[0]
    split = (cols.min() + cols.max()) // 2                                 # the two lungs, either side of the middle
    lungs = [mask & (np.arange(W) < split), mask & (np.arange(W) >= split)]
    rows = np.arange(H)[:, None]
    lung = lungs[rng.integers(2)]
    ly = np.nonzero(lung.any(1))[0]
    cut = ly.min() + rng.uniform(0.3, 0.6) * (ly.max() - ly.min())        # consolidation below a random height
    consolidation = blur((lung & (rows > cut)).astype(np.float32), W / 100) * rng.uniform(0.7, 1.0) * \
        (0.75 + 0.25 * cloud)
    lung = lungs[rng.integers(2)]
    ly, lx = np.nonzero(lung.any(1))[0], np.nonzero(lung.any(0))[0]
    base = ly.max() - rng.uniform(0.25, 0.45) * (ly.max() - ly.min())     # effusion: a meniscus up to the wall
    meniscus = base - 0.15 * (ly.max() - ly.min()) * (2 * (np.arange(W) - lx.mean()) / max(np.ptp(lx), 1)) ** 2
    effusion = blur((lung & (rows > meniscus[None])).astype(np.float32), W / 150) * 0.95
    haze = blur(mask.astype(np.float32), W / 80) * rng.uniform(0.45, 0.75) * (0.5 + 0.5 * cloud)
    return {"clean": img, **{k: np.clip(img + w * (level - img), 0, 1) for k, w in
                             (("consolidation", consolidation), ("effusion", effusion), ("haze", haze))}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder with images/<id>.jpg (or .png), masks/<id>.png (data/openist)")
    p.add_argument("out")
    p.add_argument("--extra", default=None, help="a folder of real .dcm files to copy in (unlabelled)")
    p.add_argument("--both-sides", action="store_true", help="each radiograph as itself and mirrored, split by radiograph")
    p.add_argument("--sick", action="store_true", help="each radiograph clean and with three simulated opacities")
    p.add_argument("--seed", type=int, default=0, help="--both-sides: the split")
    p.add_argument("--limit", type=int, default=0, help="only the first N radiographs (0: all)")
    args = p.parse_args(argv)
    from PIL import Image
    os.makedirs(os.path.join(args.out, "dicom"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
    rows, seen = [], {}
    names = sorted(f for f in os.listdir(os.path.join(args.source, "images")) if f.lower().endswith((".png", ".jpg")))
    names = names[:args.limit] if args.limit else names
    split = {}
    if args.both_sides:        # by radiograph: a shuffled order cut at 70% and 80%
        order = np.random.default_rng(args.seed).permutation(len(names))
        split = {names[j]: "train" if r < 0.7 * len(names) else "val" if r < 0.8 * len(names) else "test"
                 for r, j in enumerate(order)}
    for k, name in enumerate(names):
        i = os.path.splitext(name)[0]
        img = np.asarray(Image.open(os.path.join(args.source, "images", name)).convert("L"), dtype=np.float64)
        mask = Image.open(os.path.join(args.source, "masks", i + ".png"))
        if args.sick:
            lungs = np.asarray(mask.convert("L")) > 127
            versions = [(f"{i}_{kind}", v * 255, mask, kind) for kind, v in
                        sick_lungs(img / 255, lungs, np.random.default_rng(args.seed + k)).items()]
        elif args.both_sides:
            key = img.tobytes()
            if key in seen:    # the same radiograph under another id: keep one, not one per split
                continue
            seen[key] = i
            versions = [(i, img, mask, "original"), (i + "_f", img[:, ::-1], mask.transpose(Image.FLIP_LEFT_RIGHT),
                                                     "flipped")]
        else:                  # half the images mirrored: a label that needs anatomy (the heart's side)
            flip = k % 4 >= 2
            versions = [(i, img[:, ::-1] if flip else img, mask.transpose(Image.FLIP_LEFT_RIGHT) if flip else mask,
                         "mirrored" if flip else "standard")]
        for j, (vid, im, m, label) in enumerate(versions):
            # 8-bit display values -> 12-bit stored values v, with modality values 2 v - 1024 and a window
            # over the whole range, so that displaying it gives back the PNG (up to rounding)
            v = np.rint(im / 255 * 4095)
            mono1 = (k + j) % 2 == 1
            write_dicom(os.path.join(args.out, "dicom", f"{vid}.dcm"), (4095 - v) if mono1 else v,
                        photometric="MONOCHROME1" if mono1 else "MONOCHROME2", bits_stored=12, slope=2,
                        intercept=-1024, center=3071.5, width=8191)
            m.save(os.path.join(args.out, "masks", f"{vid}.png"))
            rows.append((vid, label) + ((split[name],) if args.both_sides else ()))
    with open(os.path.join(args.out, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("id", "label") + (("split",) if args.both_sides else ())] + rows)
    if args.extra:
        os.makedirs(os.path.join(args.out, "unlabelled"), exist_ok=True)
        for f in os.listdir(args.extra):
            if f.endswith(".dcm"):
                shutil.copy(os.path.join(args.extra, f), os.path.join(args.out, "unlabelled", f))
    print(f"wrote {len(rows)} DICOM files, masks and labels.csv to {args.out}")


if __name__ == "__main__":
    main()
