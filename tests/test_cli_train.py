"""`medetect train` / `medetect luna train` as a new user runs them: a used run folder is refused (nothing touched),
--overwrite moves it aside, --resume with a changed config needs --allow-config-change, bad config values fail
before the run folder exists, and the final line is strict JSON (issue 14, trials 3 and 8)."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from medetect.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_detector_config  # noqa: E402
from test_runs import _voc  # noqa: E402


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def tiny_cfg(tmp_path) -> Path:
    _voc(tmp_path / "voc")
    model = {k: v for k, v in tiny_detector_config(num_classes=1).__dict__.items() if k != "class_names"}
    cfg = {"model": model,
           "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "optimizer": "adamw", "warmup_iters": 1,
                     "num_workers": 0, "log_every": 1},
           "data": {"root": "voc", "classes": ["cell"], "mean": [0.2], "std": [0.3], "hflip": False, "vflip": False,
                    "intensity": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_train_refuses_a_used_run_folder_and_overwrite_moves_it_aside(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--threads", "1"]) == 0
    summary = _last_json(capsys)
    assert "val_map50" in summary
    before = _tree(run)
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _tree(run) == before  # nothing touched
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--threads", "1", "--overwrite"]) == 0
    _last_json(capsys)
    old = list(tmp_path.glob("run.old-*"))
    assert len(old) == 1 and _tree(old[0]) == before  # the old run, whole, under its new name


def test_resume_with_changed_config_needs_allow_config_change(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--resume", "--epochs", "2"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--resume", "--epochs", "2",
                 "--allow-config-change", "--threads", "1"]) == 0
    _last_json(capsys)
    rec = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert rec and rec[-1]["changes"][0]["key"] == "train.epochs"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(set(rows))  # no row twice
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--allow-config-change"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("data.scale=-1", "data.scale"), ("data.std=[0]", "data.std[0]"), ("train.grad_clip=-5", "train.grad_clip"),
    ("train.epochs=0", "train.epochs"), ("model.nms_thresh=1.5", "model.nms_thresh"), ("train.nope=1", "train.nope"),
    ("data.mean=[0.5, 0.5]", "data.mean"),
])
def test_bad_config_values_fail_before_the_run_folder_exists(tiny_cfg, tmp_path, capsys, override, key):
    run = tmp_path / "run"
    assert main(["train", str(tiny_cfg), "--run-dir", str(run), "--set", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "tiny.yaml" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_luna_train_refuses_a_used_run_folder(tmp_path, capsys):
    from medetect.data.phantoms import write_luna16_dataset

    write_luna16_dataset(tmp_path / "luna", n_scans=1, seed=1, shape=(24, 48, 48), nodules_per_scan=[1], n_excluded=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["luna", "train", str(tmp_path / "luna"), "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    assert main(["luna", "train", "--config", str(Path(__file__).parents[1] / "configs" / "luna_fpr.yaml"),
                 "--run-dir", str(tmp_path / "r2")]) == 2
    assert "task: luna-detection" in capsys.readouterr().err


def _resume_line(capsys, prog: str) -> list[str]:
    """The one line a Ctrl-C leaves on stderr -> the resume command's words (without the leading ``medetect``)."""
    import shlex

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    head, sep, cmd = lines[0].partition("; resume with: ")
    assert head == f"{prog}: interrupted" and sep, lines[0]
    words = shlex.split(cmd)
    assert words[0] == "medetect" and words[-1] == "--resume"
    return words[1:]


def test_ctrl_c_during_train_names_the_resume_command_and_it_resumes(tiny_cfg, tmp_path, capsys, monkeypatch):
    from medetect.engine.trainer import Trainer

    run = tmp_path / "run dir"  # a space: the command must be quoted for the shell
    real_save = Trainer._save

    def save_then_ctrl_c(self):
        real_save(self)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint

    monkeypatch.setattr(Trainer, "_save", save_then_ctrl_c)
    argv = ["train", str(tiny_cfg), "--run-dir", str(run), "--epochs", "2", "--threads", "1"]
    assert main(argv) == 130
    words = _resume_line(capsys, "medetect train")
    assert words == argv + ["--resume"]
    monkeypatch.setattr(Trainer, "_save", real_save)
    assert main(words) == 0  # the command it names continues the run
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [1, 2]


def test_ctrl_c_resume_command_drops_overwrite_and_names_the_default_run_dir(tiny_cfg, tmp_path, capsys, monkeypatch):
    import medetect.apps.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(medetect.apps.train, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny.yaml", "--over", "--set", "train.lr=0.01"]) == 130  # --over: argparse's abbreviation
    assert _resume_line(capsys, "medetect train") == ["train", "tiny.yaml", "--set", "train.lr=0.01", "--run-dir",
                                                      str(Path("runs") / "tiny"), "--resume"]
    assert main(["train", "tiny.yaml", "--resume", "--run-dir=r"]) == 130
    assert _resume_line(capsys, "medetect train") == ["train", "tiny.yaml", "--run-dir=r", "--resume"]
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        main(["train", "tiny.yaml", "--debug"])


def test_ctrl_c_during_luna_and_lineage_training_names_the_resume_command(tmp_path, capsys, monkeypatch):
    import medetect.apps.train
    import medetect.lineage.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(medetect.apps.train, "train", interrupted)
    monkeypatch.setattr(medetect.lineage.train, "train_lineage", interrupted)
    (tmp_path / "luna").mkdir()
    (tmp_path / "voc").mkdir()
    cases = [
        ("medetect luna train", ["luna", "train", str(tmp_path / "luna"), "--run-dir", str(tmp_path / "r1")]),
        ("medetect luna-fpr train", ["luna-fpr", "train", str(tmp_path / "luna"), "--run-dir", str(tmp_path / "r2"),
                                     "--overwrite"]),
        ("medetect lineage train", ["lineage", "train", "--data", f"{tmp_path / 'voc'}:train", "--out",
                                    str(tmp_path / "lin"), "--steps", "yolo"]),
    ]
    for prog, argv in cases:
        assert main(argv) == 130, prog
        assert _resume_line(capsys, prog) == [w for w in argv if w != "--overwrite"] + ["--resume"]


def test_ctrl_c_elsewhere_is_one_line_without_a_resume_command(tmp_path, capsys, monkeypatch):
    import medetect.apps.predict

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(medetect.apps.predict, "predict_paths", interrupted)
    assert main(["predict", "--weights", "w.safetensors", "x.png", "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == "medetect predict: interrupted"
