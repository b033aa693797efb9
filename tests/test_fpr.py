"""Stage two (false-positive reduction) and the 2D slice variant: cube extraction, sampling, fusion, linking, CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medetect.convert import Geometry, voxel_to_world, world_to_voxel
from medetect.luna.fpr import (
    CandidateCubes,
    balanced_indices,
    balanced_sampler,
    cube_collate,
    extract_cubes,
    fuse,
    load_fpr,
    random_augmentation,
    save_fpr,
    score_candidates,
)
from medetect.luna.slices2d import link_slice_boxes, slice_boxes
from medetect.models.fp_reduction import FPRConfig, build_fpr


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _geom():
    # anisotropic spacing and a non-identity direction (axes swapped, one flipped), non-zero origin
    d = np.eye(3)[[1, 0, 2]]
    d[2] *= -1
    return Geometry((2.5, 0.7, 0.9), (10.0, -20.0, 30.0), tuple(d.reshape(-1)))


def _bright_volume(at=(7, 22, 11), shape=(20, 40, 30)):
    vol = np.full(shape, -800.0, np.float32)
    vol[at] = 1000.0
    return vol


def test_cube_centred_on_candidate_anisotropic_rotated():
    g = _geom()
    vol = _bright_volume()
    c = voxel_to_world(np.array([[7.5, 22.5, 11.5]]), g)
    cube = extract_cubes(vol, g, c, size=9, spacing_mm=0.5, window=None)
    assert cube.shape == (1, 1, 9, 9, 9)
    assert np.unravel_index(int(cube[0, 0].argmax()), (9, 9, 9)) == (4, 4, 4)
    assert float(cube.max()) == pytest.approx(1000.0, abs=1e-3)
    # even size: the candidate is the cube's geometric centre -> intensity centre of mass at size/2 (edge coords)
    cube = extract_cubes(vol, g, c, size=8, spacing_mm=0.5, window=None)[0, 0] + 800
    w = cube / cube.sum()
    idx = torch.stack(torch.meshgrid(*[torch.arange(8.0) + 0.5] * 3, indexing="ij"))
    com = (idx * w).flatten(1).sum(1)
    assert torch.allclose(com, torch.full((3,), 4.0), atol=1e-3)


def test_padding_outside_volume_and_window():
    g = Geometry.identity(3)
    vol = np.zeros((6, 6, 6), np.float32)
    far = voxel_to_world(np.array([[100.0, 100.0, 100.0], [3.0, 3.0, 3.0]]), g)
    hu = extract_cubes(vol, g, far, size=4, window=None)
    assert torch.allclose(hu[0], torch.tensor(-1000.0))
    assert torch.allclose(hu[1], torch.tensor(0.0), atol=1e-3)
    win = extract_cubes(vol, g, far, size=4, window=(-1000, 400))
    assert torch.allclose(win[0], torch.tensor(0.0)) and torch.allclose(win[1], torch.full_like(win[1], 1000 / 1400))
    edge = extract_cubes(vol, g, voxel_to_world(np.array([[0.0, 3.0, 3.0]]), g), size=4, window=None)
    assert torch.allclose(edge[0, 0, :2], torch.tensor(-1000.0)) and torch.allclose(edge[0, 0, 2:], torch.tensor(0.0), atol=1e-3)


def test_batch_extraction_equals_loop_and_scales():
    g = _geom()
    rng = np.random.default_rng(0)
    vol = rng.normal(-500, 300, (20, 40, 30)).astype(np.float32)
    c = voxel_to_world(rng.uniform(0, 1, (7, 3)) * np.array([20, 40, 30]), g)
    mats, shifts = random_augmentation(7, generator=torch.Generator().manual_seed(0))
    batch = extract_cubes(vol, g, c, size=6, spacing_mm=1.0, scales=(1.0, 2.0), matrices=mats, shifts_mm=shifts, chunk=3)
    assert batch.shape == (7, 2, 6, 6, 6)
    for i in range(7):
        one = extract_cubes(vol, g, c[i:i + 1], size=6, spacing_mm=1.0, scales=(1.0, 2.0), matrices=mats[i:i + 1],
                            shifts_mm=shifts[i:i + 1])
        assert torch.allclose(batch[i], one[0], atol=1e-5)
    # scale 2 of a cube == scale 1 of a cube with doubled spacing
    s2 = extract_cubes(vol, g, c, size=6, spacing_mm=2.0, matrices=mats, shifts_mm=shifts)
    assert torch.allclose(batch[:, 1], s2[:, 0], atol=1e-5)


def test_augmentation_keeps_centre():
    g = _geom()
    vol = _bright_volume()
    c = voxel_to_world(np.array([[7.5, 22.5, 11.5]] * 16), g)
    mats, shifts = random_augmentation(16, scale=(0.8, 1.2), shift_mm=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mats.abs().sum(1), mats.abs().amax(1))  # one non-zero per column: signed permutation * s
    cubes = extract_cubes(vol, g, c, size=9, spacing_mm=0.5, matrices=mats, shifts_mm=shifts, window=None)
    am = cubes.flatten(1).argmax(1)
    assert torch.all(am == 4 * 81 + 4 * 9 + 4)
    # a rot90 in the (y, x) plane of an asymmetric pattern equals torch.rot90 of the un-augmented cube
    vol2 = np.random.default_rng(3).normal(size=(20, 40, 30)).astype(np.float32)
    m = torch.tensor([[[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]], dtype=torch.float64)
    a = extract_cubes(vol2, Geometry.identity(3), [[15.0, 20.0, 10.0]], size=5, window=None)[0, 0]
    b = extract_cubes(vol2, Geometry.identity(3), [[15.0, 20.0, 10.0]], size=5, window=None, matrices=m)[0, 0]
    assert any(torch.allclose(b, torch.rot90(a, k, (1, 2)), atol=1e-4) for k in (1, 3))


def test_class_balanced_sampling_ratio():
    labels = np.array([1] * 7 + [0] * 93)
    idx = balanced_indices(labels, 0.25, seed=0)
    assert (labels[idx] == 0).sum() == 93
    assert labels[idx].mean() == pytest.approx(0.25, abs=0.01)
    assert set(idx[labels[idx] == 1]) == set(range(7))
    s = balanced_sampler(labels, 0.5, num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert labels[list(s)].mean() == pytest.approx(0.5, abs=0.04)


def _tiny_scan():
    g = Geometry((2.0, 1.5, 1.5), (-10.0, 5.0, -100.0), tuple(np.eye(3).reshape(-1)))
    vol = np.full((12, 24, 24), -850.0, np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(n) + 0.5 for n in vol.shape], indexing="ij")
    ctr_vox = np.array([6.0, 12.0, 12.0])
    r = np.sqrt(((zz - 6) * 2) ** 2 + ((yy - 12) * 1.5) ** 2 + ((xx - 12) * 1.5) ** 2)
    vol[r < 5] = 40.0
    pos = voxel_to_world(ctr_vox[None], g)
    neg = voxel_to_world(np.array([[3.0, 4.0, 4.0], [9.0, 20.0, 5.0], [2.0, 18.0, 18.0]]), g)
    return vol, g, np.concatenate([pos, neg]), np.array([1, 0, 0, 0])


def test_dataset_model_losses_and_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    vol, g, c, y = _tiny_scan()
    cfg = FPRConfig(cube_size=8, spacing_mm=2.0, widths=[4, 8], stem_width=4, groups=2)
    ds = CandidateCubes({"s": (vol, g)}, {"s": (c, y)}, cfg, pos_fraction=0.5)
    assert len(ds) == 6 and ds.labels[ds.index].mean() == 0.5
    ds.set_epoch(3)
    assert len(ds) == 6 and ds.labels[ds.index].mean() == 0.5
    x, t = cube_collate([ds[i] for i in range(len(ds))])
    assert x.shape == (6, 1, 8, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    model = build_fpr(cfg)
    out = model(x, t)
    assert out["logits"].shape == (6,)
    assert float(out["losses"]["fpr_bce"].detach()) == pytest.approx(np.log(2), abs=1e-5)  # zero-initialised last layer
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(8):
        loss = model(x, t)["losses"]["fpr_bce"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5
    path = save_fpr(model, tmp_path / "m.safetensors")
    m2 = load_fpr(path)
    p1 = score_candidates(model.eval(), vol, g, c)
    p2 = score_candidates(m2, vol, g, c, tta=True)
    assert p1.shape == (4,) and np.all((p1 >= 0) & (p1 <= 1)) and np.all((p2 >= 0) & (p2 <= 1))
    assert np.allclose(p1, score_candidates(m2, vol, g, c), atol=1e-6)


def test_fusion_modes():
    a, b = np.array([0.2, 0.9, 1.0]), np.array([0.5, 0.4, 0.0])
    assert np.allclose(fuse(a, b, "product"), a * b)
    assert np.allclose(fuse(a, b, "mean"), (a + b) / 2)
    assert np.allclose(fuse(a, b, "mean", weight=0.25), 0.25 * a + 0.75 * b)
    assert np.allclose(fuse(a, b, "geometric"), np.sqrt(a * b))
    assert np.allclose(fuse(a, b, "fpr"), b)
    with pytest.raises(ValueError):
        fuse(a, b, "max")
    with pytest.raises(ValueError):
        fuse(a, b[:2])


def test_slice_linking_sphere_to_one_candidate():
    g = Geometry((2.0, 0.8, 0.8), (-30.0, 12.0, -200.0), tuple(np.diag([1.0, -1.0, 1.0]).reshape(-1)))
    centre_vox = np.array([10.3, 30.6, 25.2])
    centre = voxel_to_world(centre_vox[None], g)[0]
    boxes_per_slice = slice_boxes(centre[None], np.array([12.0]), g, n_slices=24, shape="sphere")
    spanned = [z for z, b in enumerate(boxes_per_slice) if len(b)]
    assert len(spanned) >= 5
    # a false positive box far away on one slice, and per-slice jitter-free scores
    boxes = [torch.as_tensor(b, dtype=torch.float32) for b in boxes_per_slice]
    scores = [torch.full((len(b),), 0.9) for b in boxes]
    boxes[3] = torch.cat([boxes[3], torch.tensor([[2.0, 2.0, 6.0, 6.0]])])
    scores[3] = torch.cat([scores[3], torch.tensor([0.3])])
    cands = link_slice_boxes(boxes, scores, g, iou_thresh=0.3)
    assert len(cands["centres_world"]) == 2
    # plain IoU splits off the sphere's small cap slices (nested boxes, IoU (r_cap / r)^2 < 0.3); iomin does not
    assert len(link_slice_boxes(boxes, scores, g, iou_thresh=0.3, metric="iou")["centres_world"]) >= 2
    main = int(np.argmax(cands["n_slices"]))
    assert cands["n_slices"][main] == len(spanned)
    err_vox = world_to_voxel(cands["centres_world"][main][None], g)[0] - centre_vox
    assert np.all(np.abs(err_vox) <= 1.0)
    assert cands["scores"][main] == pytest.approx(0.9)


def test_submission_format(tmp_path):
    from medetect.cli import main
    from medetect.data.phantoms import write_luna16_dataset

    root = tmp_path / "luna"
    write_luna16_dataset(root, n_scans=1, seed=3, shape=(24, 48, 48), n_vessel_branches=30, n_nodules=1,
                         nodule_diameters_mm=(6.0, 8.0), n_vessel_candidates=3, n_random_candidates=2)
    cfg = FPRConfig(cube_size=8, spacing_mm=2.0, widths=[4, 8], stem_width=4, groups=2)
    save_fpr(build_fpr(cfg), tmp_path / "m.safetensors")
    out = tmp_path / "sub.csv"
    assert main(["luna-fpr", "score", str(tmp_path / "m.safetensors"), str(root), "--candidates", str(root / "candidates.csv"),
                 "--out", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    n_cand = len(list(csv.reader(open(root / "candidates.csv")))) - 1
    assert rows[0] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(rows) - 1 == n_cand
    assert all(0.0 <= float(r[4]) <= 1.0 and len(r) == 5 for r in rows[1:])
    from medetect.evaluation.froc import froc

    res = froc(root / "annotations.csv", out, n_bootstrap=0)
    assert 0.0 <= res.cpm <= 1.0


def test_slice_boxes_cut_3d_box_and_dataset_flips():
    from medetect.convert import luna_to_boxes
    from medetect.luna.slices2d import SliceDataset

    g = Geometry((2.5, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    c, dia = np.array([[20.5, 12.5, 16.0]]), np.array([8.0])  # world x, y, z
    per = slice_boxes(c, dia, g, n_slices=12, shape="box")
    b3 = luna_to_boxes(c, dia, g)[0]
    spanned = [z for z, b in enumerate(per) if len(b)]
    assert spanned == [z for z in range(12) if b3[0] < z + 0.5 < b3[3]]
    assert all(np.allclose(per[z][0], b3[[1, 2, 4, 5]]) for z in spanned)
    vol = np.full((12, 32, 40), -900.0, np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(n) + 0.5 for n in vol.shape], indexing="ij")
    vol[((zz - 6.9) * 2.5) ** 2 + (yy - 13) ** 2 + (xx - 21) ** 2 < 16] = 50.0
    torch.manual_seed(0)
    ds = SliceDataset({"s": (vol, g)}, {"s": (c, dia)}, context=1, neg_ratio=0.5, box_shape="sphere")
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 32, 40)
        for b in s["boxes"]:  # the bright disc stays inside its (possibly flipped) box
            y0, x0 = b[:2].floor().long().tolist()
            y1, x1 = b[2:].ceil().long().tolist()
            inside = s["image"][1, y0:y1, x0:x1].sum()
            assert inside > 0.95 * s["image"][1][s["image"][1] > 0.5].sum()


def test_candidates_from_marks_labels_topk_and_excluded():
    from medetect.luna.fpr import candidates_from_marks, merge_candidates

    ann = {"a": (np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]), np.array([10.0, 4.0]))}
    excl = {"a": (np.array([[0.0, 40.0, 0.0], [0.0, -40.0, 0.0]]), np.array([6.0, -1.0]))}
    centres = np.array([
        [4.9, 0.0, 0.0],    # inside nodule 0 (radius 5)      -> 1
        [5.1, 0.0, 0.0],    # just outside                   -> 0
        [51.0, 1.0, 1.0],   # inside nodule 1 (radius 2)      -> 1
        [0.0, 42.0, 0.0],   # on an excluded finding (r 3)   -> dropped
        [0.0, -44.0, 0.0],  # excluded, unknown size (r 5)   -> dropped
        [100.0, 0.0, 0.0],  # far                            -> 0
    ])
    probs = np.array([0.9, 0.8, 0.1, 0.7, 0.6, 0.05])
    out = candidates_from_marks({"a": {"centres_xyz": centres, "probabilities": probs},
                                 "b": (centres[:2], probs[:2])}, ann, excluded=excl)
    c, y = out["a"]
    # kept in descending probability order, excluded dropped
    np.testing.assert_allclose(c, centres[[0, 1, 2, 5]])
    np.testing.assert_array_equal(y, [1, 0, 1, 0])
    assert y.dtype == np.int64
    # a scan without annotations: all negatives
    np.testing.assert_array_equal(out["b"][1], [0, 0])
    # top_k keeps the most probable marks (before dropping excluded ones)
    c3, y3 = candidates_from_marks({"a": (centres, probs)}, ann, top_k=4)["a"]
    np.testing.assert_allclose(c3, centres[[0, 1, 3, 4]])
    np.testing.assert_array_equal(y3, [1, 0, 0, 0])
    # no excluded findings given: they are plain negatives
    assert len(candidates_from_marks({"a": (centres, probs)}, ann, top_k=None)["a"][1]) == 6
    # merging with candidates.csv-style sets concatenates per scan
    m = merge_candidates({"a": (centres[:1], np.array([1]))}, out)
    assert len(m["a"][1]) == 5 and m["a"][1].tolist() == [1, 1, 0, 1, 0] and len(m["b"][1]) == 2

def test_candidate_label_on_the_sphere_is_negative_as_in_the_froc():
    # a mark exactly at radius distance is not a hit in the official FROC (strict <); training labels agree
    from medetect.evaluation import froc as F
    from medetect.luna.fpr import candidates_from_marks

    ann = {"a": (np.array([[0.0, 0.0, 0.0]]), np.array([10.0]))}
    marks = np.array([[3.0, 4.0, 0.0], [2.9, 4.0, 0.0], [0.0, 0.0, -5.0]])  # |.| = 5 (exact), < 5, = 5
    c, y = candidates_from_marks({"a": (marks, np.array([0.9, 0.8, 0.7]))}, ann)["a"]
    np.testing.assert_array_equal(y, [0, 1, 0])
    # the same marks through the FROC: only the middle one detects the nodule
    ann_p = F.WorldPoints.from_arrays(["a"], ann["a"][0], diameters=ann["a"][1])
    for k, want in enumerate([0, 1, 0]):
        pred = F.WorldPoints.from_arrays(["a"], marks[k:k + 1], scores=[0.5])
        assert F.froc(ann_p, pred, n_bootstrap=0).n_tp == want
    # an excluded finding of unknown size (-1) counts as 10 mm: a mark 5 mm away is not dropped
    excl = {"a": (np.array([[0.0, 40.0, 0.0]]), np.array([-1.0]))}
    c, y = candidates_from_marks({"a": (np.array([[0.0, 45.0, 0.0], [0.0, 44.0, 0.0]]), None)}, {}, excluded=excl)["a"]
    np.testing.assert_array_equal(c, [[0.0, 45.0, 0.0]])


def test_candidates_from_marks_accepts_world_points():
    from medetect.data.annotations import WorldPoints
    from medetect.luna.fpr import candidates_from_marks, merge_candidates

    nodules = WorldPoints.from_arrays(["a", "b"], [[0.0, 0, 0], [9.0, 9, 9]], diameters=[4.0, 4.0])
    marks = WorldPoints.from_arrays(["a", "a", "b"], [[1.0, 0, 0], [30.0, 0, 0], [9.0, 9, 10]], scores=[0.2, 0.9, 0.5])
    out = candidates_from_marks(marks, nodules)
    np.testing.assert_array_equal(out["a"][0], [[30.0, 0, 0], [1.0, 0, 0]])  # by probability
    assert out["a"][1].tolist() == [0, 1] and out["b"][1].tolist() == [1]
    cands = WorldPoints.from_arrays("a", [[5.0, 5, 5]], labels=[0])
    assert merge_candidates(cands, out)["a"][1].tolist() == [0, 0, 1]
