"""Organ localiser training data: the random warp / field-of-view / intensity augmentation keeps image and organ
boxes consistent, is reproducible by (seed, epoch, index), and the training set mixes real folders (repeated, cases
held out by name) with phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medetect.organs.augment import OrganAugmentConfig, augment_organ_volume, boxes_from_organ_map
from medetect.organs.config import OrganLocalisationConfig
from medetect.organs.data import read_organ_folder
from medetect.organs.localiser import OrganVolumes, training_cases
from medetect.organs.phantoms import write_organ_dataset

OFF = dict(scale=[1.0, 1.0], rotate_deg=0.0, elastic_mm=0.0, z_crop_p=0.0, gamma=[1.0, 1.0], contrast=0.0, blur=0.0,
           noise=0.0)


def _organ_map(shape=(12, 20, 18)):
    m = torch.zeros(shape, dtype=torch.uint8)
    m[2:7, 3:12, 4:9] = 1
    m[5:12, 10:18, 10:16] = 3
    m[0:4, 0:2, 15:18] = 2
    return m


def test_boxes_from_organ_map_match_a_slow_loop():
    rng = np.random.default_rng(0)
    m = torch.from_numpy(rng.integers(0, 5, size=(7, 9, 11)).astype(np.uint8) * (rng.random((7, 9, 11)) < 0.1))
    cls, boxes = boxes_from_organ_map(m, num_classes=6)
    expect = []
    for k in range(6):
        idx = np.argwhere(m.numpy() == k + 1)
        if len(idx):
            expect.append((k, [*idx.min(0), *(idx.max(0) + 1)]))
    assert cls.tolist() == [k for k, _ in expect]
    assert boxes.tolist() == [b for _, b in expect]


def test_augmentation_switched_off_returns_the_input():
    m = _organ_map()
    image = torch.rand(1, *m.shape)
    cls, boxes = boxes_from_organ_map(m, 4)
    g = torch.Generator().manual_seed(0)
    x, b, lab = augment_organ_volume(image, boxes, cls, m, (4.0, 4.0, 4.0), 4, OrganAugmentConfig(p=1.0, **OFF), g)
    assert torch.allclose(x, image, atol=1e-5)
    assert torch.equal(b, boxes) and torch.equal(lab, cls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warped_boxes_enclose_the_warped_organs(seed):
    m = _organ_map((16, 24, 24))
    image = m.float()[None] / 10  # each organ has its own intensity
    cls, boxes = boxes_from_organ_map(m, 4)
    cfg = OrganAugmentConfig(p=1.0, **{**OFF, "scale": [0.8, 1.2], "rotate_deg": 15.0, "elastic_mm": 8.0})
    x, b, lab = augment_organ_volume(image, boxes, cls, m, (4.0, 3.0, 3.0), 4,
                                     cfg, torch.Generator().manual_seed(seed))
    assert set(lab.tolist()) <= {0, 1, 2}
    for k, box in zip(lab.tolist(), b.long().tolist()):
        # voxels that carry only this organ's intensity (no blend with a neighbour) lie inside its box
        inside = (x[0] - (k + 1) / 10).abs() < 1e-4
        idx = torch.nonzero(inside)
        assert len(idx), k
        assert (idx.min(0).values >= torch.tensor(box[:3])).all() and (idx.max(0).values < torch.tensor(box[3:])).all()


def test_field_of_view_crop_without_a_label_map_clips_the_boxes():
    image = torch.rand(1, 20, 8, 8)
    boxes = torch.tensor([[0.0, 0, 0, 4, 8, 8], [6.0, 1, 1, 19, 7, 7]])
    labels = torch.tensor([0, 1])
    cfg = OrganAugmentConfig(p=1.0, **{**OFF, "z_crop_p": 1.0, "z_keep": [0.5, 0.5]})
    x, b, lab = augment_organ_volume(image, boxes, labels, None, (4.0, 4.0, 4.0), 2, cfg,
                                     torch.Generator().manual_seed(3))
    assert x.shape == (1, 10, 8, 8)
    assert (b[:, 0] >= 0).all() and (b[:, 3] <= 10).all() and (b[:, 3] - b[:, 0] >= 1).all()
    assert len(b) == len(lab) >= 1


def test_augment_config_ranges_are_checked():
    with pytest.raises(ValueError, match=r"augment.z_keep must be \[lo, hi\]"):
        OrganAugmentConfig(z_keep=[0.9, 0.4]).validate()


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("organ_folders")
    write_organ_dataset(root / "a", 2, 11, spacing_range=((6.0, 6.0), (6.0, 6.0)))
    write_organ_dataset(root / "b", 1, 21, spacing_range=((6.0, 6.0), (6.0, 6.0)))
    return root / "a", root / "b"


def test_training_cases_mix_folders_repeat_and_hold_out(two_folders, tmp_path):
    a, b = two_folders
    cfg = OrganLocalisationConfig()
    cfg.data.root, cfg.data.extra_roots, cfg.data.extra_repeat = str(a), [str(b)], 3
    names_a = [c.name for c in read_organ_folder(a)]
    cfg.data.exclude_cases = [names_a[0]]
    cases, repeats = training_cases(cfg.data, tmp_path)
    assert [c.name for c in cases] == names_a[1:] + [c.name for c in read_organ_folder(b)]
    assert repeats == [1, 3]
    cfg.data.exclude_cases = ["no_such_case"]
    with pytest.raises(ValueError, match="data.exclude_cases: no training folder has a case named 'no_such_case'"):
        training_cases(cfg.data, tmp_path)


def test_organ_volumes_augment_reproducibly_per_epoch(two_folders):
    a, _ = two_folders
    cfg = OrganLocalisationConfig()
    cfg.preprocess.spacing = 8.0
    cases = read_organ_folder(a)
    aug = OrganAugmentConfig(p=1.0)
    ds = OrganVolumes(cases, cfg.preprocess.build(), cfg.model.class_names, repeats=[2, 1], augment=aug, seed=5)
    assert len(ds) == 3 and ds.index == [0, 0, 1]
    first = ds[0]
    assert torch.equal(first["image"], ds[0]["image"]) and torch.equal(first["boxes"], ds[0]["boxes"])
    assert not torch.equal(first["image"], ds[1]["image"])  # the second draw of the same CT differs
    ds.set_epoch(1)
    assert not torch.equal(first["image"], ds[0]["image"])
    plain = OrganVolumes(cases, cfg.preprocess.build(), cfg.model.class_names)[0]
    assert first["image"].shape[2:] == plain["image"].shape[2:]  # z may be cropped, never the plane
    assert first["image"].min() >= 0 and first["image"].max() <= 1


def test_a_misspelt_held_out_case_is_refused_before_any_run_folder_is_written(two_folders, tmp_path):
    from medetect.organs.localiser import train_organs

    a, _ = two_folders
    cfg = OrganLocalisationConfig()
    cfg.data.root, cfg.data.exclude_cases = str(a), ["phantom_99999"]
    with pytest.raises(ValueError, match="data.exclude_cases: no training folder has a case named 'phantom_99999'"):
        train_organs(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
