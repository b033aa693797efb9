"""Tests for medetect.data.datasets: DetectionDataset / PatchDataset on synthetic files, the ready loaders on the shared
datasets, a batch through detection_collate, and experiment.build_dataset for the BCCD config."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medetect.convert import Geometry, voxel_to_world
from medetect.data import transforms as T
from medetect.data.annotations import ImageAnnotation
from medetect.data.datasets import (
    BCCD_CLASSES,
    DetectionDataset,
    PatchDataset,
    bccd,
    dsb2018,
    lung_pet_ct_dx,
    mini_mias,
)
from medetect.data.image import MedicalImage
from medetect.data.io import read_image, write_image
from medetect.engine.trainer import detection_collate

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cell", "blob")


# ============================================================================================ helpers


def _png(folder: Path, name: str, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, size=(c, h, w), dtype=np.uint8)
    write_image(MedicalImage(arr, Geometry.identity(2)), folder / name)
    return arr


def _mhd(folder: Path, name: str, shape, spacing=(2.5, 0.7, 0.8), seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(-1000, 1000, size=(1, *shape), dtype=np.int16)
    write_image(MedicalImage(arr, Geometry(spacing, (-10.0, 5.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))), folder / name)
    return arr


@pytest.fixture
def files2d(tmp_path):
    """Two RGB PNGs (one with 2 boxes, one negative) and a grey one, with their records."""
    a = _png(tmp_path, "a.png", 40, 60, seed=1)
    b = _png(tmp_path, "b.png", 40, 60, seed=2)
    (tmp_path / "sub").mkdir()
    g = _png(tmp_path, "sub/g.png", 30, 20, c=1, seed=3)
    recs = [
        ImageAnnotation("a.png", [[2, 3, 10, 20], [15, 30, 39, 59]], ["blob", "cell"], image_shape=(40, 60)),
        ImageAnnotation("b.png", np.zeros((0, 4)), [], image_shape=(40, 60)),
        ImageAnnotation("sub/g.png", [[0, 0, 30, 20]], ["cell"]),
    ]
    return tmp_path, recs, [a, b, g]


class _CountingReader:
    def __init__(self):
        self.calls: list[Path] = []

    def __call__(self, path):
        self.calls.append(Path(path))
        return read_image(path)


# ============================================================================================ DetectionDataset


def test_detection_dataset_2d_png(files2d):
    root, recs, arrays = files2d
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES)
    assert len(ds) == 3 and ds.num_boxes == 3
    s = ds[0]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 40, 60)
    assert torch.equal(s["image"], torch.from_numpy(arrays[0]).float())
    assert torch.equal(s["boxes"], torch.tensor([[2, 3, 10, 20], [15, 30, 39, 59]], dtype=torch.float32))
    assert s["labels"].tolist() == [1, 0]  # indices into classes
    assert s["box_ids"].tolist() == [0, 1]
    assert s["spacing"] == (1.0, 1.0) and s["image_id"] == "a.png"
    g = ds[2]
    assert g["image"].shape == (1, 30, 20) and torch.equal(g["image"][0], torch.from_numpy(arrays[2][0]).float())


def test_detection_dataset_3d_mhd(tmp_path):
    vol = _mhd(tmp_path, "ct.mhd", (6, 10, 12))
    rec = ImageAnnotation("ct.mhd", [[1, 2, 3, 4, 8, 9]], ["blob"], image_shape=(6, 10, 12))
    neg = ImageAnnotation("ct.mhd", np.zeros((0, 6)), [], image_shape=(6, 10, 12))
    ds = DetectionDataset(records=[rec, neg], root=tmp_path, classes=CLASSES)
    s = ds[0]
    assert s["image"].shape == (1, 6, 10, 12) and s["image"].dtype == torch.float32
    assert torch.equal(s["image"], torch.from_numpy(vol).float())
    assert s["spacing"] == pytest.approx((2.5, 0.7, 0.8))
    assert s["boxes"].shape == (1, 6) and s["labels"].tolist() == [1]
    n = ds[1]  # negative 3D volume
    assert n["boxes"].shape == (0, 6) and n["labels"].shape == (0,) and n["box_ids"].shape == (0,)


def test_negative_images_are_samples(files2d):
    root, recs, _ = files2d
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, transform=T.RandomFlip(axes=(-1,), p=1.0))
    s = ds[1]
    assert s["boxes"].shape == (0, 4) and s["boxes"].dtype == torch.float32
    assert s["labels"].shape == (0,) and s["labels"].dtype == torch.long
    assert s["image"].shape == (3, 40, 60)


def test_transform_is_applied(files2d):
    root, recs, arrays = files2d
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, transform=T.RandomFlip(axes=(-1,), p=1.0))
    s = ds[0]
    assert torch.equal(s["image"], torch.from_numpy(arrays[0]).float().flip(-1))
    assert s["boxes"][0].tolist() == [2, 60 - 20, 10, 60 - 3]


def test_unknown_label_raises_naming_image(files2d):
    root, recs, _ = files2d
    recs = recs + [ImageAnnotation("b.png", [[0, 0, 5, 5]], ["tumour"])]
    with pytest.raises(ValueError, match=r"b\.png.*tumour"):
        DetectionDataset(records=recs, root=root, classes=CLASSES)


@pytest.mark.parametrize("rel", ["../outside.png", "sub/../../outside.png"])
def test_path_escaping_root_raises(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    _png(tmp_path, "outside.png", 8, 8)  # exists, but outside the root
    ds = DetectionDataset(records=[ImageAnnotation(rel, np.zeros((0, 4)), [])], root=root, classes=CLASSES)
    with pytest.raises(ValueError, match="leaves the dataset root"):
        ds[0]


def test_symlinked_folder_inside_root_loads(tmp_path):
    """A folder the user symlinked into the dataset root belongs to it: the check is on the annotation's path, not
    on where links lead. A ``..`` path is still refused even when it would land inside the linked folder."""
    elsewhere = tmp_path / "storage" / "scans"
    elsewhere.mkdir(parents=True)
    arr = _png(elsewhere, "x.png", 12, 16, seed=4)
    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(elsewhere, target_is_directory=True)
    rec = ImageAnnotation("images/x.png", [[1, 2, 5, 9]], ["cell"], image_shape=(12, 16))
    s = DetectionDataset(records=[rec], root=root, classes=CLASSES)[0]
    assert torch.equal(s["image"], torch.from_numpy(arr).float())
    assert s["boxes"].tolist() == [[1, 2, 5, 9]]
    _png(tmp_path, "x.png", 8, 8)
    for rel in ("../x.png", "images/../../x.png"):
        ds = DetectionDataset(records=[ImageAnnotation(rel, np.zeros((0, 4)), [])], root=root, classes=CLASSES)
        with pytest.raises(ValueError, match="leaves the dataset root"):
            ds[0]


def test_absolute_path_outside_root_raises(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _png(tmp_path, "outside.png", 8, 8)
    ds = DetectionDataset(records=[ImageAnnotation(str(tmp_path / "outside.png"), np.zeros((0, 4)), [])], root=root,
                          classes=CLASSES)
    with pytest.raises(ValueError, match="leaves the dataset root"):
        ds[0]


def test_shape_mismatch_raises(files2d):
    root, _, _ = files2d
    rec = ImageAnnotation("a.png", [[0, 0, 5, 5]], ["cell"], image_shape=(40, 61))
    ds = DetectionDataset(records=[rec], root=root, classes=CLASSES)
    with pytest.raises(ValueError, match=r"a\.png.*\(40, 61\).*\(40, 60\)"):
        ds[0]


def test_dimension_mismatch_raises(files2d):
    root, _, _ = files2d
    rec = ImageAnnotation("a.png", [[0, 0, 0, 2, 5, 5]], ["cell"])  # 3D boxes on a 2D picture
    ds = DetectionDataset(records=[rec], root=root, classes=CLASSES)
    with pytest.raises(ValueError, match=r"a\.png.*3D.*2D"):
        ds[0]


@pytest.mark.parametrize("cache", [True, False])
def test_cache_reads_each_file_once(files2d, cache):
    root, recs, _ = files2d
    reader = _CountingReader()
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, reader=reader, cache=cache)
    first = [ds[i]["image"].clone() for i in range(len(ds))]
    second = [ds[i]["image"] for i in range(len(ds))]
    assert len(reader.calls) == (3 if cache else 6)
    assert sorted(p.name for p in reader.calls[:3]) == ["a.png", "b.png", "g.png"]
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_cached_sample_is_not_corrupted_by_transforms(files2d):
    """Transforms return new tensors, so the cache stays intact across epochs of random augmentation."""
    root, recs, arrays = files2d
    tf = T.Compose([T.RandomIntensity(scale=(0.5, 1.5), shift=(-9.0, 9.0)), T.RandomFlip(p=0.5)])
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, transform=tf, cache=True)
    for _ in range(3):
        for i in range(len(ds)):
            ds[i]
    assert torch.equal(ds.raw_sample(0)["image"], torch.from_numpy(arrays[0]).float())


class _CountingScale:
    """A deterministic pre_transform (fixed half-size resize) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, sample, generator=None):
        self.calls += 1
        return T.scale(sample, 0.5)


def test_pre_transform_is_cached_and_equivalent(files2d):
    root, recs, _ = files2d
    reader, pre = _CountingReader(), _CountingScale()
    aug = T.Compose([T.RandomIntensity(scale=(0.8, 1.2), shift=(-5.0, 5.0)), T.RandomScale(range=(0.9, 1.1)),
                     T.RandomFlip(p=0.5)])
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, transform=aug, pre_transform=pre, cache=True,
                          reader=reader)
    ref = DetectionDataset(records=recs, root=root, classes=CLASSES, transform=T.Compose([pre, aug]))
    for _ in range(3):  # epochs
        for i in range(len(ds)):
            torch.manual_seed(i)
            a = ds[i]
            torch.manual_seed(i)
            b = ref[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
            assert a["image"].shape[1] in (18, 19, 20, 21, 22) or a["image"].shape[1] in range(13, 18)
    assert len(reader.calls) == 3  # the cached dataset read every file once...
    assert pre.calls == 3 + 3 * 3  # ...and resized it once (the reference resizes on every access)
    assert ds.prepared_sample(0)["image"].shape == (3, 20, 30)
    assert ds.raw_sample(0)["image"].shape == (3, 40, 60)  # raw_sample is still the file as read


@pytest.mark.parametrize("with_pre", [False, True])
def test_preload_fills_the_cache(files2d, with_pre):
    root, recs, _ = files2d
    reader, pre = _CountingReader(), (_CountingScale() if with_pre else None)
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES, reader=reader, cache=True, pre_transform=pre)
    assert ds.preload() is ds and len(reader.calls) == 3
    for i in range(len(ds)):
        ds[i]
    assert len(reader.calls) == 3 and (pre is None or pre.calls == 3)
    lazy = DetectionDataset(records=recs, root=root, classes=CLASSES, reader=_CountingReader())
    lazy.preload()  # cache=False: nothing to fill
    assert lazy.reader.calls == []


def test_images_mapping(tmp_path):
    """Records may point at images given in memory (or at paths outside the root, e.g. a DICOM folder)."""
    img = MedicalImage(np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4), Geometry.identity(3, (3.0, 1.0, 1.0)))
    _mhd(tmp_path, "elsewhere.mhd", (2, 3, 4))
    recs = [ImageAnnotation("p1", [[0, 0, 0, 1, 2, 2]], ["cell"]), ImageAnnotation("p2", np.zeros((0, 6)), [])]
    ds = DetectionDataset(records=recs, root=tmp_path / "none", classes=CLASSES,
                          images={"p1": img, "p2": tmp_path / "elsewhere.mhd"})
    assert ds[0]["image"].flatten().tolist() == list(range(24)) and ds[0]["spacing"] == (3.0, 1.0, 1.0)
    assert ds[1]["image"].shape == (1, 2, 3, 4)


# ============================================================================================ PatchDataset


def _patch_base(tmp_path, d: int, boxes) -> DetectionDataset:
    if d == 2:
        _png(tmp_path, "big.png", 200, 220, c=1)
        name, shape = "big.png", (200, 220)
    else:
        _mhd(tmp_path, "big.mhd", (40, 48, 56))
        name, shape = "big.mhd", (40, 48, 56)
    rec = ImageAnnotation(name, boxes, ["cell"] * len(boxes), image_shape=shape)
    return DetectionDataset(records=[rec], root=tmp_path, classes=CLASSES)


@pytest.mark.parametrize("d", [2, 3])
def test_patch_size(tmp_path, d):
    boxes = [[50, 60, 58, 70]] if d == 2 else [[10, 12, 14, 16, 20, 22]]
    size = (32, 48) if d == 2 else (16, 24, 20)
    ds = PatchDataset(_patch_base(tmp_path, d, boxes), patch_size=size, patches_per_volume=6,
                      patch_transform=T.RandomFlip(p=0.5))
    assert len(ds) == 6
    for i in range(len(ds)):
        p = ds[i]
        assert p["image"].shape == (1, *size) and p["image"].dtype == torch.float32
        assert p["boxes"].shape[1] == 2 * d
        assert ((p["boxes"][:, :d] >= 0) & (p["boxes"][:, d:] <= torch.tensor(size, dtype=torch.float32))).all()
        assert "dropped_box_ids" in p


def test_patch_larger_than_image_is_padded(tmp_path):
    base = _patch_base(tmp_path, 3, [[10, 12, 14, 16, 20, 22]])
    p = PatchDataset(base, patch_size=(64, 64, 64), patches_per_volume=1, pos_prob=1.0)[0]
    assert p["image"].shape == (1, 64, 64, 64) and p["boxes"].shape == (1, 6)


def test_patches_from_stored_dtype_equal_float_path(tmp_path):
    """Without a volume transform the int16 volume is cached as is and each patch converted after cropping: the
    patches are exactly those cropped from the float32 volume (padding included)."""
    base = _patch_base(tmp_path, 3, [[10, 12, 14, 16, 20, 22], [0, 0, 0, 40, 48, 56]])
    kw = dict(patch_size=(16, 64, 24), patches_per_volume=12, seed=5, patch_transform=T.RandomFlip(p=0.5))
    fast = PatchDataset(base, **kw)
    slow = PatchDataset(base, transform=T.Compose([]), **kw)  # any volume transform forces the float32 volume
    for i in range(len(fast)):
        a, b = fast[i], slow[i]
        assert a["image"].dtype == b["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["box_ids"], b["box_ids"]) and torch.equal(a["dropped_box_ids"], b["dropped_box_ids"])
    assert fast._vol[0][0]["image"].dtype == torch.int16 and slow._vol[0][0]["image"].dtype == torch.float32


@pytest.mark.parametrize("pos_prob", [0.0, 0.5, 1.0])
def test_positive_aware_sampling(tmp_path, pos_prob):
    """A small box in a large image: about pos_prob of the patches hold it (a uniform patch rarely does)."""
    base = _patch_base(tmp_path, 2, [[100, 120, 108, 128]])
    ds = PatchDataset(base, patch_size=(24, 24), patches_per_volume=400, pos_prob=pos_prob, seed=3)
    with_box = np.mean([len(ds[i]["boxes"]) > 0 for i in range(len(ds))])
    if pos_prob == 1.0:
        assert with_box == 1.0  # the box fits the patch: a positive crop always keeps it whole
    else:
        # uniform crops keep the 8x8 box with probability ~ (24 / 177) * (24 / 197) ~ 0.02
        assert pos_prob - 0.08 <= with_box <= pos_prob + 0.12, with_box


def test_positive_patch_keeps_whole_box(tmp_path):
    base = _patch_base(tmp_path, 3, [[10, 12, 14, 16, 20, 22]])
    ds = PatchDataset(base, patch_size=(16, 16, 16), patches_per_volume=20, pos_prob=1.0)
    for i in range(len(ds)):
        p = ds[i]
        lo = base.raw_sample(0)["boxes"][0, :3] - p["boxes"][0, :3]  # patch origin
        assert torch.equal(p["boxes"][0, 3:] - p["boxes"][0, :3], torch.tensor([6.0, 8.0, 8.0]))  # whole, unclipped
        assert (lo == lo.round()).all()


def test_patches_reproducible_and_vary_across_epochs(tmp_path):
    base = _patch_base(tmp_path, 3, [[10, 12, 14, 16, 20, 22], [30, 30, 30, 36, 40, 44]])
    make = lambda seed: PatchDataset(base, patch_size=(16, 16, 16), patches_per_volume=8, seed=seed,  # noqa: E731
                                     patch_transform=T.RandomFlip(p=0.5))
    a, b = make(7), make(7)
    for i in (0, 3, 7):
        pa, pb = a[i], b[i]
        assert torch.equal(pa["image"], pb["image"]) and torch.equal(pa["boxes"], pb["boxes"])
    # same index, same epoch again (after another epoch): identical
    ref = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(1)
    other = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(0)
    assert all(torch.equal(x, a[i]["image"]) for i, x in enumerate(ref))
    # a new epoch draws different patches (at least most of them)
    assert sum(not torch.equal(x, y) for x, y in zip(ref, other)) >= 6
    # a different seed too
    c = make(8)
    assert sum(not torch.equal(x, c[i]["image"]) for i, x in enumerate(ref)) >= 6


def test_patch_epoch_reaches_dataloader_workers(tmp_path):
    """set_epoch must change the patches that persistent DataLoader workers produce."""
    base = _patch_base(tmp_path, 2, [[100, 120, 108, 128]])
    ds = PatchDataset(base, patch_size=(24, 24), patches_per_volume=4, pos_prob=0.0, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True,
                                         collate_fn=detection_collate)
    per_epoch = []
    for e in range(2):
        ds.set_epoch(e)
        per_epoch.append(next(iter(loader))[0])
        ds.set_epoch(e)
        expected = torch.stack([ds[i]["image"] for i in range(4)])
        assert torch.equal(per_epoch[-1][:, :, :24, :24], expected)
    assert not torch.equal(per_epoch[0], per_epoch[1])


# ============================================================================================ collate


def test_detection_collate_pads_and_keeps_targets(files2d):
    root, recs, _ = files2d
    ds = DetectionDataset(records=recs, root=root, classes=CLASSES)
    samples = [ds[0], ds[1]]
    images, targets = detection_collate(samples)
    assert images.shape == (2, 3, 64, 64)  # 40x60 rounded up to 32
    assert torch.equal(images[0, :, :40, :60], samples[0]["image"]) and images[0, :, 40:].abs().sum() == 0
    assert [t["boxes"].shape[0] for t in targets] == [2, 0]
    assert targets[0]["image_id"] == "a.png" and "image" not in targets[0]


@pytest.mark.parametrize("mean,std,channels", [([0.5], [0.25], 3), ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3),
                                               ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 1)])
def test_experiment_rescale_values(mean, std, channels):
    """The normalisation step of experiment.build_transform: (x / max_value - mean) / std, input left untouched."""
    from medetect.detection.train import _Rescale

    x = torch.randint(0, 256, (channels, 5, 7), dtype=torch.uint8).float()
    before = x.clone()
    out = _Rescale(max_value=255.0, mean=mean, std=std)({"image": x})["image"]
    m = torch.tensor(mean).view(-1, 1, 1) if len(mean) > 1 else torch.tensor(mean)
    s = torch.tensor(std).view(-1, 1, 1) if len(std) > 1 else torch.tensor(std)
    assert torch.equal(out, (x / 255.0 - m) / s)
    assert torch.equal(x, before)


# ============================================================================================ shared datasets


def test_bccd_loader(shared_data):
    root = shared_data / "bccd"
    counts = {}
    for split, n_img, n_box in (("train", 205, 2804), ("val", 87, 1137)):
        ds = bccd(root, split)
        assert ds.classes == BCCD_CLASSES
        assert len(ds) == n_img and ds.num_boxes == n_box
        r = ds.report
        assert (r.images, r.read, r.skipped_zero_size) == (n_img, n_box, 1)  # one zero-area box per split, logged
        assert len(r.events) == 1 and "zero-area" in r.events[0][2]
        counts[split] = {r.image for r in ds.records}
    assert not counts["train"] & counts["val"]
    s = bccd(root, "val")[0]
    assert s["image"].shape == (3, 480, 640) and s["image"].dtype == torch.float32
    assert s["boxes"].shape[0] == s["labels"].shape[0] > 0
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 255
    assert set(s["labels"].tolist()) <= {0, 1, 2}


def test_dsb2018_loader(shared_data):
    root = shared_data / "dsb2018-nuclei"
    total = 0
    for split, n_img in (("train", 150), ("val", 39)):
        ds = dsb2018(root, split)
        assert len(ds) == n_img and ds.classes == ("nucleus",)
        total += ds.num_boxes
    assert total == 7812
    s = ds[0]
    h, w = s["image"].shape[1:]
    assert ds.records[0].image_shape == (h, w)
    assert s["boxes"].shape[0] == len(ds.records[0]) > 0 and (s["labels"] == 0).all()
    assert (s["boxes"][:, 2] <= h).all() and (s["boxes"][:, 3] <= w).all()


def test_mini_mias_negatives_and_all_located_lesions(shared_data):
    root = shared_data / "mini-mias"
    located: dict[str, list] = {}
    for row in csv.DictReader(open(root / "annotations.csv")):
        if row["has_location"] == "1":
            located.setdefault(row["image_id"], []).append([float(row[k]) for k in ("ymin", "xmin", "ymax", "xmax")])
    labels = {row["image_id"]: row["image_label"] for row in csv.DictReader(open(root / "images.csv"))}
    n_located = 0
    for split in ("train", "val"):
        ids = [l.strip() for l in open(root / f"{split}.txt") if l.strip()]
        ds = mini_mias(root, split)
        assert [Path(r.image).stem for r in ds.records] == ids  # every image of the split, in order
        assert ds.classes == ("lesion",)
        for ident, r in zip(ids, ds.records):
            want = sorted(located.get(ident, []))
            assert sorted(r.boxes.tolist()) == want, ident  # no located lesion dropped or moved
            if labels[ident] == "normal":
                assert len(r) == 0
        negatives = [i for i, r in enumerate(ds.records) if len(r) == 0]
        assert any(labels[ids[i]] == "normal" for i in negatives)
        n_located += ds.num_boxes
    assert n_located == sum(len(v) for v in located.values()) == 86
    s = ds[negatives[0]]  # a normal mammogram is a negative sample
    assert s["image"].shape == (1, 1024, 1024) and s["boxes"].shape == (0, 4)


def test_lung_pet_ct_dx_volumes(shared_data):
    root = shared_data / "lung-pet-ct-dx-sample"
    ds = lung_pet_ct_dx(root)
    assert len(ds) == 2 and ds.classes == ("A",)
    by_id = {r.image: i for i, r in enumerate(ds.records)}
    assert set(by_id) == {"Lung_Dx-A0001", "Lung_Dx-A0002"}
    expect = {"Lung_Dx-A0001": ((64, 512, 512), (5.0, 0.841796875, 0.841796875)),
              "Lung_Dx-A0002": ((30, 512, 512), (8.0, 0.646484375, 0.646484375))}
    for pid, i in by_id.items():
        shape, spacing = expect[pid]
        img = ds.image(i)
        assert img.array.dtype == np.int16 and img.spatial_shape == shape
        g, want = img.geometry, ds.records[i].meta["geometry"]  # geometry from volumes.json
        assert g.spacing == pytest.approx(spacing) and g.spacing == pytest.approx(want.spacing)
        assert g.origin == pytest.approx(want.origin, abs=1e-3)
        assert g.direction == pytest.approx(want.direction)
        s = ds[i]
        assert s["image"].shape == (1, *shape) and s["spacing"] == pytest.approx(spacing)
        b = s["boxes"]
        assert b.shape == (1, 6) and s["labels"].tolist() == [0]
        assert (b[:, :3] >= 0).all() and (b[:, 3:] <= torch.tensor(shape, dtype=torch.float32)).all()
        assert (b[:, 3:] > b[:, :3]).all()
        # the tumour lies inside the body: HU in the box well above air
        z0, y0, x0, z1, y1, x1 = (int(v) for v in b[0])
        assert float(s["image"][0, z0:z1, y0:y1, x0:x1].mean()) > -700
        # the box centre lands on the CSV's world centre (within a voxel; in-plane maxima read as exclusive)
        ctr = voxel_to_world(((b[0, :3] + b[0, 3:]) / 2).double(), g)
        assert np.allclose(ctr.numpy(), ds.records[i].meta["centre_xyz_mm"][0],
                           atol=max(spacing) / 2 + 1e-6)
    assert ds.image(by_id["Lung_Dx-A0002"]).meta["format"].lower().startswith("dicom")


def test_bccd_batch_through_collate(shared_data):
    ds = bccd(shared_data / "bccd", "val", transform=T.Compose([T.RandomFlip(p=0.5)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 480, 640) and images.dtype == torch.float32
    assert len(targets) == 4
    for t, rec in zip(targets, ds.records[:4]):
        assert t["boxes"].shape == (len(rec), 4) and t["labels"].shape == (len(rec),)
        assert t["image_id"] == rec.image


def test_build_dataset_bccd_config(shared_data):
    from medetect.config import load_config
    from medetect.detection.train import build_dataset, build_transform

    cfg = load_config(REPO / "configs" / "bccd_faster_rcnn.yaml")
    cfg.data.root = str(shared_data / "bccd")
    assert cfg.data.scale == 0.5
    val = build_dataset(cfg.data, "val", train=False)
    assert len(val) == 87 and val.classes == BCCD_CLASSES
    raw = bccd(shared_data / "bccd", "val")
    for i in (0, 5):
        s, r = val[i], raw[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 240, 320)
        assert torch.allclose(s["boxes"], r["boxes"] * 0.5)
        assert torch.equal(s["labels"], r["labels"])
        # intensities: half-size resample of x / 255, normalised with mean 0.5, std 0.25
        half = T.scale(r, 0.5)["image"]
        assert torch.allclose(s["image"], (half / 255.0 - 0.5) / 0.25, atol=1e-5)
        assert -2.0 - 1e-5 <= float(s["image"].min()) and float(s["image"].max()) <= 2.0 + 1e-5
        assert abs(float(s["image"].mean())) < 1.5
    # the dataset (resize cached as pre_transform) gives exactly the whole pipeline of build_transform
    full = build_transform(cfg.data, train=True)
    aug = build_dataset(cfg.data, "val", train=True)
    for i in (0, 1, 0):
        torch.manual_seed(i)
        a = aug[i]
        torch.manual_seed(i)
        b = full(raw.raw_sample(i))
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    train = build_dataset(cfg.data, "train", train=True)
    assert len(train) == 205
    t = train[0]
    h, w = t["image"].shape[1:]
    assert 240 * 0.85 - 1 <= h <= 240 * 1.15 + 1 and 320 * 0.85 - 1 <= w <= 320 * 1.15 + 1
    assert t["boxes"].shape[0] > 0 and (t["boxes"][:, 2] <= h).all() and (t["boxes"][:, 3] <= w).all()
