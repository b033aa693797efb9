"""Readers/writers of medetect.data.io on synthetic files of every format, plus checks against the shared datasets."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from medetect.convert import Geometry, voxel_to_world, world_to_voxel
from medetect.data import MedicalImage, MedicalImageError, read_image, write_image
from medetect.data.io import read_dicom_series

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ============================================================================================ helpers


def _rot(ax: np.ndarray, deg: float) -> np.ndarray:
    """3x3 rotation about unit axis ``ax`` (Rodrigues)."""
    ax = ax / np.linalg.norm(ax)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _save_dicom(ds: FileDataset, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    series_uid: str = "1.2.3.4.5",
    ipp=(0.0, 0.0, 0.0),
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing=(0.7, 0.6),
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    instance: int = 1,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = (40.0, 400.0),
) -> Path:
    """A minimal single-frame CT-like DICOM file (uint16 stored, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "SYNTH-1"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.0
    ds.ConvolutionKernel = "B30f"
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if pixels is not None:
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.PixelData = pixels.astype("<u2").tobytes()
    else:
        ds.Rows, ds.Columns = 4, 5
    _save_dicom(ds, path)
    return path


def _slice_pixels(k: int, shape=(6, 7)) -> np.ndarray:
    """Stored values that identify slice k (before rescale)."""
    r, c = np.indices(shape)
    return (1000 + 100 * k + r * 10 + c).astype(np.uint16)


def make_series(folder: Path, n: int = 5, *, positions=None, series_uid="1.2.3.4.5", prefix="s", **kw):
    """An oblique series whose files are named and numbered in shuffled order.

    Returns (origin, row, col, normal, step, file names in position order).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rot = _rot(np.array([1.0, 2.0, 0.5]), 25.0)
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    step = 2.5
    pos = positions if positions is not None else [k * step for k in range(n)]
    origin = np.array([-100.0, 50.0, 30.0])
    rng = random.Random(0)
    file_ids = list(range(len(pos)))
    rng.shuffle(file_ids)
    instances = list(range(1, len(pos) + 1))
    rng.shuffle(instances)
    for k, d in enumerate(pos):
        make_dicom(
            folder / f"{prefix}{file_ids[k]}.dcm", _slice_pixels(k), series_uid=series_uid,
            ipp=origin + d * normal, iop=np.concatenate([row, col]), instance=instances[k], **kw,
        )
    return origin, row, col, normal, step, [f"{prefix}{i}.dcm" for i in file_ids]


# ============================================================================================ MedicalImage


def test_medical_image_properties_and_validation():
    arr = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(1, 2, 3, 4)
    im = MedicalImage(arr, Geometry.identity(3, (2.0, 1.0, 0.5)), {"modality": "CT"}, None)
    assert im.ndim == 3 and im.spatial_shape == (2, 3, 4) and im.num_channels == 1
    assert im.spacing == (2.0, 1.0, 0.5)
    t = im.to_tensor()
    assert t.dtype == torch.float32 and t.shape == (1, 2, 3, 4) and float(t[0, 1, 2, 3]) == 23.0
    assert im.to_tensor(None).dtype == torch.int32  # uint16 widened, values kept
    assert "shape=(1, 2, 3, 4)" in repr(im)
    with pytest.raises(MedicalImageError, match=r"'/some/file.nii'.*spatial axes"):
        MedicalImage(arr[0], Geometry.identity(3), path="/some/file.nii")
    with pytest.raises(MedicalImageError, match="empty axis"):
        MedicalImage(np.zeros((1, 0, 3)), Geometry.identity(2))
    with pytest.raises(MedicalImageError, match="Geometry"):
        MedicalImage(arr, None)  # type: ignore[arg-type]


# ============================================================================================ Pillow formats


def test_png_8bit_gray_rgb_rgba(tmp_path):
    g = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    Image.fromarray(g).save(tmp_path / "g.png")
    im = read_image(tmp_path / "g.png")
    assert im.array.shape == (1, 12, 10) and im.array.dtype == np.uint8
    np.testing.assert_array_equal(im.array[0], g)
    assert im.geometry == Geometry.identity(2) and im.meta["photometric"] == "MONOCHROME2"

    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    im = read_image(tmp_path / "c.png")
    assert im.array.shape == (3, 12, 10)
    np.testing.assert_array_equal(im.array, np.moveaxis(rgb, -1, 0))

    rgba = np.concatenate([rgb, np.full((12, 10, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = read_image(tmp_path / "a.png")
    assert im.array.shape == (3, 12, 10) and im.meta["alpha_dropped"] is True
    np.testing.assert_array_equal(im.array, np.moveaxis(rgb, -1, 0))


def test_png_16bit_roundtrip(tmp_path):
    a = np.array([[0, 65535, 1000], [3, 40000, 12]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    im = read_image(tmp_path / "d.png")
    assert im.array.dtype == np.uint16
    np.testing.assert_array_equal(im.array[0], a)
    write_image(im, tmp_path / "e.png")
    np.testing.assert_array_equal(read_image(tmp_path / "e.png").array, im.array)
    with pytest.raises(MedicalImageError, match="e2.png.*uint8"):
        write_image(MedicalImage(a[None].astype(np.int16), Geometry.identity(2)), tmp_path / "e2.png")


def test_jpeg_rgb(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[4:12, 6:18, 1] = 150
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    im = read_image(tmp_path / "x.jpg")
    assert im.array.shape == (3, 16, 24) and im.array.dtype == np.uint8
    assert np.abs(im.array.astype(int) - np.moveaxis(rgb, -1, 0)).mean() < 6  # lossy


@pytest.mark.parametrize("maxval", [255, 100, 4095, 65535])
def test_pgm_p5_handwritten(tmp_path, maxval):
    rng = np.random.default_rng(maxval)
    a = rng.integers(0, maxval + 1, size=(5, 7))
    a[0, 0], a[-1, -1] = 0, maxval
    body = a.astype(np.uint8).tobytes() if maxval < 256 else a.astype(">u2").tobytes()
    (tmp_path / "m.pgm").write_bytes(b"P5\n# a comment\n7 5\n" + str(maxval).encode() + b"\n" + body)
    im = read_image(tmp_path / "m.pgm")
    assert im.array.dtype == (np.uint8 if maxval < 256 else np.uint16)
    assert im.meta["maxval"] == maxval
    np.testing.assert_array_equal(im.array[0], a)  # raw sample values, not Pillow's rescaled ones


def test_tiff_uint16_and_rgb(tmp_path):
    a = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.tif")
    im = read_image(tmp_path / "a.tif")
    assert im.array.dtype == np.uint16
    np.testing.assert_array_equal(im.array[0], a)
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "b.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "b.tiff").array, np.moveaxis(rgb, -1, 0))


def test_bad_pillow_files_name_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png" * 20)
    with pytest.raises(MedicalImageError, match="garbage.png"):
        read_image(tmp_path / "garbage.png")
    g = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match=r"trunc\.png.*(truncated|decode)"):
        read_image(tmp_path / "trunc.png")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "x.xyz").write_bytes(b"hello")
    with pytest.raises(MedicalImageError, match=r"x\.xyz.*unsupported extension '\.xyz'"):
        read_image(tmp_path / "x.xyz")
    im = MedicalImage(np.zeros((1, 2, 2), np.uint8), Geometry.identity(2))
    with pytest.raises(MedicalImageError, match="cannot write extension"):
        write_image(im, tmp_path / "y.bmp")


# ============================================================================================ SimpleITK formats


def _oblique_geometry() -> Geometry:
    d = _rot(np.array([0.3, -1.0, 0.7]), 35.0)
    return Geometry((2.5, 0.8, 0.6), (-120.5, 33.0, 210.25), tuple(d.reshape(-1)))


@pytest.mark.parametrize("ext", [".mhd", ".mha", ".nii", ".nii.gz"])
def test_sitk_roundtrip_geometry(tmp_path, ext):
    arr = np.random.default_rng(1).integers(-1024, 2000, (1, 4, 5, 6)).astype(np.int16)
    im = MedicalImage(arr, _oblique_geometry(), {}, None)
    p = write_image(im, tmp_path / f"v{ext}")
    back = read_image(p)
    assert back.array.dtype == np.int16 and back.array.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.spacing, im.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, im.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction, im.geometry.direction, atol=1e-5)
    if ext == ".mhd":
        assert (tmp_path / "v.raw").is_file()


def test_mhd_voxel_world_roundtrip_matches_sitk(tmp_path):
    """Array-order edge coordinates -> world agrees with SimpleITK's continuous index convention."""
    arr = np.zeros((1, 7, 9, 11), np.float32)
    p = write_image(MedicalImage(arr, _oblique_geometry()), tmp_path / "w.mhd")
    im = read_image(p)
    ref = sitk.ReadImage(str(p))
    coords = np.random.default_rng(3).uniform(0, [7, 9, 11], size=(20, 3))
    world = voxel_to_world(coords, im.geometry)
    expect = [ref.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in (c[::-1] - 0.5))) for c in coords]
    np.testing.assert_allclose(world, np.array(expect), atol=1e-6)
    np.testing.assert_allclose(world_to_voxel(world, im.geometry), coords, atol=1e-9)


def test_sitk_vector_pixels_become_channels(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    img = sitk.GetImageFromArray(rgb, isVector=True)
    img.SetSpacing((0.5, 0.25))
    sitk.WriteImage(img, str(tmp_path / "rgb.mha"))
    im = read_image(tmp_path / "rgb.mha")
    assert im.array.shape == (3, 5, 6) and im.spacing == (0.25, 0.5)
    np.testing.assert_array_equal(im.array, np.moveaxis(rgb, -1, 0))
    # and back through the writer
    write_image(im, tmp_path / "rgb2.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb2.nii.gz").array, im.array)


def test_mhd_missing_or_truncated_raw(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(1, 3, 4, 5)
    p = write_image(MedicalImage(arr, Geometry.identity(3)), tmp_path / "m.mhd")
    raw = tmp_path / "m.raw"
    data = raw.read_bytes()
    raw.write_bytes(data[:-10])
    with pytest.raises(MedicalImageError, match=r"m\.raw.*truncated.*120 bytes.*110"):
        read_image(p)
    raw.unlink()
    with pytest.raises(MedicalImageError, match=r"m\.mhd.*m\.raw.*does not exist"):
        read_image(p)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_truncated(tmp_path, ext):
    p = write_image(MedicalImage(np.ones((1, 6, 10, 10), np.float32), Geometry.identity(3)), tmp_path / f"v{ext}")
    data = p.read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match=rf"cut{ext.replace('.', '[.]')}.*truncated"):
        read_image(tmp_path / f"cut{ext}")


def test_nifti_4d_refused_and_corrupt(tmp_path):
    img = sitk.Image([3, 3, 3, 2], sitk.sitkFloat32)
    sitk.WriteImage(img, str(tmp_path / "t4.nii"))
    with pytest.raises(MedicalImageError, match=r"t4\.nii.*4D"):
        read_image(tmp_path / "t4.nii")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 50)
    with pytest.raises(MedicalImageError, match=r"bad\.nii\.gz"):
        read_image(tmp_path / "bad.nii.gz")


# ============================================================================================ npz


def test_npz_layout_roundtrip(tmp_path):
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.8, -0.6])
    arr = np.random.default_rng(4).integers(-1024, 3000, (3, 4, 5)).astype(np.int16)
    np.savez(tmp_path / "v.npz", image=arr, spacing_zyx=np.array([5.0, 0.8, 0.8]),
             origin_xyz=np.array([-10.0, 20.0, -300.0]), orientation=np.concatenate([row, col]))
    im = read_image(tmp_path / "v.npz")
    assert im.array.shape == (1, 3, 4, 5) and im.array.dtype == np.int16
    d = np.asarray(im.geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(d[:, 0], row)
    np.testing.assert_allclose(d[:, 1], col)
    np.testing.assert_allclose(d[:, 2], np.cross(row, col))
    assert im.geometry.spacing == (5.0, 0.8, 0.8) and im.geometry.origin == (-10.0, 20.0, -300.0)
    write_image(im, tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as z:
        assert sorted(z.files) == ["image", "orientation", "origin_xyz", "spacing_zyx"]
        np.testing.assert_array_equal(z["image"], arr)
    back = read_image(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.array, im.array)
    assert back.geometry == im.geometry
    (tmp_path / "broken.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:50])
    with pytest.raises(MedicalImageError, match="broken.npz"):
        read_image(tmp_path / "broken.npz")


@pytest.mark.parametrize("ext", [".png", ".npz", ".mha", ".nii"])
def test_2d_rgb_write_roundtrip(tmp_path, ext):
    arr = np.random.default_rng(5).integers(0, 256, (3, 5, 6), dtype=np.uint8)
    geom = Geometry((0.5, 0.25), (1.0, -2.0), (0.0, -1.0, 1.0, 0.0))
    back = read_image(write_image(MedicalImage(arr, geom), tmp_path / f"rgb{ext}"))
    np.testing.assert_array_equal(back.array, arr)
    if ext == ".png":
        assert back.geometry == Geometry.identity(2)  # PNG stores no geometry
    else:
        np.testing.assert_allclose(back.spacing, geom.spacing)
        np.testing.assert_allclose(back.geometry.origin, geom.origin, atol=1e-6)
        np.testing.assert_allclose(back.geometry.direction, geom.direction, atol=1e-6)


# ============================================================================================ DICOM single file


def test_dicom_single_rescale_spacing_meta(tmp_path):
    px = _slice_pixels(0)
    p = make_dicom(tmp_path / "one.dcm", px, spacing=(0.7, 0.6), ipp=(1, 2, 3))
    im = read_image(p)
    assert im.ndim == 2 and im.array.dtype == np.int16
    np.testing.assert_array_equal(im.array[0], px.astype(np.int32) - 1024)
    assert im.spacing == (0.7, 0.6)
    assert im.meta["modality"] == "CT" and im.meta["kernel"] == "B30f" and im.meta["ipp"] == [1.0, 2.0, 3.0]
    assert im.meta["windows"] == [(40.0, 400.0)]
    # non-integer slope -> float32
    p2 = make_dicom(tmp_path / "half.dcm", px, slope=0.5, intercept=-10.0)
    im2 = read_image(p2)
    assert im2.array.dtype == np.float32
    np.testing.assert_allclose(im2.array[0], px * 0.5 - 10.0)
    # a UID-named file without a DICOM suffix is sniffed by its preamble
    uid_name = tmp_path / "1.2.826.0.1.3680043.2"
    uid_name.write_bytes(p.read_bytes())
    np.testing.assert_array_equal(read_image(uid_name).array, im.array)


def test_dicom_voi_window(tmp_path):
    px = np.array([[1024 - 200, 1024 + 40, 1024 + 1000]], dtype=np.uint16)  # HU -200, 40, 1000
    p = make_dicom(tmp_path / "w.dcm", px, window=(40.0, 400.0))
    im = read_image(p, voi="window")
    assert im.array.dtype == np.float32
    np.testing.assert_allclose(im.array[0, 0], [0.0, 0.5, 1.0], atol=2e-3)
    with pytest.raises(MedicalImageError, match=r"nowin\.dcm.*WindowCenter"):
        read_image(make_dicom(tmp_path / "nowin.dcm", px, window=None), voi="window")


def test_dicom_voi_lut_and_auto(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    px = np.array([[0, 1, 2, 3, 9]], dtype=np.uint16)
    p = make_dicom(tmp_path / "lut.dcm", px, slope=None, intercept=None, window=None)
    ds = pydicom.dcmread(p)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUTDescriptor: 4 entries, first input 0, 8 bits
    item.add_new(0x00283006, "US", [0, 85, 170, 255])  # LUTData
    ds.VOILUTSequence = Sequence([item])
    _save_dicom(ds, tmp_path / "lut2.dcm")
    for voi in ("lut", "auto"):
        im = read_image(tmp_path / "lut2.dcm", voi=voi)
        np.testing.assert_allclose(im.array[0, 0], [0, 1 / 3, 2 / 3, 1, 1], atol=1e-6)
    assert read_image(p, voi="auto").array.dtype == np.uint16  # nothing to apply: stored values
    with pytest.raises(MedicalImageError, match=r"lut\.dcm.*VOI LUT Sequence"):
        read_image(p, voi="lut")
    with pytest.raises(ValueError, match="voi must be one of"):
        read_image(p, voi="soft")


def test_dicom_monochrome1_inverted(tmp_path):
    px = np.array([[0, 100, 4095]], dtype=np.uint16)
    p = make_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", slope=None, intercept=None, bits_stored=12)
    im = read_image(p)
    assert im.array.dtype == np.uint16 and im.meta["inverted"] is True
    np.testing.assert_array_equal(im.array[0], [[4095, 3995, 0]])  # bright = dense
    w = read_image(p, voi="window")  # window in stored units: centre 40 width 400 -> stored 0 maps to white
    assert w.array[0, 0, 0] > 0.5 and w.array[0, 0, 2] == 0.0


def test_dicom_multiframe(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.stack([_slice_pixels(k) for k in range(3)])
    p = make_dicom(tmp_path / "mf.dcm", frames, slope=1.0, intercept=0.0)
    im = read_image(p)  # no per-frame positions: stored order, approximate geometry
    assert im.array.shape == (1, 3, 6, 7) and im.array.dtype == np.uint16
    assert im.meta["frame_geometry"] == "approximate" and im.spacing == (2.0, 0.7, 0.6)
    np.testing.assert_array_equal(im.array[0], frames)

    # enhanced-style per-frame positions stored in reverse order: frames are sorted along the normal
    ds = pydicom.dcmread(p)
    per = []
    for z in (20.0, 17.0, 14.0):
        pos = Dataset()
        pos.ImagePositionPatient = [5.0, 6.0, z]
        item = Dataset()
        item.PlanePositionSequence = Sequence([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    _save_dicom(ds, tmp_path / "mf2.dcm")
    im2 = read_image(tmp_path / "mf2.dcm")
    np.testing.assert_array_equal(im2.array[0], frames[::-1])
    assert im2.spacing == (3.0, 0.7, 0.6) and im2.geometry.origin == (5.0, 6.0, 14.0)


def test_dicom_without_pixel_data(tmp_path):
    p = make_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(MedicalImageError, match=r"nopix\.dcm.*no pixel data"):
        read_image(p)


def test_dicom_truncated_and_garbage(tmp_path):
    p = make_dicom(tmp_path / "full.dcm", _slice_pixels(0, (32, 32)))
    data = p.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-200])
    with pytest.raises(MedicalImageError, match=r"cut\.dcm"):
        read_image(tmp_path / "cut.dcm")
    (tmp_path / "cut2.dcm").write_bytes(data[:300])
    with pytest.raises(MedicalImageError, match=r"cut2\.dcm"):
        read_image(tmp_path / "cut2.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(MedicalImageError, match=r"junk\.dcm"):
        read_image(tmp_path / "junk.dcm")


# ============================================================================================ DICOM series


def test_dicom_series_sorted_by_position_with_geometry(tmp_path):
    folder = tmp_path / "ser"
    origin, row, col, normal, step, _ = make_series(folder)
    (folder / "notes.txt").write_text("not a slice")
    im = read_image(folder)
    assert im.array.shape == (1, 5, 6, 7) and im.array.dtype == np.int16
    for k in range(5):  # slice k by position, whatever the file names / InstanceNumbers
        np.testing.assert_array_equal(im.array[0, k], _slice_pixels(k).astype(np.int32) - 1024)
    np.testing.assert_allclose(im.spacing, (step, 0.7, 0.6), rtol=1e-9)
    np.testing.assert_allclose(im.geometry.origin, origin, atol=1e-6)
    d = np.asarray(im.geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(d, np.stack([row, col, normal], axis=1), atol=1e-6)
    assert im.meta["skipped_files"] == ["notes.txt"] and im.meta["uniform_slices"] is True
    assert im.path == str(folder)

    # SimpleITK (GDCM sorts by position too) agrees on geometry and voxels
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    ref = sitk.ReadImage(files)
    np.testing.assert_allclose(Geometry.from_sitk(ref).spacing, im.spacing, rtol=1e-6)
    np.testing.assert_allclose(ref.GetOrigin(), im.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(ref.GetDirection(), im.geometry.direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), im.array[0])
    c = np.array([[2.5, 3.25, 4.75]])
    np.testing.assert_allclose(
        voxel_to_world(c, im.geometry)[0],
        ref.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[0][::-1] - 0.5)), atol=1e-4,
    )

    # a list of files gives the same volume
    listed = read_dicom_series(sorted(folder.glob("*.dcm"), reverse=True))
    np.testing.assert_array_equal(listed.array, im.array)
    assert listed.geometry == im.geometry


def test_dicom_series_gap(tmp_path):
    folder = tmp_path / "gap"
    names = make_series(folder, positions=[0.0, 2.5, 5.0, 10.0, 12.5])[-1]
    with pytest.raises(MedicalImageError, match="non-uniform slice spacing") as e:
        read_image(folder)
    msg = str(e.value)
    assert f"{names[2]}'" in msg and f"{names[3]}'" in msg and "step 5 mm" in msg  # the files around the gap
    assert sum(f"{n}'" in msg for n in names) == 2
    im = read_image(folder, allow_gaps=True)
    assert im.meta["uniform_slices"] is False and im.spacing[0] == pytest.approx(2.5)
    assert im.meta["slice_positions_mm"][3] - im.meta["slice_positions_mm"][0] == pytest.approx(10.0)


def test_dicom_series_mixed_and_pick(tmp_path):
    folder = tmp_path / "mix"
    make_series(folder, n=3, series_uid="1.2.3.111", prefix="a")
    make_series(folder, n=4, series_uid="1.2.3.222", prefix="b")
    with pytest.raises(MedicalImageError, match=r"mix 2 series.*1\.2\.3\.111 \(3 files.*1\.2\.3\.222 \(4 files"):
        read_image(folder)
    im = read_image(folder, series_uid="1.2.3.222")
    assert im.spatial_shape == (4, 6, 7) and im.meta["series_uid"] == "1.2.3.222"
    with pytest.raises(MedicalImageError, match="no slice has SeriesInstanceUID"):
        read_image(folder, series_uid="9.9")


def test_dicom_series_duplicates_orientation_missing_pixels(tmp_path):
    folder = tmp_path / "dup"
    make_series(folder, n=3)
    first = sorted(folder.glob("*.dcm"))[0]
    (folder / "copy.dcm").write_bytes(first.read_bytes())
    with pytest.raises(MedicalImageError, match=r"duplicate slice position.*dcm"):
        read_image(folder)

    folder2 = tmp_path / "orient"
    make_series(folder2, n=3)
    make_dicom(folder2 / "odd.dcm", _slice_pixels(0), ipp=(0, 0, 50), iop=(1, 0, 0, 0, 1, 0))
    with pytest.raises(MedicalImageError, match=r"inconsistent ImageOrientationPatient.*odd\.dcm"):
        read_image(folder2)

    folder3 = tmp_path / "nopix"
    make_series(folder3, n=3)
    make_dicom(folder3 / "empty.dcm", None, ipp=(0, 0, 99))
    with pytest.raises(MedicalImageError, match=r"empty\.dcm.*no pixel data"):
        read_image(folder3)

    folder4 = tmp_path / "shape"
    make_series(folder4, n=2)
    make_dicom(folder4 / "big.dcm", _slice_pixels(0, (8, 8)), ipp=(0, 0, 99))
    with pytest.raises(MedicalImageError, match=r"inconsistent slice shape.*big\.dcm"):
        read_image(folder4)


# ============================================================================================ shared datasets


def test_lung_pet_ct_dx_a0002_dicom_series(shared_data):
    root = shared_data / "lung-pet-ct-dx-sample"
    info = json.loads((root / "volumes.json").read_text())["Lung_Dx-A0002"]
    im = read_image(root / "dicom" / "Lung_Dx-A0002_B40f")
    assert im.array.dtype == np.int16 and list(im.spatial_shape) == info["shape_zyx"]
    vol = np.ascontiguousarray(im.array[0])
    assert hashlib.sha256(vol.tobytes()).hexdigest() == info["sha256_of_image_array"]
    assert int(vol.min()) == info["hu_min"] and int(vol.max()) == info["hu_max"]
    np.testing.assert_allclose(im.spacing, info["spacing_zyx_mm"])
    np.testing.assert_allclose(im.geometry.origin, info["origin_xyz_mm_LPS"])
    assert im.meta["sop_instance_uids"] == info["slice_sop_instance_uids"]
    assert im.meta["kernel"] == info["convolution_kernel"] and im.meta["series_uid"] == info["series_instance_uid"]
    # README: file 1-NN.dcm has InstanceNumber NN and k = 30 - NN
    assert Path(im.meta["files"][0]).name == "1-30.dcm" and Path(im.meta["files"][-1]).name == "1-01.dcm"


def test_lung_pet_ct_dx_a0001_npz(shared_data):
    root = shared_data / "lung-pet-ct-dx-sample"
    info = json.loads((root / "volumes.json").read_text())["Lung_Dx-A0001"]
    im = read_image(root / info["file"])
    assert im.array.dtype == np.int16 and list(im.spatial_shape) == info["shape_zyx"]
    np.testing.assert_allclose(im.spacing, info["spacing_zyx_mm"])
    np.testing.assert_allclose(im.geometry.origin, info["origin_xyz_mm_LPS"])
    np.testing.assert_allclose(im.geometry.direction, np.eye(3).reshape(-1))
    assert hashlib.sha256(np.ascontiguousarray(im.array[0]).tobytes()).hexdigest() == info["sha256_of_image_array"]
    # README world formula: Z = origin_z + k * sz (voxel centre k + 0.5 in edge coordinates)
    w = voxel_to_world(np.array([[10.5, 0.5, 0.5]]), im.geometry)[0]
    np.testing.assert_allclose(w, np.array(info["origin_xyz_mm_LPS"]) + [0, 0, 10 * info["spacing_zyx_mm"][0]])


def test_mini_mias_pgm_equals_png(shared_data):
    root = shared_data / "mini-mias"
    pgm = read_image(root / "pgm_samples" / "mdb028.pgm")
    png = read_image(root / "images" / "mdb028.png")
    assert pgm.array.shape == (1, 1024, 1024) and pgm.array.dtype == np.uint8 and pgm.meta["maxval"] == 255
    np.testing.assert_array_equal(pgm.array, png.array)


def test_bccd_jpeg_shape(shared_data):
    im = read_image(shared_data / "bccd" / "JPEGImages" / "BloodImage_00000.jpg")
    assert im.array.shape == (3, 480, 640) and im.array.dtype == np.uint8
