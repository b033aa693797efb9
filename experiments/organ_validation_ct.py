"""Two real CT validation cases for the organ localiser, rebuilt in the ``organ-ct-sample`` layout from public test data.

    python experiments/organ_validation_ct.py onkodicom DICOM_DIR --out FOLDER     # onkodicom_rt02_thorax
    python experiments/organ_validation_ct.py gstt DCM_DIR SEG_DIR --out FOLDER    # gstt_aide_chest_covid_s82_100
    python experiments/organ_validation_ct.py --smoke [--out DIR]                 # synthetic CT + RTSTRUCT (seconds)

Layout written into FOLDER (see :mod:`medetect.organs.data`): ``volumes/<case>.nii.gz`` (int16 HU),
``labels/<case>.nii.gz`` (uint8, exactly the CT grid), ``label_tables.json`` (``{case: {id: name}}``, merged with the
cases already in FOLDER) and ``boxes.csv`` (every case of ``label_tables.json``, written with medetect's
``boxes_from_label_file`` + ``write_boxes_csv``). Both cases go into one folder by running both commands on it.

Sources (validation data only: never shipped, never trained on):

* ``onkodicom``: github.com/didymo/OnkoDICOM at 0cb723b4b86f2ef61f5476026ec4d2a4d5a34cf8, folder
  ``src/res/testData/DICOM-RT-02``: a thorax radiotherapy planning CT (105 axial slices, 512 x 512, 1.27 x 1.27 x 4 mm)
  and its RTSTRUCT. The clinical contours LUNG_L, LUNG_R, LIVER, HEART and SPINALCORD are rasterised onto the CT grid
  with ``skimage.draw.polygon`` (contours of one slice combined by XOR, so a second contour inside makes a hole).
  Repository LGPL-2.1; no licence is stated for the data, and InstitutionName is still in the files.
* ``gstt``: github.com/GSTT-CSC/TotalSegmentator-AIDE at 016695fed0b4b7763d1ebe514c241b09e9da1919,
  ``tests/data/rtstructwriter/dcm`` (20 CT slices of a chest CT) and ``nii_seg`` (104 TotalSegmentator v1 masks, one
  file per class): a 15 mm slab at the lung bases. The labels are model output, not manual. Repository Apache-2.0; no
  licence is stated for the data.

The CT is read with medetect's DICOM reader (``medetect.data.io.read_dicom_series``). Each label's voxel count and
median HU are printed as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# RTSTRUCT ROI name -> (our label name, label id): TotalSegmentator v2 ids where it has the organ, 80+ otherwise
ONKO_ROIS = {"LUNG_L": ("lung_left", 80), "LUNG_R": ("lung_right", 81), "LIVER": ("liver", 5),
             "HEART": ("heart", 51), "SPINALCORD": ("spinal_cord", 82)}
# TotalSegmentator v1 splits the heart in five; the localiser knows one heart
HEART_PARTS = {"heart_myocardium", "heart_atrium_left", "heart_atrium_right", "heart_ventricle_left",
               "heart_ventricle_right"}


class UserError(Exception):
    """A mistake in the command line or the inputs: one sentence on stderr, exit code 2."""


def write_case(out: Path, case: str, hu: np.ndarray, labels: np.ndarray, geometry, table: dict[int, str]) -> None:
    """Write one case into the organ-ct-sample folder ``out`` and rewrite its label_tables.json and boxes.csv."""
    from medetect.data.image import MedicalImage
    from medetect.data.io import write_image
    from medetect.organs.data import boxes_from_label_file, write_boxes_csv

    for sub in ("volumes", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.round(hu), -32768, 32767).astype(np.int16)  # a no-op for the int16 HU of integral rescales
    write_image(MedicalImage(hu[None], geometry), out / "volumes" / f"{case}.nii.gz")
    write_image(MedicalImage(labels.astype(np.uint8)[None], geometry), out / "labels" / f"{case}.nii.gz")
    path = out / "label_tables.json"
    tables = json.loads(path.read_text()) if path.is_file() else {}
    tables[case] = {str(i): n for i, n in sorted(table.items())}
    tables = dict(sorted(tables.items()))
    path.write_text(json.dumps(tables, indent=1))
    rows = []
    for name, t in tables.items():
        rows += boxes_from_label_file(out / "volumes" / f"{name}.nii.gz", out / "labels" / f"{name}.nii.gz",
                                      {int(i): n for i, n in t.items()}, case=name)
    write_boxes_csv(out / "boxes.csv", rows)
    for i, n in sorted(table.items()):
        m = labels == i
        print(f"{case}: {i:3d} {n:24s} {int(m.sum()):8d} voxels, median {np.median(hu[m]):6.0f} HU")
    print(f"written {case} into {out} ({len(rows)} rows in boxes.csv)")


# ----------------------------------------------------------------------------------------------------------- onkodicom


def _dicom_headers(folder: Path) -> list:
    """(file, header) of every DICOM file directly in ``folder``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    headers = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            try:
                headers.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
            except InvalidDicomError:
                pass
    return headers


def rasterise(rtstruct, roi: str, geometry, shape) -> tuple[np.ndarray | None, int]:
    """Mask ``[Z, Y, X]`` of the RTSTRUCT ROI named ``roi`` (None if there is none) and the number of its contours off
    the slice grid (more than a quarter slice from the nearest slice, or outside the volume), which are left out."""
    from skimage.draw import polygon

    numbers = {r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == roi}
    if not numbers:
        return None, 0
    # axis-aligned axial grid (checked by the caller): world (x, y, z) = origin + index (col, row, slice) * step
    step = np.diag(np.reshape(geometry.direction, (3, 3))) * np.asarray(geometry.spacing[::-1])
    mask, off = np.zeros(shape, bool), 0
    for rc in rtstruct.ROIContourSequence:
        if rc.ReferencedROINumber not in numbers:
            continue
        for c in rc.get("ContourSequence", []):  # one planar contour per item
            idx = (np.asarray(c.ContourData, float).reshape(-1, 3) - geometry.origin) / step
            k = int(round(idx[0, 2]))
            if not 0 <= k < shape[0] or abs(idx[0, 2] - k) > 0.25:
                off += 1
                continue
            inside = np.zeros(shape[1:], bool)
            inside[polygon(idx[:, 1], idx[:, 0], shape[1:])] = True
            mask[k] ^= inside  # XOR: an inner contour is a hole, a contour inside a hole an island
    return mask, off


def onkodicom(dicom_dir: Path, out: Path, case: str = "onkodicom_rt02_thorax") -> dict[str, int]:
    """The CT series and the RTSTRUCT of ``dicom_dir`` -> one case in ``out``. Returns the off-grid contour counts."""
    import pydicom

    from medetect.data.io import read_dicom_series

    headers = _dicom_headers(dicom_dir)
    cts = {str(h.SeriesInstanceUID): h for _, h in headers if h.get("Modality") == "CT"}
    structs = [f for f, h in headers if h.get("Modality") == "RTSTRUCT"]
    if len(cts) != 1:
        raise UserError(f"{dicom_dir}: expected one CT series, found {len(cts)}")
    if len(structs) != 1:
        raise UserError(f"{dicom_dir}: expected one RTSTRUCT file (Modality RTSTRUCT), found {len(structs)}")
    (uid, ct_header), = cts.items()
    ct = read_dicom_series(dicom_dir, series_uid=uid)  # the reader skips the RTSTRUCT / RTPLAN / RTDOSE files
    rs = pydicom.dcmread(structs[0])
    if rs.get("FrameOfReferenceUID") != ct_header.get("FrameOfReferenceUID"):
        raise UserError(f"{structs[0]}: its FrameOfReferenceUID {rs.get('FrameOfReferenceUID')} is not the CT's "
                        f"{ct_header.get('FrameOfReferenceUID')}, so its contours are not in the CT's space")
    if not np.allclose(np.abs(np.reshape(ct.geometry.direction, (3, 3))), np.eye(3), atol=1e-4):
        raise UserError(f"{dicom_dir}: the CT series is not axial (direction {ct.geometry.direction}); only axial "
                        "series are supported")
    hu = ct.array[0]
    labels, table, off_grid = np.zeros(hu.shape, np.uint8), {}, {}
    for roi, (name, i) in ONKO_ROIS.items():
        mask, off_grid[roi] = rasterise(rs, roi, ct.geometry, hu.shape)
        if mask is None:
            print(f"{case}: no ROI {roi} in {structs[0].name}")
            continue
        print(f"{case}: {roi} -> {name} ({i}): {int(mask.sum())} voxels, {off_grid[roi]} contours off the slice grid")
        labels[mask], table[i] = i, name  # a later ROI takes the voxels it shares with an earlier one
    write_case(out, case, hu, labels, ct.geometry, table)
    return off_grid


# ---------------------------------------------------------------------------------------------------------------- gstt


def gstt(dcm_dir: Path, seg_dir: Path, out: Path, case: str = "gstt_aide_chest_covid_s82_100") -> None:
    """The TotalSegmentator-AIDE slab (20 DICOM slices + v1 masks) -> one case in ``out``."""
    from medetect.data.io import read_dicom_series, read_image
    from medetect.organs.anatomy import TOTALSEG_IDS

    for d in (dcm_dir, seg_dir):
        if not d.is_dir():
            raise UserError(f"{d}: no such folder")
    full = read_dicom_series(dcm_dir, allow_gaps=True)
    steps = np.diff(full.meta["slice_positions_mm"])
    # the 20 slices lie on a 0.8 mm grid, but the one after the first (z -820.2 mm) is missing: the first slice is
    # dropped, which leaves 19 regular slices
    if len(steps) != 19 or not np.allclose(steps[1:], 0.8, atol=0.01):
        raise UserError(f"{dcm_dir}: expected the 20 slices of the TotalSegmentator-AIDE test slab, one gap after the "
                        f"first, then 0.8 mm steps (found steps {np.round(steps, 2).tolist()})")
    ct = read_dicom_series(full.meta["files"][1:])
    # ids: TotalSegmentator v2 ids of the organs the phantoms know; every other class (vertebrae included) gets the
    # next free id from 100 in name order, as the first conversion did
    known = {n: i for n, i in TOTALSEG_IDS.items() if not n.startswith("vertebrae_")}
    labels, table, new_id = np.zeros(full.array.shape[1:], np.uint8), {}, 100
    for f in sorted(seg_dir.glob("*.nii.gz")):  # sorted names: a later class overwrites an earlier one's voxels
        name = f.name[: -len(".nii.gz")]
        seg = read_image(f).array[0]
        if seg.shape != labels.shape:
            raise UserError(f"{f}: mask grid {seg.shape} is not the 20-slice CT grid {labels.shape}")
        # the masks are dcm2niix NIfTI: rows stored bottom-up, and z = 1.6 mm (dcm2niix took the first gap as the
        # slice step); mask slice k is the k-th DICOM slice by z. So the rows are reversed onto the DICOM grid (bone
        # masks > 150 HU in 96% of their voxels this way; they fail badly unflipped)
        mask = seg[:, ::-1, :] > 0
        # vertebrae_T7: 12 voxels, an implausible level in a 15 mm slab that also holds T10-T12
        if not mask.any() or name == "vertebrae_T7":
            continue
        target = "heart" if name in HEART_PARTS else name
        i = known.get(target) or next((k for k, v in table.items() if v == target), None)
        if i is None:
            i, new_id = new_id, new_id + 1
        labels[mask], table[i] = i, target
    labels = labels[1:]  # the dropped first slice
    present = set(np.unique(labels).tolist())
    write_case(out, case, ct.array[0], labels, ct.geometry, {i: n for i, n in table.items() if i in present})


# --------------------------------------------------------------------------------------------------------------- smoke


def _save(ds, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2.x
        ds.save_as(path, write_like_original=False)


def _write_synthetic_rt(folder: Path) -> None:
    """4 axial slices of 16 x 16 (rows 2 mm, columns 1 mm, slices 2.5 mm, origin (-10, 20, -5) mm) and an RTSTRUCT:
    LIVER squares on slices 1 and 2 (+ one contour between slices, one beyond the volume), HEART squares on slices 2
    and 3, with a square hole on slice 3."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()

    def dataset(sop_class: str, modality: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.SOPClassUID = sop_class, sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = modality, "SMOKE", study, frame
        return ds

    for k in range(4):
        ds = dataset("1.2.840.10008.5.1.4.1.1.2", "CT")  # CT Image Storage
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.0, 20.0, -5.0 + 2.5 * k], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 1.0], 2.5  # row spacing (y), column spacing (x)
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((16, 16), 1024 + 10 * k, np.uint16).tobytes()  # slice k: 10 k HU
        _save(ds, folder / f"ct_{k}.dcm")

    def square(col0, col1, row0, row1, z):  # a contour along voxel edges: (x, y, z) mm, index = (x + 10, (y - 20) / 2)
        x0, x1, y0, y1 = col0 - 10, col1 - 10, 20 + 2 * row0, 20 + 2 * row1
        return [x0, y0, z, x1, y0, z, x1, y1, z, x0, y1, z]

    rois = {1: ("LIVER", [square(2.5, 6.5, 3.5, 8.5, z) for z in (-2.5, 0.0, -3.75, 10.0)]),
            2: ("HEART", [square(8.5, 14.5, 8.5, 14.5, z) for z in (0.0, 2.5)] + [square(10.5, 12.5, 10.5, 12.5, 2.5)])}
    rs = dataset("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")  # RT Structure Set Storage
    rs.SeriesInstanceUID = generate_uid()
    rs.StructureSetROISequence, rs.ROIContourSequence = [], []
    for number, (name, contours) in rois.items():
        roi, rc = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        rc.ReferencedROINumber, rc.ContourSequence = number, []
        for data in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints, c.ContourData = "CLOSED_PLANAR", len(data) // 3, data
            rc.ContourSequence.append(c)
        rs.StructureSetROISequence.append(roi)
        rs.ROIContourSequence.append(rc)
    _save(rs, folder / "rtstruct.dcm")


def smoke(out: Path) -> None:
    import pydicom

    from medetect.data.io import read_image
    from medetect.organs.data import read_boxes_csv

    _write_synthetic_rt(out / "dicom")
    off = onkodicom(out / "dicom", out / "folder", case="smoke")
    assert off == {"LUNG_L": 0, "LUNG_R": 0, "LIVER": 2, "HEART": 0, "SPINALCORD": 0}, off
    lab, vol = (read_image(out / "folder" / s / "smoke.nii.gz") for s in ("labels", "volumes"))
    assert lab.geometry == vol.geometry and vol.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert vol.array[0, :, 0, 0].tolist() == [0, 10, 20, 30]
    # liver: rows 4-8 x columns 3-6 = 20 voxels on slices 1, 2; heart: rows 9-14 x columns 9-14 = 36 voxels on slice
    # 2, 36 - 4 (the hole: rows 11-12 x columns 11-12) = 32 on slice 3
    counts = np.bincount(lab.array[0].reshape(-1), minlength=52)
    assert (counts[5], counts[51], counts.sum()) == (40, 68, 16 * 16 * 4), counts[np.flatnonzero(counts)]
    assert lab.array[0, 3, 11:13, 11:13].sum() == 0 and lab.array[0, 3, 10, 10] == 51
    # world box: voxel edges, x = -10 + (col - 0.5), y = 20 + 2 (row - 0.5), z = -5 + 2.5 (slice - 0.5)
    rows = [tuple(r.values()) for r in read_boxes_csv(out / "folder" / "boxes.csv")]
    assert rows == [("smoke", "liver", 5, -7.5, 27.0, -3.75, -3.5, 37.0, 1.25, 1, 4, 3, 3, 9, 7, 40, 0),
                    ("smoke", "heart", 51, -1.5, 37.0, -1.25, 4.5, 49.0, 3.75, 2, 9, 9, 4, 15, 15, 68, 1)], rows
    assert json.loads((out / "folder" / "label_tables.json").read_text()) == {"smoke": {"5": "liver", "51": "heart"}}
    # the user mistakes, each one sentence: another frame of reference, no RTSTRUCT, no folder
    def refused(folder: Path, says: str) -> None:
        try:
            onkodicom(folder, out / "unused")
        except UserError as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"{folder}: no error")

    rs = pydicom.dcmread(out / "dicom" / "rtstruct.dcm")
    rs.FrameOfReferenceUID = "1.2.3"
    rs.save_as(out / "dicom" / "rtstruct.dcm")
    refused(out / "dicom", "FrameOfReferenceUID")
    (out / "dicom" / "rtstruct.dcm").unlink()
    refused(out / "dicom", "RTSTRUCT")
    refused(out / "missing", "no such folder")
    print(f"smoke: ok ({out})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="synthetic 4-slice CT + RTSTRUCT through `onkodicom`, checked "
                                                         "voxel by voxel (seconds)")
    ap.add_argument("--out", type=Path, help="the organ-ct-sample folder (smoke: a work folder, default a new "
                                             "temporary one)")
    sub = ap.add_subparsers(dest="command")
    p = sub.add_parser("onkodicom", help="OnkoDICOM DICOM-RT-02: CT + RTSTRUCT -> onkodicom_rt02_thorax")
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("gstt", help="TotalSegmentator-AIDE rtstructwriter: CT + masks -> gstt_aide_chest_covid_s82_100")
    p.add_argument("dcm_dir", type=Path)
    p.add_argument("seg_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not a.smoke and a.command is None:
        ap.error("a command is required (onkodicom, gstt) or --smoke")
    from medetect.data.image import MedicalImageError

    try:
        if a.smoke:
            smoke(a.out or Path(tempfile.mkdtemp(prefix="medetect_smoke_organ_validation_")))
        elif a.command == "onkodicom":
            onkodicom(a.dicom_dir, a.out)
        else:
            gstt(a.dcm_dir, a.seg_dir, a.out)
    except (UserError, MedicalImageError) as e:
        print(f"organ_validation_ct: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
