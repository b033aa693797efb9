"""The experiment scripts behind the results page: every script has a ``--smoke`` run (tiny synthetic data, or tiny
shared data, a few training steps, written into a temporary folder), and each smoke run works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def _run(args: list[str], timeout: int = 300, pythonpath: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}, **({"PYTHONPATH": str(REPO)} if pythonpath else {}))
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(EXPERIMENTS / name), *args])


def test_every_script_has_a_smoke_run_and_is_listed():
    readme = (EXPERIMENTS / "README.md").read_text(encoding="utf-8")
    scripts = sorted(p for p in EXPERIMENTS.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_"))
    assert scripts
    for p in scripts:
        assert "--smoke" in p.read_text(encoding="utf-8"), f"{p.name} has no --smoke run"
        assert f"`{p.name}`" in readme, f"{p.name} is not listed in experiments/README.md"
        assert p.name in Path(__file__).read_text(encoding="utf-8"), f"{p.name}: no smoke test here"
    for name in re.findall(r"`([a-z0-9_]+\.(?:py|sh))`", readme):
        assert (EXPERIMENTS / name).is_file(), f"experiments/README.md names {name}, which does not exist"


def test_luna_phantom_stage1_smoke(tmp_path):
    _script("luna_phantom_stage1.py", "--smoke", "--root", str(tmp_path), "--threads", "1")
    res = json.loads((tmp_path / "eval_s100" / "metrics.json").read_text())
    assert res["n_test_scans"] == 1 and 0.0 <= res["stage1"]["cpm"] <= 1.0
    assert set(res["two_stage"]) >= {"product", "mean", "geometric", "fpr", "per_nodule"}
    assert (tmp_path / "run_fpr" / "model.safetensors").is_file()


def test_luna_phantom_two_stage_smoke_and_shipped_evaluation(tmp_path):
    _script("luna_phantom_two_stage.py", "--smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["candidates_oracle_labels"]["cpm"] == pytest.approx(1.0)
    assert "slices2d_fused_product" in res and res["fpr_weights"]["path"].endswith("fpr/model.safetensors")
    # the results page's command: the held-out subset rescored by the shipped stage-two model
    _script("luna_phantom_two_stage.py", "--stage", "evaluate", "--no-2d", "--no-tta", "--bootstrap", "0",
            "--out", str(tmp_path))
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["fpr_weights"]["path"].endswith("nodule_fpr_phantom.safetensors")
    assert 0.0 <= res["candidates_fpr"]["cpm"] <= 1.0


def test_real_cubes_stage1_smoke(tmp_path, shared_data):
    src = shared_data / "luna16-node21-patches"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    out = _script("real_cubes_stage1.py", "--smoke", "--root", str(tmp_path), "--src", str(src), "--threads", "1")
    assert out.stdout.count("CPM") == 2  # stage one, then fused with stage two
    assert (tmp_path / "fpr_candidates.csv").is_file() and (tmp_path / "val_submission_fused.csv").is_file()


def test_organs_localiser_smoke(tmp_path):
    out = _script("organs_localiser.py", "--smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res) == ["heldout_phantoms"]
    assert "| mean |" in out.stdout and '"median_s"' in out.stdout


def test_organ_validation_ct_smoke(tmp_path):
    out = _script("organ_validation_ct.py", "--smoke", "--out", str(tmp_path))
    assert "smoke: ok" in out.stdout and "LIVER -> liver (5): 40 voxels, 2 contours off the slice grid" in out.stdout
    assert (tmp_path / "folder" / "boxes.csv").is_file() and (tmp_path / "folder" / "labels" / "smoke.nii.gz").is_file()
    # a user mistake is one sentence and exit code 2, no traceback
    bad = subprocess.run([sys.executable, str(EXPERIMENTS / "organ_validation_ct.py"), "onkodicom",
                          str(tmp_path / "missing"), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no such folder" in bad.stderr


def test_attention_luna_cubes_smoke(tmp_path):
    _script("attention_luna_cubes.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("lam1_e1*/result.json")
    res = json.loads(result.read_text())
    assert res["val_cubes"] > 0 and {"attention", "gradcam"} <= set(res)


def test_attention_mias_smoke(tmp_path):
    out = _script("attention_mias.py", "--smoke", "--out", str(tmp_path))
    table = json.loads((tmp_path / "table_val.json").read_text())
    assert set(table) == {"gradcam", "lambda0", "supervised"}
    assert "| supervised |" in out.stdout
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3


def test_mammo_patient_model_smoke(tmp_path):
    _script("mammo_patient_model.py", "--smoke", "--out", str(tmp_path))
    assert (tmp_path / "mias-pre-pec" / "images.csv").is_file()
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    assert {"lesion_froc_mean", "by_lesion_type", "confusion"} <= set(metrics)
    assert (tmp_path / "patient_model.json").is_file()


def test_mammo_patch_pretrain_smoke(tmp_path):
    out = _script("mammo_patch_pretrain.py", "--smoke", "--out", str(tmp_path))
    assert json.loads(out.stdout.strip().splitlines()[-1])["weights"].endswith("localizer.safetensors")
    assert (tmp_path / "localizer.safetensors").is_file()


def test_check_wheel_smoke(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the wheel is built from `git archive HEAD`")
    out = _run(["bash", str(EXPERIMENTS / "check_wheel.sh"), "--smoke", sys.executable, str(tmp_path)],
               pythonpath=False)  # the installed wheel, not this checkout
    assert "predictions.json" in out.stdout
    assert (tmp_path / "run" / "predict" / "BloodImage_00000.csv").is_file()
