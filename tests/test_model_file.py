"""One model file: the writer, the loader, old formats, run folders, refusal of non-safetensors files, and the
re-written shipped weights behaving exactly like the first-release files (tests/data/shipped_weights_baseline.json)."""

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.fp_reduction import FPRConfig, build_fpr
from medetect.models.io import (
    BUILDERS,
    LoadedModel,
    Preprocess,
    load_model,
    read_metadata,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "medetect" / "weights"
NOT_ST = "not a safetensors model file: pickled checkpoints are never loaded"


def _tiny_detector(ndim=2, arch="retinanet"):
    torch.manual_seed(0)
    cfg = DetectorConfig(arch=arch, ndim=ndim, in_channels=1, num_classes=2, class_names=["a", "b"], base_width=8,
                         fpn_channels=16, roi_hidden=16, levels=[3, 4], anchor_sizes=[[16], [32]])
    return build_detector(cfg).eval()


def _tiny_fpr():
    torch.manual_seed(0)
    return build_fpr(FPRConfig(in_channels=1, widths=[8, 16], stem_width=8, groups=4, cube_size=8)).eval()


def _same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ writer / loader


@pytest.mark.parametrize("ndim", [2, 3])
def test_detector_round_trip_metadata_and_mode(tmp_path, ndim):
    model = _tiny_detector(ndim)
    pre = Preprocess(ndim=ndim, channels=1, spacing=[1.0] * ndim if ndim == 3 else None,
                     window=[-1000, 400] if ndim == 3 else None, bit_depth=None if ndim == 3 else 8)
    old = os.umask(0o077)  # a restrictive umask must not make shipped files private
    try:
        path = save_model(model, tmp_path / "m.safetensors", kind="detector", preprocess=pre, classes=["a", "b"],
                          extra={"note": "x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob("*.tmp"))
    meta = read_metadata(path)
    assert {"format_version", "kind", "config", "preprocess", "classes", "extra"} <= set(meta)
    assert meta["kind"] == "detector" and json.loads(meta["classes"]) == ["a", "b"]
    m = load_model(path)
    assert isinstance(m, LoadedModel) and m.kind == "detector" and m.classes == ["a", "b"]
    assert m.preprocess == pre and m.meta["extra"] == {"note": "x"}
    _same_weights(model, m.model, atol=1e-2)  # float16 storage
    assert all(p.dtype == torch.float32 for p in m.model.parameters())


def test_fpr_round_trip_float32(tmp_path):
    from medetect.luna.fpr import load_fpr, save_fpr

    model = _tiny_fpr()
    path = save_fpr(model, tmp_path / "f.safetensors")
    assert read_metadata(path)["kind"] == "fpr"
    m = load_model(path)
    assert m.kind == "fpr" and m.preprocess.window == [-1000.0, 400.0] and m.preprocess.spacing == [1.0] * 3
    _same_weights(model, m.model)  # exact: FPR classifiers are stored in float32
    _same_weights(model, load_fpr(path))


def test_builders_is_a_plain_dict_and_unknown_kind_refused(tmp_path):
    assert set(BUILDERS) >= {"detector", "fpr"}
    with pytest.raises(ValueError, match="kind must be one of"):
        save_model(_tiny_fpr(), tmp_path / "x.safetensors", kind="no-such-kind", preprocess=Preprocess(), classes=[])
    path = save_model(_tiny_fpr(), tmp_path / "x.safetensors", kind="fpr", preprocess=Preprocess(ndim=3), classes=[])
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**meta, "kind": "no-such-kind"})
    with pytest.raises(ValueError, match="unknown model kind 'no-such-kind'"):
        load_model(path)


def test_preprocess_validation_names_the_key():
    with pytest.raises(ValueError, match="preprocess.window"):
        Preprocess(window=[400, -1000])
    with pytest.raises(ValueError, match="preprocess.orientation"):
        Preprocess(orientation="LPS")
    with pytest.raises(ValueError, match="unknown preprocess key 'hu_lo'"):
        Preprocess.from_dict({"hu_lo": 1})


# ------------------------------------------------------------------------------------------------ refusals


def _pickle_files(tmp_path):
    model = _tiny_fpr()
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pt.read_bytes())
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n" * 10)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe\x00\x01")
    return [pt, renamed, raw, text, empty, huge, notjson]


def test_non_safetensors_files_are_refused_before_opening(tmp_path, monkeypatch):
    import safetensors

    def boom(*a, **k):  # the check must come BEFORE safetensors touches the file
        raise AssertionError("safetensors opened a file that failed the check")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    for f in _pickle_files(tmp_path):
        with pytest.raises(ValueError) as e:
            load_model(f)
        msg = str(e.value)
        assert msg == f"{f}: {NOT_ST}", msg


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model(tmp_path / "absent.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a medetect model file"):
        load_model(tmp_path / "foreign.safetensors")


def test_a_model_file_cut_short_or_lengthened_names_the_file(tmp_path, monkeypatch):
    import medetect.apps
    import safetensors.torch

    path = save_model(_tiny_fpr(), tmp_path / "m.safetensors", kind="fpr", preprocess=Preprocess(ndim=3),
                      classes=["nodule"])
    blob = path.read_bytes()
    header = 8 + int.from_bytes(blob[:8], "little")
    cut, long = tmp_path / "cut.safetensors", tmp_path / "long.safetensors"
    cut.write_bytes(blob[: header + (len(blob) - header) // 2])  # the header intact, half of the tensor data
    long.write_bytes(blob + b"\0" * 16)

    def boom(*a, **k):  # the length check comes BEFORE safetensors reads the file
        raise AssertionError("safetensors read a file that failed the length check")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    for f, have in ((cut, (len(blob) - header) // 2), (long, len(blob) - header + 16)):
        msg = f"{f} is truncated or damaged: its header describes {len(blob) - header} bytes of tensor data but the file holds {have}"
        for load in (load_model, medetect.apps.load_model, read_metadata):
            with pytest.raises(ValueError) as e:
                load(f)
            assert str(e.value).startswith(msg), str(e.value)
    monkeypatch.undo()
    assert load_model(path).kind == "fpr"  # the intact file still loads


# ------------------------------------------------------------------------------------------------ old formats, run folders


def _v1_files(tmp_path):
    det = _tiny_detector(3)
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in det.state_dict().items()}
    v1 = tmp_path / "luna_v1.safetensors"
    save_file(sd, str(v1), metadata={
        "format": "medetect-detector-v1", "config": json.dumps(det.config.to_dict()),
        "preprocess": json.dumps({"scale": 1.0, "max_value": 1400.0, "mean": [-1000 / 1400], "std": [1.0]}),
        "extra": json.dumps({"luna": {"spacing": [1.0, 1.5, 1.5], "hu_lo": -1000.0, "hu_hi": 400.0}, "run": "r"})})
    fpr = _tiny_fpr()
    f1 = tmp_path / "fpr_v1.safetensors"
    save_file(dict(fpr.state_dict()), str(f1), metadata={"medetect_fpr_config": json.dumps(fpr.config.to_dict()),
                                                         "format": "pt"})
    sl = _tiny_detector(2)
    s1 = tmp_path / "slices_v1.safetensors"
    save_file(dict(sl.state_dict()), str(s1), metadata={"medetect_slices2d_config": json.dumps(sl.config.to_dict())})
    return (det, v1), (fpr, f1), (sl, s1)


def test_first_release_files_still_load(tmp_path):
    from medetect.luna.detection import LunaPreprocess, load_luna_model
    from medetect.luna.fpr import load_fpr
    from medetect.luna.slices2d import load_slice_model

    (det, v1), (fpr, f1), (sl, s1) = _v1_files(tmp_path)
    m = load_model(v1)
    assert m.kind == "detector" and m.preprocess.spacing == [1.0, 1.5, 1.5] and m.preprocess.window == [-1000, 400]
    assert m.meta["extra"]["run"] == "r"
    _same_weights(det, m.model, atol=1e-2)
    model, pre = load_luna_model(v1)
    assert pre == LunaPreprocess(spacing=(1.0, 1.5, 1.5))
    m = load_model(f1)
    assert m.kind == "fpr"
    _same_weights(fpr, m.model)
    _same_weights(fpr, load_fpr(f1))
    m = load_model(s1)
    assert m.kind == "detector" and m.preprocess.ndim == 2 and m.preprocess.window == [-1000.0, 400.0]
    _same_weights(sl, load_slice_model(s1))


def _fake_run(run_dir: Path, model, config_name: str, config: dict, epoch=3):
    ck = run_dir / f"epoch_{epoch:04d}"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"))
    save_file({"state.0.step": torch.zeros(1)}, str(ck / "optimizer.safetensors"))  # what a checkpoint also holds
    (ck / "state.json").write_text(json.dumps({"epoch": epoch, "step": 10 * epoch}))
    (run_dir / "last.json").write_text(json.dumps({"checkpoint": ck.name}))
    (run_dir / config_name).write_text(json.dumps(config))


def test_run_folders_load_and_export_for_every_kind(tmp_path):
    from medetect.apps import load_model as load_any  # model files and run folders
    from medetect.apps.export import export_from_run

    det, fpr = _tiny_detector(2), _tiny_fpr()
    _fake_run(tmp_path / "det", det, "config.json",
              {"model": det.config.to_dict(), "train": {}, "data": {"scale": 0.5, "max_value": 255.0, "mean": [0.4],
                                                                       "std": [0.2]}})
    _fake_run(tmp_path / "fpr", fpr, "fpr_config.json", {"model": fpr.config.to_dict(), "train": {}})
    with pytest.raises(ValueError, match="is a folder, not a model file"):
        load_model(tmp_path / "det")  # the model-file layer reads files only
    m = load_any(tmp_path / "det")
    assert m.kind == "detector" and m.preprocess.scale == 0.5 and m.preprocess.mean == [0.4]
    _same_weights(det, m.model)
    for name, ref, kind in (("det", det, "detector"), ("fpr", fpr, "fpr")):
        out = export_from_run(tmp_path / name, tmp_path / f"{name}.safetensors")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        m = load_model(out)
        assert m.kind == kind and m.meta["extra"]["epoch"] == 3
        _same_weights(ref, m.model, atol=1e-2)
        assert m.task == {"det": "detection", "fpr": "luna-fpr"}[name]
    from safetensors import safe_open

    half = export_from_run(tmp_path / "fpr", tmp_path / "fpr16.safetensors", fp16=True)  # medetect export --fp16
    with safe_open(str(half), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} >= {"F16"}
    _same_weights(fpr, load_model(half).model, atol=1e-2)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        (tmp_path / "empty").mkdir()
        load_any(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ layering


def test_models_io_imports_no_upper_layer():
    code = ("import sys, medetect.models.io; bad = [m for m in sys.modules if m.startswith(('medetect.data', "
            "'medetect.engine', 'medetect.evaluation', 'medetect.config', 'medetect.cli', 'medetect.apps', "
            "'medetect.luna'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ shipped weights


def test_shipped_weights_new_format_same_detections():
    """The re-written shipped files give the detections the first-release files gave (saved before the change)."""
    from medetect.data.io import read_image
    from medetect.data.phantoms import make_phantom
    from medetect.engine.predictor import Predictor
    from medetect.luna.detection import load_luna_model, predict_scan

    base = json.loads((ROOT / "tests" / "data" / "shipped_weights_baseline.json").read_text())
    for name in ("bccd_faster_rcnn", "nodule_phantom_det3d", "nodule_fpr_phantom"):
        meta = read_metadata(WEIGHTS / f"{name}.safetensors")
        assert meta["format_version"] == "2" and "format" not in meta
    m = load_model(WEIGHTS / "bccd_faster_rcnn.safetensors")
    assert m.preprocess.bit_depth == 8 and m.preprocess.scale == 0.5
    p = Predictor(m.model, device="cpu", drop_padded=False)
    for name, ref in base["bccd"].items():
        det = p.predict_image(read_image(ROOT / "medetect" / "assets" / "bccd" / name), m.preprocess)
        order = torch.argsort(torch.tensor(ref["scores"]), descending=True, stable=True)
        torch.testing.assert_close(det["scores"], torch.tensor(ref["scores"])[order], atol=1e-4, rtol=0)
        # float32 box coordinates of up to ~640 px carry ~6e-5 per ulp: 1e-6 relative admits a couple of ulps of
        # summation-order noise between torch/BLAS builds
        torch.testing.assert_close(det["boxes"], torch.tensor(ref["boxes"], dtype=torch.float64)[order], atol=1e-4,
                                   rtol=1e-6)
        torch.testing.assert_close(det["labels"], torch.tensor(ref["labels"])[order])
    model, pre = load_luna_model(WEIGHTS / "nodule_phantom_det3d.safetensors")
    ph, ref = base["nodule"]["phantom"], base["nodule"]
    vol, geom, _ = make_phantom(shape=ph["shape"], spacing=ph["spacing"], n_nodules=ph["n_nodules"],
                                nodule_diameters_mm=tuple(ph["nodule_diameters_mm"]), seed=ph["seed"],
                                n_vessel_branches=ph["n_vessel_branches"])
    # the first release kept detections centred in the zero padding (drop_padded=False reproduces it exactly)
    old = Predictor(model, device="cpu", tile_size=(256,) * 3, batch_size=1, nms_thresh=model.config.nms_thresh,
                    drop_padded=False)
    marks = predict_scan(model, pre, vol, geom, max_marks=ref["max_marks"], predictor=old)
    np.testing.assert_allclose(marks["probabilities"], ref["probabilities"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(marks["centres_xyz"], ref["centres_xyz"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(marks["boxes"], ref["boxes"], atol=1e-4, rtol=0)
    new = predict_scan(model, pre, vol, geom, max_marks=ref["max_marks"])  # only marks in the padding differ
    z_size = ph["shape"][0]
    # a first-release mark is kept when the new marks hold one with the same probability and box (to float noise
    # between CPUs: 1e-5 on probabilities, 1e-3 voxels on boxes)
    ref_p, ref_b = np.asarray(ref["probabilities"]), np.asarray(ref["boxes"])
    same = (np.abs(ref_p[:, None] - np.asarray(new["probabilities"])[None]) <= 1e-5) & (
        np.abs(ref_b[:, None] - np.asarray(new["boxes"])[None]) <= 1e-3).all(-1)  # [R, N]
    kept = same.any(1)
    assert kept[:10].all() and (ref_b[~kept, 3] >= z_size - 1e-3).all()
    assert same.any(0).sum() == kept.sum()  # kept and new marks pair one to one
