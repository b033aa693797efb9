"""Runs never lose data: the run folder rules (refuse / resume / overwrite aside / config changes), damaged
checkpoints skipped for the newest intact one, metrics.csv without repeated rows after a resume, a full disk, strict
JSON, and the one evaluation summary with its ``val_`` keys.

Each test is a regression test for a problem a user hit (see the names); the trainings are tiny (two 32^2 images).
"""

from __future__ import annotations

import copy
import csv
import errno
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medetect.engine.checkpoint as ckpt_mod
from medetect.config import config_from_dict
from medetect.data.annotations import ImageAnnotation, write_voc
from medetect.engine.checkpoint import CheckpointWarning, checkpoint_problem, latest_checkpoint, load_checkpoint, save_checkpoint
from medetect.engine.runs import config_diff, prepare_run_dir
from medetect.engine.trainer import TrainConfig, Trainer, json_safe, truncate_metrics
from medetect.evaluation.detection import evaluate_coco, evaluate_detections, evaluate_voc
from medetect.detection.train import evaluate_model, run_training
from medetect.models.detector import build_detector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import SquaresDataset, tiny_detector_config  # noqa: E402

torch.set_num_threads(1)

CONFIG = {"model": {"arch": "faster_rcnn", "levels": [2, 3]}, "train": {"lr": 0.01, "epochs": 2}, "data": {"root": "x"}}


def _saved_run(run: Path, epochs: int = 3, keep: int = 3) -> torch.nn.Module:
    """A run folder with config.json and checkpoints epoch_0001 .. epoch_{epochs} of a small linear model."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    prepare_run_dir(run, CONFIG, resume=False)
    for e in range(1, epochs + 1):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        save_checkpoint(run, epoch=e, step=10 * e, model=model, optimizer=opt, keep=keep)
    return model


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ prepare_run_dir


def test_existing_run_without_resume_is_refused_and_left_untouched(tmp_path):
    """Problem 1: ``train --run-dir EXISTING_RUN`` without ``--resume`` overwrote and deleted the old run."""
    run = tmp_path / "run"
    _saved_run(run)
    (run / "metrics.csv").write_text("epoch,step\n1,10\n")
    before = _tree(run)
    with pytest.raises(ValueError, match=r"already holds a training run \(config\.json, last checkpoint epoch 3\): "
                                         r"pass --resume to continue it or --overwrite to move it aside") as err:
        prepare_run_dir(run, {**CONFIG, "train": {"lr": 0.5}}, resume=False)
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    assert _tree(run) == before
    # any file counts, not only a training run's
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt.*--overwrite"):
        prepare_run_dir(other, CONFIG, resume=False)
    assert (other / "notes.txt").read_text() == "mine" and not (other / "config.json").exists()


def test_fresh_and_empty_run_folders_get_the_config(tmp_path):
    prepare_run_dir(tmp_path / "new" / "run", CONFIG, resume=False)
    assert json.loads((tmp_path / "new" / "run" / "config.json").read_text()) == CONFIG
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", CONFIG, resume=False) is None
    assert json.loads((tmp_path / "empty" / "config.json").read_text()) == CONFIG


def test_overwrite_moves_the_old_run_aside_and_never_deletes(tmp_path, caplog):
    run = tmp_path / "run"
    _saved_run(run)
    before = _tree(run)
    new_cfg = {**CONFIG, "train": {"lr": 0.5, "epochs": 2}}
    with caplog.at_level(logging.WARNING, logger="medetect.engine.runs"):
        moved = prepare_run_dir(run, new_cfg, resume=False, overwrite=True)
    assert moved is not None and moved.parent == tmp_path and moved.name.startswith("run.old-20")
    assert _tree(moved) == before  # the old run, whole, under its new name
    assert str(moved) in caplog.text
    assert _tree(run) == {"config.json": json.dumps(new_cfg, indent=1).encode()}
    # a second overwrite within the same second gets its own name
    (run / "x").write_text("1")
    moved2 = prepare_run_dir(run, new_cfg, resume=False, overwrite=True)
    assert moved2 != moved and moved.is_dir() and (moved2 / "x").is_file()


def test_contradicting_or_impossible_arguments(tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite"):
        prepare_run_dir(tmp_path, CONFIG, resume=True, overwrite=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"f is a file, not a run folder"):
        prepare_run_dir(tmp_path / "f", CONFIG, resume=False)


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
    """Problem 3: resuming with a changed config was silent."""
    run = tmp_path / "run"
    _saved_run(run)
    before = _tree(run)
    changed = copy.deepcopy(CONFIG)
    changed["train"]["lr"] = 0.02
    changed["model"]["levels"] = [2, 3, 4]
    changed["data"]["new_key"] = True
    with pytest.raises(ValueError, match=r"model\.levels: \[2, 3\] -> \[2, 3, 4\], train\.lr: 0\.01 -> 0\.02, "
                                         r"data\.new_key: \"<absent>\" -> true\).*--allow-config-change"):
        prepare_run_dir(run, changed, resume=True)
    assert _tree(run) == before
    # the same config (tuples and lists alike): nothing to record, config.json untouched
    same = {**CONFIG, "model": {"arch": "faster_rcnn", "levels": (2, 3)}}
    prepare_run_dir(run, same, resume=True)
    assert _tree(run) == before


def test_allowed_config_change_is_recorded(tmp_path):
    run = tmp_path / "run"
    _saved_run(run)
    changed = copy.deepcopy(CONFIG)
    changed["train"]["epochs"] = 5
    prepare_run_dir(run, changed, resume=True, allow_config_change=True)
    assert json.loads((run / "config.json").read_text()) == changed
    changed2 = copy.deepcopy(changed)
    changed2["train"]["lr"] = 0.001
    prepare_run_dir(run, changed2, resume=True, allow_config_change=True)
    lines = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["resumed_epoch"] == 3 and lines[0]["changes"] == [{"key": "train.epochs", "old": 2, "new": 5}]
    assert lines[1]["changes"] == [{"key": "train.lr", "old": 0.01, "new": 0.001}]
    assert lines[0]["time"].endswith("Z")
    assert json.loads((run / "config.json").read_text()) == changed2


def test_resume_without_checkpoint_starts_at_zero_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medetect.engine.runs"):
        prepare_run_dir(tmp_path / "run", CONFIG, resume=True)
    assert "no checkpoint" in caplog.text and "epoch 0" in caplog.text
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == CONFIG


def test_only_rank_zero_prepares_the_folder(tmp_path, monkeypatch):
    """Under torchrun every rank runs the entry point: the others must neither refuse nor move rank 0's run."""
    run = tmp_path / "run"
    _saved_run(run, epochs=1)
    before = _tree(run)
    monkeypatch.setenv("RANK", "1")
    assert prepare_run_dir(run, {"other": 1}, resume=False, overwrite=True) is None
    assert _tree(run) == before and not list(tmp_path.glob("run.old-*"))


def test_config_diff_dotted_paths():
    assert config_diff({"a": {"b": 1, "c": [1]}}, {"a": {"b": 1, "c": (1,)}}) == []
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 2}, "d": {}}) == [("a.b", 1, 2), ("d", "<absent>", {})]


# ------------------------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damage", ["truncate model", "truncate optimizer", "garbage state", "empty model"])
def test_damaged_last_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, damage):
    """Problem 4: a truncated last checkpoint made --resume and export die with a raw SafetensorError."""
    run = tmp_path / "run"
    _saved_run(run)
    last = run / "epoch_0003"
    target = {"truncate model": "model.safetensors", "truncate optimizer": "optimizer.safetensors",
              "garbage state": "state.json", "empty model": "model.safetensors"}[damage]
    if damage == "garbage state":
        (last / target).write_text('{"epoch": 3, "st')
    else:
        size = (last / target).stat().st_size
        os.truncate(last / target, size - 7 if damage.startswith("truncate") else 0)
    assert checkpoint_problem(run / "epoch_0002") is None
    assert checkpoint_problem(last) == f"{last / target} is truncated or corrupt"
    with pytest.warns(CheckpointWarning) as rec:
        got = latest_checkpoint(run)
    assert got == run / "epoch_0002"
    msgs = [str(w.message) for w in rec]
    assert msgs == [f"{last / target} is truncated or corrupt; using the newest intact checkpoint, epoch_0002"]
    state = load_checkpoint(got, model=torch.nn.Linear(3, 2))
    assert state["epoch"] == 2


def test_no_intact_checkpoint_is_one_sentence_naming_the_folder(tmp_path):
    run = tmp_path / "run"
    _saved_run(run, epochs=2)
    for e in (1, 2):
        os.truncate(run / f"epoch_{e:04d}" / "model.safetensors", 1000)
    with pytest.raises(ValueError, match=rf"^{str(run)} holds no intact checkpoint \(.*epoch_0002/model\.safetensors is "
                                         rf"truncated or corrupt; .*epoch_0001/model\.safetensors is truncated"):
        latest_checkpoint(run)


def test_loading_a_damaged_file_directly_names_it(tmp_path):
    run = tmp_path / "run"
    _saved_run(run, epochs=1)
    f = run / "epoch_0001" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 3)
    with pytest.raises(ValueError, match=rf"{f} is truncated or damaged"):
        load_checkpoint(run / "epoch_0001", model=torch.nn.Linear(3, 2))


def test_saving_after_a_fallback_prunes_the_damaged_folder_first(tmp_path):
    run = tmp_path / "run"
    model = _saved_run(run, epochs=2, keep=2)
    os.truncate(run / "epoch_0002" / "model.safetensors", 100)
    with pytest.warns(CheckpointWarning):
        assert latest_checkpoint(run) == run / "epoch_0001"
    # epoch 2 trained again: written beside the damaged folder that last.json still names; the intact epoch 1 stays
    new = save_checkpoint(run, epoch=2, step=20, model=model, keep=2)
    assert new.name == "epoch_0002_00000020"
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0001", "epoch_0002_00000020"]
    assert latest_checkpoint(run) == new


def test_missing_pointer_uses_the_newest_intact_folder(tmp_path):
    run = tmp_path / "run"
    _saved_run(run, epochs=2)
    (run / "last.json").unlink()
    with pytest.warns(CheckpointWarning, match=r"last\.json is missing; using the newest intact checkpoint, epoch_0002"):
        assert latest_checkpoint(run) == run / "epoch_0002"


# ------------------------------------------------------------------------------------------------ disk full


def test_disk_full_during_save_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = _saved_run(run, epochs=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    real = ckpt_mod.save_file

    def full(tensors, filename, *a, **kw):
        if "optimizer" in str(filename):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match=r"^could not write checkpoint epoch 2 to .*run \(the disk is full\); the previous "
                                      r"checkpoint epoch_0001 is intact$") as err:
        save_checkpoint(run, epoch=2, step=20, model=model)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not (run / "epoch_0002.tmp").exists()  # the partial files were removed
    assert latest_checkpoint(run) == run / "epoch_0001"
    fresh = torch.nn.Linear(3, 2)
    load_checkpoint(latest_checkpoint(run), model=fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())


# ------------------------------------------------------------------------------------------------ metrics.csv


def _train_config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=2, lr=1e-3, optimizer="adamw", warmup_iters=2, num_workers=0, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_never_repeats_metrics_rows(tmp_path):
    """Problem 2: after kill -9 and --resume, metrics.csv kept the rows of the killed partial epoch twice."""
    data = SquaresDataset(4)
    torch.manual_seed(0)
    first = Trainer(model=build_detector(tiny_detector_config()), train_data=data, config=_train_config(), run_dir=tmp_path,
                    progress=False)
    real_save = first._save

    def save_twice_then_die():
        if first.epoch == 3:
            raise _Killed  # killed after epoch 3 logged its rows, before its checkpoint
        real_save()

    first._save = save_twice_then_die
    with pytest.raises(_Killed):
        first.fit()
    rows = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # epoch 3's rows are on disk
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == [1, 2, 3]

    torch.manual_seed(1)
    second = Trainer(model=build_detector(tiny_detector_config()), train_data=data, config=_train_config(), run_dir=tmp_path,
                     progress=False)
    assert second.resume() and second.step == 4
    rows = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == [1, 2]
    second.fit()
    rows = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["train_loss"] for r in rows)
    assert [h["epoch"] for h in second.history] == [1, 2, 3]


def test_truncate_metrics_keeps_rows_up_to_the_step(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("epoch,step,loss,train_loss\n1,1,0.5,\n1,2,0.4,\n1,2,,0.45\n2,3,0.3,\n2,4,0.2,\n2,4,,0.25\n")
    assert truncate_metrics(p, 2) == 3
    assert p.read_text().splitlines() == ["epoch,step,loss,train_loss", "1,1,0.5,", "1,2,0.4,", "1,2,,0.45"]
    assert truncate_metrics(p, 2) == 0 and truncate_metrics(tmp_path / "absent.csv", 0) == 0
    assert truncate_metrics(p, 0) == 3 and p.read_text().splitlines() == ["epoch,step,loss,train_loss"]


# ------------------------------------------------------------------------------------------------ strict JSON


def test_json_safe_replaces_nan_and_inf_recursively():
    """Problem 5: ``train`` printed NaN in its final "JSON" line."""
    row = {"epoch": 2, "val_map50": float("nan"), "loss": 0.5, "nested": {"a": [1.0, float("inf"), -math.inf, "s"]},
           "np": np.float32("nan"), "np_ok": np.float64(0.25), "t": torch.tensor(float("nan")), "tup": (None, True),
           "arr": np.array([1.0, np.nan])}
    out = json_safe(row)
    assert out == {"epoch": 2, "val_map50": None, "loss": 0.5, "nested": {"a": [1.0, None, None, "s"]}, "np": None,
                   "np_ok": 0.25, "t": None, "tup": [None, True], "arr": [1.0, None]}
    json.dumps(out, allow_nan=False)  # strict JSON
    assert row["val_map50"] != row["val_map50"]  # the input is not modified


# ------------------------------------------------------------------------------------------------ evaluation


def _toy_eval():
    gts = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[5.0, 5, 15, 15]]), "labels": torch.tensor([0])},
    ]
    preds = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50]]), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[5.0, 5, 15, 15]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])},
    ]
    return preds, gts


def test_evaluate_detections_has_the_one_set_of_keys():
    preds, gts = _toy_eval()
    names = ["cell", "blob", "none"]
    res = evaluate_detections(preds, gts, names)
    assert list(res) == ["images", "boxes", "map50", "map50_07", "coco_map", "ap50_per_class"]
    assert res["images"] == 2 and res["boxes"] == 3
    assert res["ap50_per_class"]["cell"] == 1.0 and res["ap50_per_class"]["blob"] == 0.0
    assert math.isnan(res["ap50_per_class"]["none"])  # no ground truth: nan, left out of the mean
    assert res["map50"] == 0.5
    assert res["map50"] == evaluate_voc(preds, gts, class_names=names)["map"]
    assert res["map50_07"] == evaluate_voc(preds, gts, class_names=names, use_07_metric=True)["map"]
    assert res["coco_map"] == evaluate_coco(preds, gts, class_names=names)["map"]
    assert all(isinstance(v, float) for v in res["ap50_per_class"].values())


def test_evaluate_model_keys_are_the_summary_keys_prefixed_val():
    class Named(SquaresDataset):
        classes = ["bright", "dim"]

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(score_thresh=0.0))
    data = Named(3)
    res = evaluate_model(model, data, device="cpu")
    assert model.training  # the model's mode is restored
    assert list(res) == ["val_images", "val_boxes", "val_map50", "val_map50_07", "val_coco_map", "val_ap50_bright", "val_ap50_dim"]
    assert res["val_images"] == 3


# ------------------------------------------------------------------------------------------------ run_training


def _voc(root: Path) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(2):
        img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
        img[4:16, 6:18] = 220
        Image.fromarray(img).save(root / "JPEGImages" / f"img{i}.png")
        write_voc(ImageAnnotation(f"JPEGImages/img{i}.png", np.array([[4.0, 6.0, 16.0, 18.0]]), ["cell"], image_shape=(32, 32)),
                  root / "Annotations" / f"img{i}.xml")
        ids.append(f"img{i}")
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _experiment(root: Path, **train):
    model = {k: v for k, v in tiny_detector_config(num_classes=1).__dict__.items() if k != "class_names"}
    return config_from_dict({
        "model": model,
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "optimizer": "adamw", "warmup_iters": 1, "num_workers": 0,
                  "log_every": 1, **train},
        "data": {"root": str(root), "classes": ["cell"], "mean": [0.2], "std": [0.3], "hflip": False, "vflip": False,
                 "intensity": False},
    })


def test_run_training_refuses_resumes_and_falls_back(tmp_path, capsys):
    """Problems 1-4 end to end through ``run_training``, the function behind ``medetect train``."""
    from medetect.apps.export import export_from_run

    _voc(tmp_path / "voc")
    run = tmp_path / "run"
    history = run_training(_experiment(tmp_path / "voc"), run, device="cpu")
    assert [h["epoch"] for h in history] == [1, 2] and "val_map50" in history[-1] and "val_ap50_cell" in history[-1]
    json.dumps(json_safe(history[-1]), allow_nan=False)
    before = _tree(run)
    with pytest.raises(ValueError, match="last checkpoint epoch 2"):
        run_training(_experiment(tmp_path / "voc"), run, device="cpu")
    with pytest.raises(ValueError, match=r"train\.epochs: 2 -> 3"):
        run_training(_experiment(tmp_path / "voc", epochs=3), run, resume=True, device="cpu")
    assert _tree(run) == before
    # a truncated last checkpoint: export and resume both fall back to epoch 1 and say which file was bad
    os.truncate(run / "epoch_0002" / "model.safetensors", 1000)
    with pytest.warns(CheckpointWarning, match=r"epoch_0002/model\.safetensors is truncated or corrupt; using the newest intact checkpoint, epoch_0001"):
        export_from_run(run, tmp_path / "model.safetensors")
    with pytest.warns(CheckpointWarning, match="newest intact checkpoint, epoch_0001"):
        history = run_training(_experiment(tmp_path / "voc", epochs=3), run, resume=True, allow_config_change=True, device="cpu")
    assert "after epoch 1 (step 1); continuing with epoch 2" in capsys.readouterr().out
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [int(r["step"]) for r in csv.DictReader(open(run / "steps.csv"))] == [1, 2, 3]
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["train_loss"]] == [1, 2, 3]
    assert json.loads((run / "config_changes.jsonl").read_text())["resumed_epoch"] == 1  # the intact one
    # --overwrite moves everything aside
    run_training(_experiment(tmp_path / "voc", epochs=1), run, overwrite=True, device="cpu")
    assert len(list(tmp_path.glob("run.old-*"))) == 1
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["train_loss"]] == [1]


def test_keys_added_by_a_later_version_are_no_change_at_their_default():
    from medetect.engine.runs import config_diff

    old = {"train": {"lr": 0.01}}
    new = {"train": {"lr": 0.01, "new_key": 3}}
    assert config_diff(old, new) == [("train.new_key", "<absent>", 3)]
    assert config_diff(old, new, defaults={"train": {"lr": 0.02, "new_key": 3}}) == []
    assert config_diff(old, {"train": {"lr": 0.01, "new_key": 4}}, defaults={"train": {"new_key": 3}}) == [
        ("train.new_key", "<absent>", 4)]
