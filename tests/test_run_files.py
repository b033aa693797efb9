"""Runs a person can read (issue 13): metrics.csv one row per epoch, steps.csv per step, curves.png each epoch,
best.json + best.safetensors for the best validation epoch and `medetect export --best`, plain progress lines in a
log (no carriage returns) and a resumed run that keeps its best."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from medetect.engine.load import load_model
from medetect.cli import main
from medetect.engine.trainer import TrainConfig, Trainer
from medetect.models.detector import build_detector

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import SquaresDataset, tiny_detector_config  # noqa: E402


def _trainer(run: Path, scores: list[float], epochs: int = 3) -> Trainer:
    torch.manual_seed(0)
    calls = iter(scores)
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=1e-3, optimizer="adamw", warmup_iters=0, num_workers=0, schedule="constant",
                      log_every=1)
    return Trainer(model=build_detector(tiny_detector_config()), train_data=SquaresDataset(2),
                   val_data=SquaresDataset(2), evaluate=lambda m, d: {"val_map50": next(calls), "val_images": 2},
                   config=cfg, run_dir=run)


def test_run_files_best_and_plain_progress_lines(tmp_path, capsys):
    run = tmp_path / "run"
    _trainer(run, [0.5, 0.4], epochs=2).fit()
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err  # not a terminal: no bar, plain lines
    assert "epoch 1/2 step 1/1 loss=" in out.out and "epoch=2 step=2 train_loss=" in out.out
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]
    assert [r["step"] for r in csv.DictReader(open(run / "steps.csv"))] == ["1", "2"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((run / "best.json").read_text())
    assert best == {"metric": "val_map50", "value": 0.5, "epoch": 1, "step": 1, "weights": "best.safetensors"}


def test_resume_keeps_the_best_and_export_best_uses_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": tiny_detector_config().to_dict(), "data": {}}))
    _trainer(run, [0.6], epochs=1).fit()
    second = _trainer(run, [0.5], epochs=2)
    assert second.resume()
    second.fit()  # epoch 2 scores 0.5 < 0.6: the best stays at epoch 1
    assert json.loads((run / "best.json").read_text())["epoch"] == 1
    capsys.readouterr()
    assert main(["export", str(run), "--best", "--out", str(tmp_path / "best.safetensors")]) == 0
    best_sd = load_model(tmp_path / "best.safetensors").model.state_dict()
    last_sd = load_model(run).model.state_dict()
    assert any(not torch.equal(best_sd[k], last_sd[k].half().float()) for k in best_sd)  # epoch 1, not epoch 2


def test_export_best_without_validation_is_a_sentence(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": tiny_detector_config().to_dict(), "data": {}}))
    t = _trainer(run, [], epochs=1)
    t.val_data = None
    t.fit()
    capsys.readouterr()
    assert main(["export", str(run), "--best", "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "no best.json" in capsys.readouterr().err
