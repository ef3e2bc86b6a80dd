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
(70 / 10 / 20 %, seeded): the CAM study of docs/cam.md.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder with images/<id>.jpg (or .png), masks/<id>.png (data/openist)")
    p.add_argument("out")
    p.add_argument("--extra", default=None, help="a folder of real .dcm files to copy in (unlabelled)")
    p.add_argument("--both-sides", action="store_true", help="each radiograph as itself and mirrored, split by radiograph")
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
        if args.both_sides:
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
