"""Tests for medetect.engine (checkpoints, Trainer, collate, Predictor) and medetect.models.io (save/load a model).

Models are tiny (base_width 8, 32^2 images) and datasets have four samples, so the Trainer tests take about a second
each on two shared CPU cores. The DDP test launches two gloo processes with torchrun.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import medetect.engine.checkpoint as ckpt_mod
from medetect.boxes import box_iou
from medetect.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from medetect.models.io import load_state
from medetect.engine.predictor import Predictor, tile_origins
from medetect.engine.trainer import TrainConfig, Trainer, TrainingDiverged, detection_collate
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import SquaresDataset, tiny_detector_config, weights_digest  # noqa: E402

torch.set_num_threads(1)
WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"


# ------------------------------------------------------------------------------------------------ checkpoints


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.net(x)


def _make(opt_kind: str, seed: int):
    torch.manual_seed(seed)
    model = TinyNet()
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    return model, opt, sched


def _train_step(model, opt, sched, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_optimizer(o1, o2) -> None:
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for pid in s1["state"]:
        assert s1["state"][pid].keys() == s2["state"][pid].keys()
        for name, v in s1["state"][pid].items():
            w = s2["state"][pid][name]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w) and v.dtype == w.dtype, (pid, name)
            else:
                assert v == w, (pid, name)


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_checkpoint_round_trip_is_exact(tmp_path, opt_kind):
    model, opt, sched = _make(opt_kind, 0)
    for i in range(3):
        _train_step(model, opt, sched, i)
    path = save_checkpoint(tmp_path, epoch=3, step=3, model=model, optimizer=opt, scheduler=sched, metrics={"history": [{"a": 1.5}]},
                           config={"model": {"arch": "x"}})
    assert path == tmp_path / "epoch_0003" and latest_checkpoint(tmp_path) == path
    after_save = (torch.rand(5), np.random.rand(3))  # what the RNGs give right after the save

    model2, opt2, sched2 = _make(opt_kind, 1)  # different weights, empty optimizer state
    assert not torch.equal(model2.net[0].weight, model.net[0].weight)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    assert (state["epoch"], state["step"]) == (3, 3)
    assert state["metrics"] == {"history": [{"a": 1.5}]} and state["config"] == {"model": {"arch": "x"}}
    assert torch.equal(torch.rand(5), after_save[0]) and np.array_equal(np.random.rand(3), after_save[1])  # RNG restored
    _assert_same_state(model.state_dict(), model2.state_dict())
    _assert_same_optimizer(opt, opt2)
    s1 = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    s2 = {k: v for k, v in sched2.state_dict().items() if k != "lr_lambdas"}
    assert s1 == s2 and sched2.get_last_lr() == sched.get_last_lr()
    # and training continues identically
    _train_step(model, opt, sched, 10)
    _train_step(model2, opt2, sched2, 10)
    _assert_same_state(model.state_dict(), model2.state_dict())


def test_checkpoints_are_pruned_to_keep(tmp_path):
    model, opt, sched = _make("sgd", 0)
    for e in range(1, 5):
        save_checkpoint(tmp_path, epoch=e, step=e, model=model, optimizer=opt, scheduler=sched, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["epoch_0003", "epoch_0004"]
    assert latest_checkpoint(tmp_path).name == "epoch_0004"
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 4


def test_latest_checkpoint_without_and_with_corrupt_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "last.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"no intact checkpoint \(.*last\.json is corrupt\)"):
        latest_checkpoint(tmp_path)
    (tmp_path / "last.json").write_text(json.dumps({"checkpoint": "epoch_0007"}))
    with pytest.raises(ValueError, match=r"no intact checkpoint \(.*epoch_0007 is missing\)"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize("crash_at", ["model file", "optimizer file", "pointer"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    model, opt, sched = _make("adamw", 0)
    _train_step(model, opt, sched, 0)
    save_checkpoint(tmp_path, epoch=1, step=1, model=model, optimizer=opt, scheduler=sched)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, sched, 1)

    class Crash(RuntimeError):
        pass

    real_save_file, real_write = ckpt_mod.save_file, ckpt_mod.write_text_atomically
    calls = []

    def flaky_save_file(tensors, filename, *a, **kw):
        calls.append(filename)
        if (crash_at == "model file" and len(calls) == 1) or (crash_at == "optimizer file" and len(calls) == 2):
            Path(filename).write_bytes(b"half a file")  # the crash leaves a partial file behind
            raise Crash("killed")
        return real_save_file(tensors, filename, *a, **kw)

    def flaky_write(path, text):
        if crash_at == "pointer" and Path(path).name == "last.json":
            raise Crash("killed")
        return real_write(path, text)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save_file)
    monkeypatch.setattr(ckpt_mod, "write_text_atomically", flaky_write)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, epoch=2, step=2, model=model, optimizer=opt, scheduler=sched)
    monkeypatch.undo()

    last = latest_checkpoint(tmp_path)
    assert last == tmp_path / "epoch_0001"
    fresh, fresh_opt, fresh_sched = _make("adamw", 5)
    state = load_checkpoint(last, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["epoch"] == 1
    _assert_same_state(good, fresh.state_dict())
    # the next save succeeds despite the debris
    save_checkpoint(tmp_path, epoch=2, step=2, model=model, optimizer=opt, scheduler=sched)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0002"
    assert not (tmp_path / "epoch_0002.tmp").exists()
    load_checkpoint(latest_checkpoint(tmp_path), model=fresh)
    _assert_same_state(model.state_dict(), fresh.state_dict())


# ------------------------------------------------------------------------------------------------ weights files


def test_load_state_errors_name_the_tensor(tmp_path):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    name = "heads.predictor.cls.weight"
    sd[name] = torch.zeros(5, sd[name].shape[1])
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(5, 32\) but the model expects \(3, 32\)"):
        load_state(model, tmp_path / "bad.safetensors")
    _assert_same_state(before, model.state_dict())  # nothing was loaded
    # a whole model of another width: some tensor is named with both shapes
    other = build_detector(tiny_detector_config(fpn_channels=8))
    save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"tensor features\.\S+ has shape \(\d+(, \d+)*,?\) but the model expects"):
        load_state(model, tmp_path / "other.safetensors")
    # missing tensors (strict)
    sd = {k: v for k, v in model.state_dict().items() if k != name}
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=name):
        load_state(model, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        load_state(model, tmp_path / "nope.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="safetensors"):
        load_state(model, tmp_path / "w.pt")


@pytest.mark.parametrize("d", [2, 3])
def test_save_model_load_model_round_trip(tmp_path, d):
    torch.manual_seed(0)
    cfg = tiny_detector_config(d, class_names=["a", "b"], score_thresh=0.0, stem_stride=[1, 2, 2] if d == 3 else 2)
    model = build_detector(cfg).eval()
    pre = Preprocess(ndim=d, channels=1, scale=0.5, max_value=1000.0, mean=[0.1], std=[0.2])
    save_model(model, tmp_path / "m.safetensors", kind="detector", preprocess=pre, classes=["a", "b"],
               extra={"note": "x"})
    loaded = load_model(tmp_path / "m.safetensors")
    model2, pre2 = loaded.model, loaded.preprocess
    assert not model2.training
    assert model2.config == cfg and pre2 == pre
    # Shipped models hold float16 weights; loading gives them back as float32.
    half = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    _assert_same_state(half, model2.state_dict())
    assert all(v.dtype == torch.float32 for v in model2.state_dict().values() if v.is_floating_point())
    x = torch.randn(1, 1, *(32,) * d)
    with torch.no_grad():
        a, b = model(x)["detections"][0], model2(x)["detections"][0]
        model.load_state_dict(half)
        c = model(x)["detections"][0]
    assert b["boxes"].shape[0] > 0
    for k in b:
        assert torch.equal(b[k], c[k]), k  # same outputs as the original model with rounded weights
    # and about the same as the float32 original: its best detection is found again
    assert abs(float(a["scores"][0]) - float(b["scores"][0])) < 1e-2
    assert float(box_iou(a["boxes"][:1], b["boxes"]).max()) > 0.9


def test_load_model_refuses_other_safetensors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a medetect model file"):
        load_model(tmp_path / "foreign.safetensors")
    save_weights(build_detector(tiny_detector_config()), tmp_path / "plain.safetensors")  # weights without a config
    with pytest.raises(ValueError, match="not a medetect model file"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------------ Trainer


def _train_config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=2, lr=1e-3, optimizer="adamw", warmup_iters=2, num_workers=0, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_continues_exactly(tmp_path, optimizer):
    cfg = _train_config(optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    data = SquaresDataset(4)

    torch.manual_seed(0)
    straight = Trainer(model=build_detector(tiny_detector_config()), train_data=data, config=cfg, run_dir=tmp_path / "a", progress=False)
    straight.fit()
    assert straight.step == 4

    torch.manual_seed(0)
    first = Trainer(model=build_detector(tiny_detector_config()), train_data=data, config=cfg, run_dir=tmp_path / "b", progress=False)
    real_save = first._save

    def save_then_die():
        real_save()
        raise _Killed  # the process dies right after the epoch-1 checkpoint

    first._save = save_then_die
    with pytest.raises(_Killed):
        first.fit()
    assert first.epoch == 1

    torch.manual_seed(123)  # a fresh process: other initial weights and RNG state
    second = Trainer(model=build_detector(tiny_detector_config()), train_data=data, config=cfg, run_dir=tmp_path / "b", progress=False)
    assert second.resume()
    assert (second.epoch, second.step) == (1, 2)
    second.fit()
    assert (second.epoch, second.step) == (2, 4)
    _assert_same_state(straight.model.state_dict(), second.model.state_dict())
    _assert_same_optimizer(straight.opt, second.opt)
    assert second.sched.last_epoch == straight.sched.last_epoch
    assert [h["epoch"] for h in second.history] == [1, 2]
    # the weights moved during training (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init = build_detector(tiny_detector_config()).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in straight.model.state_dict().items())


def test_resume_without_checkpoint_returns_false(tmp_path):
    t = Trainer(model=build_detector(tiny_detector_config()), train_data=SquaresDataset(2), config=_train_config(), run_dir=tmp_path,
                progress=False)
    assert t.resume() is False and t.epoch == 0


class NaNAfter(nn.Module):
    """A 'detector' whose loss is finite for ``k`` calls and then NaN."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, images, targets=None):
        self.calls += 1
        x = images.mean() * self.w
        a = (x - 2).pow(2).sum()
        b = a * 0 + (float("nan") if self.calls > self.k else 0.5)
        return {"losses": {"fit": a, "other": b}}


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    model = NaNAfter(k=4)  # 2 steps per epoch: epochs 1 and 2 are fine, epoch 3 diverges at its first step
    cfg = _train_config(epochs=4, optimizer="sgd", lr=0.1, log_every=1)
    trainer = Trainer(model=model, train_data=SquaresDataset(4), config=cfg, run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"(?s)nan.*epoch 3.*train\.lr"):
        trainer.fit()
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "epoch_0002"
    fresh = NaNAfter(k=0)
    state = load_checkpoint(last, model=fresh)
    assert state["epoch"] == 2 and state["step"] == 4
    assert torch.isfinite(fresh.w).all() and not torch.equal(fresh.w, torch.ones(3))  # trained, finite
    assert torch.equal(fresh.w, trainer.model.w)  # the diverged step never reached the weights
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows if r.get("train_loss")] == ["1", "2"]


def test_metrics_csv_has_header_and_rows(tmp_path):
    torch.manual_seed(0)
    cfg = _train_config(epochs=2, log_every=1)
    Trainer(model=build_detector(tiny_detector_config()), train_data=SquaresDataset(4), config=cfg, run_dir=tmp_path, progress=False).fit()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "images_per_s", "step", "train_loss"]  # one row per epoch
    epoch_rows = list(csv.DictReader(lines))
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    for col in ("epoch", "step", "loss", "lr", "images_per_s", "rpn_objectness", "rpn_box", "roi_classifier", "roi_box"):
        assert col in steps[0].split(","), col
    assert [int(r["step"]) for r in csv.DictReader(steps)] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in epoch_rows] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) for r in epoch_rows)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]


def test_steps_csv_is_written_for_epochs_shorter_than_log_every_and_resumes(tmp_path):
    cfg = _train_config(epochs=2, log_every=10, optimizer="sgd", lr=0.1)  # 2 steps per epoch, a row every 10 steps
    first = Trainer(model=NaNAfter(k=100), train_data=SquaresDataset(4), config=cfg, run_dir=tmp_path, progress=False)
    real_save = first._save

    def save_then_die():
        real_save()
        if first.epoch == 2:
            raise _Killed

    first._save = save_then_die
    with pytest.raises(_Killed):
        first.fit()
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "fit", "images_per_s", "loss", "lr", "other", "step"]
    rows = list(csv.DictReader(lines))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, 2), (2, 4)]  # each epoch's last step
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    with open(tmp_path / "steps.csv", "a", newline="") as f:  # a row the killed run logged after its checkpoint
        f.write("3,0.1,1.0,0.1,0.01,0.5,5\r\n")
    cfg3 = _train_config(epochs=3, log_every=10, optimizer="sgd", lr=0.1)
    second = Trainer(model=NaNAfter(k=100), train_data=SquaresDataset(4), config=cfg3, run_dir=tmp_path, progress=False)
    assert second.resume() and second.step == 4
    second.fit()
    rows = list(csv.DictReader(open(tmp_path / "steps.csv", newline="")))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, 2), (2, 4), (3, 6)]
    cfg_every = _train_config(epochs=1, log_every=2, optimizer="sgd", lr=0.1)  # the last step is already logged
    Trainer(model=NaNAfter(k=100), train_data=SquaresDataset(4), config=cfg_every, run_dir=tmp_path / "b",
            progress=False).fit()
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "steps.csv", newline=""))] == [2]


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(optimizer="adam"), "train.optimizer"),
        (dict(schedule="linear"), "train.schedule"),
        (dict(amp="fp16"), "train.amp"),
        (dict(epochs=0), "train.epochs"),
        (dict(batch_size=0), "train.batch_size"),
        (dict(lr=0.0), "train.lr"),
    ],
)
def test_train_config_validation_names_the_key(tmp_path, change, key):
    cfg = TrainConfig(**change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Trainer(model=NaNAfter(10), train_data=SquaresDataset(2), config=cfg, run_dir=tmp_path, progress=False)


def test_trainer_refuses_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Trainer(model=NaNAfter(10), train_data=SquaresDataset(0), config=_train_config(), run_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------ collate


@pytest.mark.parametrize("d", [2, 3])
def test_detection_collate_pads_to_multiple_of_32(d):
    shapes = [(30, 50, 7)[:d], (40, 33, 64)[:d]]
    samples = []
    for i, s in enumerate(shapes):
        samples.append({
            "image": torch.rand(2, *s) + 1,  # strictly positive: padding is the only zero
            "boxes": torch.tensor([[1.0] * d + [5.0] * d]) * (i + 1),
            "labels": torch.tensor([i]),
            "id": f"img{i}",
        })
    batch, targets = detection_collate(samples)
    expected = [64, 64, 64][:d]
    assert batch.shape == (2, 2, *expected)
    for i, (s, smp) in enumerate(zip(shapes, samples)):
        inside = (i, slice(None), *[slice(0, n) for n in s])
        assert torch.equal(batch[inside], smp["image"])
        rest = batch[i].clone()
        rest[inside[1:]] = 0
        assert not rest.any()  # everything else is zero padding
        assert torch.equal(targets[i]["boxes"], smp["boxes"]) and torch.equal(targets[i]["labels"], smp["labels"])
        assert targets[i]["id"] == smp["id"] and "image" not in targets[i]
    batch, _ = detection_collate(samples, size_divisor=16)
    assert batch.shape[2:] == tuple([48, 64, 64][:d])
    bad = [samples[0], {**samples[1], "image": torch.rand(3, *shapes[1])}]
    with pytest.raises(ValueError, match="channels"):
        detection_collate(bad)


# ------------------------------------------------------------------------------------------------ Predictor


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 90), st.integers(1, 40)), min_size=1, max_size=3),
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9]),
)
def test_tile_origins_cover_everything(axes, overlap):
    size = [s for s, _ in axes]
    tile = [min(t, s) for s, t in axes]
    origins = tile_origins(size, tile, overlap)
    assert len(set(origins)) == len(origins)
    cover = torch.zeros(size, dtype=torch.bool)
    for o in origins:
        assert all(0 <= oi <= s - t for oi, s, t in zip(o, size, tile))
        cover[tuple(slice(oi, oi + t) for oi, t in zip(o, tile))] = True
    assert cover.all()
    for k, (s, t) in enumerate(zip(size, tile)):
        firsts = sorted({o[k] for o in origins})
        assert firsts[0] == 0 and firsts[-1] == s - t  # the last tile is flush with the far border
        steps = np.diff(firsts)
        assert (steps <= max(1, int(t * (1 - overlap)))).all()  # regular grid (the last step may be shorter)


def test_tile_origins_examples_and_errors():
    assert tile_origins([100], [40], 0.5) == [(0,), (20,), (40,), (60,)]
    assert tile_origins([10, 5], [10, 8], 0.25) == [(0, 0)]
    assert tile_origins([64, 70], [32, 32], 0.0) == [(0, 0), (0, 32), (0, 38), (32, 0), (32, 32), (32, 38)]
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            tile_origins([10], [4], bad)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Label the connected components (3^d neighbourhood) of a bool mask ``[*S]``: 0 background, ids elsewhere."""
    d = mask.ndim
    pool = [None, nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.max_pool3d][d]
    lab = (torch.arange(mask.numel(), dtype=torch.float32).reshape(mask.shape) + 1) * mask
    while True:
        new = pool(lab[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(new, lab):
            return lab.long()
        lab = new


class BlobDetector(nn.Module):
    """A deterministic fake detector: one box per bright connected component (threshold 0.5), score 0.9, label 0."""

    def __init__(self, d: int):
        super().__init__()
        self.config = DetectorConfig(ndim=d, in_channels=1, detections_per_img=100)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images, targets=None):
        self.calls.append(tuple(images.shape))
        d = images.ndim - 2
        out = []
        for img in images:
            lab = _components(img[0] > 0.5)
            boxes = []
            for u in lab.unique():
                if u == 0:
                    continue
                idx = (lab == u).nonzero().float()
                boxes.append(torch.cat([idx.min(0).values, idx.max(0).values + 1]))
            b = torch.stack(boxes) if boxes else torch.zeros(0, 2 * d)
            out.append({"boxes": b, "scores": torch.full((b.shape[0],), 0.9), "labels": torch.zeros(b.shape[0], dtype=torch.long)})
        return {"detections": out, "losses": {}}


def _blob_image(shape, sizes, seed, forced):
    """Non-touching boxes (gap >= 2) of the given side lengths, plus ``forced`` ``(lo, side)`` ones placed first;
    returns the image ``[1, *shape]`` and the boxes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, *shape)
    boxes = []
    taken = torch.zeros(shape, dtype=torch.bool)
    candidates = [(torch.tensor(lo), side) for lo, side in forced]
    tries = 0
    while len(boxes) < len(sizes) + len(forced) and tries < 2000:
        tries += 1
        if candidates:
            lo, side = candidates.pop(0)
            side = torch.tensor(side)
        else:
            side = torch.tensor(sizes[len(boxes) - len(forced)])
            lo = torch.stack([torch.randint(0, s - int(side) + 1, (1,), generator=g)[0] for s in shape])
        hi = lo + side
        grow = tuple(slice(max(0, int(a) - 2), int(b) + 2) for a, b in zip(lo, hi))
        if taken[grow].any():
            continue
        inside = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        taken[inside] = True
        img[(0, *inside)] = 1.0
        boxes.append(torch.cat([lo, hi]).float())
    return img, torch.stack(boxes)


def _sort_boxes(b: torch.Tensor) -> torch.Tensor:
    keys = b.tolist()
    return b[sorted(range(len(keys)), key=lambda i: keys[i])]


@pytest.mark.parametrize(
    "d,shape,tile,sizes,forced",
    [
        (2, (150, 170), (64, 64), [4, 6, 8, 10, 12, 14, 16, 18, 20, 5, 9, 13, 17], [((58, 60), 12), ((90, 26), 14)]),
        (3, (72, 80, 56), (32, 32, 32), [4, 5, 6, 7, 8, 9, 10, 6], [((12, 14, 20), 8), ((28, 42, 10), 9)]),
    ],
)
def test_tiled_prediction_matches_whole_image(d, shape, tile, sizes, forced):
    img, truth = _blob_image(shape, sizes, seed=0, forced=forced)
    model = BlobDetector(d)
    whole = Predictor(model, device="cpu", tile_size=None).predict(img)
    assert torch.equal(_sort_boxes(whole["boxes"]), _sort_boxes(truth))  # the fake detector is exact
    model.calls.clear()
    tiled = Predictor(model, device="cpu", tile_size=tile, overlap=0.5, batch_size=8).predict(img)
    n_tiles = len(tile_origins(shape, tile, 0.5))
    assert sum(c[0] for c in model.calls) == n_tiles > 1 and all(c[0] <= 8 for c in model.calls)
    # Every object comes back whole at full score, at the same place as in whole-image prediction; the partial
    # boxes that tiles saw of objects they cut are contained in those and dropped.
    full = tiled["scores"] >= 0.9 - 1e-6
    got, want = _sort_boxes(tiled["boxes"][full]), _sort_boxes(whole["boxes"])
    assert got.shape == want.shape and (got - want).abs().max() <= 1.0
    # The rest are down-weighted pieces of those objects (never anything new).
    assert not (~full).any(), tiled["boxes"][~full]
    # Without the containment rule, the cut pieces would survive NMS (their IoU with the whole object is small).
    loose = Predictor(model, device="cpu", tile_size=tile, overlap=0.5, batch_size=8, cut_containment=1.1).predict(img)
    pieces = loose["boxes"][loose["scores"] < 0.9 - 1e-6]
    assert pieces.shape[0] > 0 and (loose["scores"][loose["scores"] < 0.9 - 1e-6] <= 0.9 * 0.5 + 1e-6).all()
    for b in pieces:
        assert ((b[:d] >= want[:, :d] - 1) & (b[d:] <= want[:, d:] + 1)).all(-1).any(), b
    assert tiled["boxes"].dtype == torch.float32 and tiled["labels"].dtype == torch.int64
    assert (tiled["scores"][:-1] >= tiled["scores"][1:]).all()


def test_predictor_with_a_real_model_tiles_and_clips():
    torch.manual_seed(0)
    model = build_detector(tiny_detector_config(score_thresh=0.0, detections_per_img=5))
    pred = Predictor(model, device="cpu", tile_size=(32, 32), overlap=0.25)
    out = pred.predict(torch.randn(1, 50, 70))
    n = out["boxes"].shape[0]
    assert 0 < n <= 5 * len(tile_origins((50, 70), (32, 32), 0.25))
    assert (out["boxes"] >= 0).all() and (out["boxes"][:, [0, 2]] <= 50).all() and (out["boxes"][:, [1, 3]] <= 70).all()
    with pytest.raises(ValueError, match="tile_size"):
        Predictor(model, device="cpu", tile_size=(32, 32, 32)).predict(torch.randn(1, 50, 70))


# ------------------------------------------------------------------------------------------------ DDP


def test_ddp_training_with_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "epoch_0001"
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(i["world"] == 2 and i["backend"] == "gloo" for i in infos)
    # 4 samples, batch 1 per process, 2 processes: 2 steps each
    assert infos[0]["steps"] == infos[1]["steps"] == 2
    # DDP kept the replicas identical (they started from different random weights), and rank 0 saved them
    assert infos[0]["digest"] == infos[1]["digest"]
    model = build_detector(tiny_detector_config())
    state = load_checkpoint(last, model=model)
    assert state["epoch"] == 1 and state["step"] == 2
    assert weights_digest(model) == infos[0]["digest"]


def test_out_of_memory_names_the_batch_size_and_suggests_smaller(tmp_path, monkeypatch):
    """A CUDA out-of-memory error in the forward becomes a clear message (simulated: torch's OOM error on the CPU)."""
    from medetect.engine.trainer import TrainingOutOfMemory

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets=None):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    data = [{"image": torch.zeros(1, 8, 8), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    cfg = TrainConfig(epochs=1, batch_size=2, num_workers=0, lr=0.1)
    trainer = Trainer(model=Exploding(), train_data=data, config=cfg, run_dir=tmp_path / "run", progress=False)
    with pytest.raises(TrainingOutOfMemory, match=r"train\.batch_size=2.*lower train\.batch_size"):
        trainer.fit()


def test_resaving_the_current_epoch_never_removes_what_last_json_points_at(tmp_path, monkeypatch):
    """Saving epoch e again while last.json points at epoch e: a crash in the middle leaves epoch e loadable."""
    import medetect.engine.checkpoint as ck

    model = torch.nn.Linear(2, 2)
    ck.save_checkpoint(tmp_path, epoch=1, step=10, model=model)
    first = ck.latest_checkpoint(tmp_path)
    real_replace = ck.os.replace

    def crash(src, dst):
        if str(dst).endswith("last.json"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="killed"):
        ck.save_checkpoint(tmp_path, epoch=1, step=20, model=model)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert ck.latest_checkpoint(tmp_path) == first and first.is_dir()
    fresh = torch.nn.Linear(2, 2)
    ck.load_checkpoint(first, model=fresh)
    assert not torch.equal(fresh.weight, model.weight)  # the older, complete state
    ck.save_checkpoint(tmp_path, epoch=1, step=20, model=model)
    again = torch.nn.Linear(2, 2)
    ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model=again)
    assert torch.equal(again.weight, model.weight)
