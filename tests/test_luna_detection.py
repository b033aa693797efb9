"""LUNA16-style nodule detection: layout, preprocessing geometry, inference mapping, submission, errors, tiny e2e."""

from __future__ import annotations

import csv
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medetect.cli import main
from medetect.convert import Geometry, luna_to_boxes, voxel_to_world, world_to_voxel
from medetect.data.phantoms import write_luna16_dataset
from medetect.luna.detection import (
    LunaLayout,
    LunaPreprocess,
    LunaVolumes,
    default_detector_config,
    evaluate_submission,
    load_luna_model,
    predict_layout,
    predict_scan,
    resampled_geometry,
    train_detector,
    write_submission,
)

FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # LPS -> RAS-like in-plane flip


@pytest.fixture(scope="module")
def luna_dir(tmp_path_factory):
    """3 tiny phantoms (2 subsets), anisotropic spacing (2.5, 1.25, 1.25) and a non-identity direction."""
    root = tmp_path_factory.mktemp("luna")
    write_luna16_dataset(root, n_scans=3, seed=3, subsets=2, nodules_per_scan=[2, 1, 1], n_excluded=1,
                         shape=(32, 64, 64), spacing=(2.5, 1.25, 1.25), nodule_diameters_mm=(5.0, 10.0),
                         n_vessel_branches=50, direction=FLIP)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_layout_reads_subsets_geometry_and_boxes(luna_dir):
    lay = LunaLayout(luna_dir)
    assert {k: len(v) for k, v in lay.subsets().items()} == {"subset0": 2, "subset1": 1}
    assert len(lay.folds()) == 2 and sorted(lay.folds()[0][1] + lay.folds()[0][0]) == sorted(lay.uids)
    assert lay.uids_in([1]) == lay.subsets()["subset1"]
    assert lay.excluded is not None and lay.candidates is not None and len(lay.seriesuids) == 3
    rows = list(csv.reader(open(luna_dir / "annotations.csv")))[1:]
    uid = rows[0][0]
    g, shape = lay.info(uid)
    assert shape == (32, 64, 64) and g.spacing == (2.5, 1.25, 1.25) and g.direction == FLIP
    img = lay.read(uid)
    assert img.geometry == g and img.spatial_shape == shape
    c, d = lay.nodules(uid)
    boxes = lay.boxes(uid)
    np.testing.assert_allclose(boxes, np.asarray(luna_to_boxes(c, d, g)), atol=1e-9)
    # the box centre is where the sphere is: it is bright (nodule HU) in the original volume
    ctr = ((boxes[:, :3] + boxes[:, 3:]) / 2).astype(int)
    assert (img.array[0][tuple(ctr.T)] > -300).all()


def test_world_centre_survives_resampling_and_prediction_mapping():
    """Anisotropic spacing + non-identity direction: world -> voxel box -> resampled grid -> (predicted box) ->
    original grid -> world gives back the centre exactly, and the resampled IMAGE has the object there."""
    g = Geometry((2.5, 0.7, 0.9), (12.3, -40.1, -300.7), (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    shape = (40, 120, 100)
    centre = np.array([[-20.0, 30.0, -350.0]])
    dia = np.array([12.0])
    box = np.asarray(luna_to_boxes(centre, dia, g))
    # a blob at that world point
    zz, yy, xx = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    vox = np.stack([zz, yy, xx], -1)
    world = np.asarray(voxel_to_world(vox.reshape(-1, 3), g)).reshape(*shape, 3)
    r = np.linalg.norm(world - centre[0], axis=-1)
    vol = np.where(r < 6.0, 0.0, -900.0).astype(np.int16)
    pre = LunaPreprocess(spacing=1.5)
    x, zoom = pre(vol, g)
    assert x.shape[0] == 1 and x.min() >= 0 and x.max() <= 1
    vol_f = vol.astype(np.float32)
    torch.testing.assert_close(pre(vol_f, g)[0], x)
    assert (vol_f == vol).all()  # the caller's array is not windowed in place
    res_box = box * np.asarray(zoom * 2)
    # the resampled image's centroid of the blob sits at the resampled box centre (within a fraction of a voxel)
    w = (x[0].numpy() > 0.3).astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in x.shape[1:]], indexing="ij"), -1)
    com = (grid * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    np.testing.assert_allclose(com, (res_box[0, :3] + res_box[0, 3:]) / 2, atol=0.35)
    # resampled geometry agrees with the original one through world coordinates
    rg = resampled_geometry(g, pre)
    np.testing.assert_allclose(np.asarray(world_to_voxel(centre, rg)), (res_box[:, :3] + res_box[:, 3:]) / 2, atol=1e-9)

    # a stub detector "predicting" exactly the resampled box: predict_scan must return the world centre
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(nms_thresh=0.1, detections_per_img=100)
            self.heads = SimpleNamespace(score_thresh=0.0)

        def forward(self, images):
            b = torch.tensor(res_box, dtype=torch.float32)
            return {"detections": [{"boxes": b, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]}

    marks = predict_scan(Stub(), pre, vol, g, tile_size=512)
    np.testing.assert_allclose(marks["centres_xyz"], centre, atol=1e-3)  # float32 detector boxes
    np.testing.assert_allclose(marks["diameters_mm"], dia, atol=1e-3)
    np.testing.assert_allclose(marks["boxes"], box, atol=1e-4)


def test_submission_format_and_cap(tmp_path):
    rng = np.random.default_rng(0)
    marks = {"1.2.3": {"centres_xyz": rng.normal(size=(150, 3)), "probabilities": rng.uniform(size=150)},
             "4.5.6": {"centres_xyz": rng.normal(size=(3, 3)), "probabilities": np.array([0.1, 0.9, 0.5])}}
    f = write_submission(tmp_path / "sub.csv", marks)
    rows = list(csv.reader(open(f)))
    assert rows[0] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    per = {}
    for r in rows[1:]:
        per.setdefault(r[0], []).append(float(r[4]))
    assert len(per["1.2.3"]) == 100 and len(per["4.5.6"]) == 3
    for p in per.values():
        assert p == sorted(p, reverse=True)
    assert per["1.2.3"][0] == pytest.approx(marks["1.2.3"]["probabilities"].max())


def test_errors_missing_raw_outside_nodule_unknown_uid(luna_dir, tmp_path):
    root = _copy(luna_dir, tmp_path / "a")
    lay = LunaLayout(root)
    uid = lay.uids[0]
    with pytest.raises(KeyError, match="unknown seriesuid"):
        lay.path("9.9.9")
    lay.path(uid).with_suffix(".raw").unlink()
    with pytest.raises(Exception, match=r"\.raw"):
        LunaLayout(root).info(uid)

    root = _copy(luna_dir, tmp_path / "b")
    uid = LunaLayout(root).uids[0]
    with open(root / "annotations.csv", "a") as fh:
        fh.write(f"{uid},5000.0,0.0,0.0,6.0\n")
    n_lines = len(open(root / "annotations.csv").read().splitlines())
    with pytest.raises(ValueError, match=rf"annotations.csv line {n_lines}: nodule of {uid}.*outside the volume"):
        LunaLayout(root).boxes(uid)
    with pytest.raises(ValueError, match=rf"line {n_lines}"):
        LunaVolumes(LunaLayout(root), [uid], LunaPreprocess(spacing=2.0))

    root = _copy(luna_dir, tmp_path / "c")
    with open(root / "annotations.csv", "a") as fh:
        fh.write("1.2.3.4.5,0.0,0.0,0.0,6.0\n")
    n_lines = len(open(root / "annotations.csv").read().splitlines())
    with pytest.raises(ValueError, match=rf"line {n_lines}: seriesuid 1.2.3.4.5 has no scan"):
        LunaLayout(root)
    assert LunaLayout(root, allow_missing_scans=True).missing == ["1.2.3.4.5"]


def test_train_resume_predict_submit_froc_cli(luna_dir, tmp_path):
    torch.manual_seed(0)
    from medetect.engine.trainer import TrainConfig

    lay = LunaLayout(luna_dir)
    pre = LunaPreprocess(spacing=2.5)
    cfg = default_detector_config(base_width=4, fpn_channels=8)
    tc = TrainConfig(epochs=1, batch_size=2, lr=1e-3, optimizer="adamw", warmup_iters=1, num_workers=0,
                     max_steps_per_epoch=1, log_every=1)
    run = tmp_path / "run"
    kw = dict(subsets=[0], pre=pre, model_config=cfg, patch_size=32, patches_per_volume=1, progress=False)
    w = train_detector(lay, run, train_config=tc, **kw)
    assert (run / "cache").is_dir() and w.is_file()
    tc.epochs = 2  # resume continues from the epoch-1 checkpoint (a recorded config change)
    train_detector(lay, run, train_config=tc, allow_config_change=True, **kw)
    hist = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train_loss")]
    assert [int(r["epoch"]) for r in hist] == [1, 2]

    model, p2 = load_luna_model(w)
    assert p2.to_dict() == pre.to_dict()
    test = lay.uids_in([1])
    marks = predict_layout(model, p2, lay, test, score_thresh=0.0, tile_size=64)
    m = marks[test[0]]
    assert 0 < len(m["probabilities"]) <= 100 and np.all(np.diff(m["probabilities"]) <= 0)
    sub = write_submission(tmp_path / "sub.csv", marks)
    res = evaluate_submission(lay, sub, test)
    assert res.n_scans == 1 and 0.0 <= res.cpm <= 1.0

    out = tmp_path / "cli.csv"
    assert main(["luna", "predict", str(luna_dir), "--weights", str(w), "--out", str(out), "--subsets", "1", "--froc"]) == 0
    assert out.read_text().startswith("seriesuid,coordX,coordY,coordZ,probability")
