"""Hard negative mining on box-free training images (``train.hard_negative_images``; issue 8: normal breasts): the
epoch sampler's extra draws, the mining inside ``run_training``, exact resume across a mining epoch, and the refusal
when there is nothing to mine (before the run folder is made)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medetect.data.annotations import ImageAnnotation, write_voc
from medetect.engine.trainer import _EpochSampler
from medetect.detection.train import run_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runs import _experiment as _runs_experiment  # noqa: E402

torch.set_num_threads(1)


def test_sampler_draws_extras_uniformly_from_the_pool_then_the_hardest_first():
    s = _EpochSampler(6, seed=3, extra=3, pool=[3, 4, 5])
    assert len(s) == 9
    s.set_epoch(0)
    a = list(s)
    assert all(a.count(i) == 1 for i in (0, 1, 2))  # images with boxes: once each
    assert sum(a.count(i) for i in (3, 4, 5)) == 6  # each negative once + 3 uniform extras
    assert list(s) == a  # (seed, epoch) fixes the order
    s.set_epoch(1)
    assert list(s) != a
    s.hard = [5, 3, 4]
    b = list(s)
    assert sorted(b) == [0, 1, 2, 3, 3, 4, 4, 5, 5]
    s.extra, s.hard = 4, [5]
    assert len(s) == 10 and sorted(list(s)) == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]  # a short list repeats
    assert len(_EpochSampler(6, seed=3)) == 6 and sorted(_EpochSampler(6, seed=3)) == list(range(6))


def _voc(root: Path, negatives: int = 4) -> None:
    """Two images with a bright square (the lesion) and ``negatives`` box-free ones, two of which hold an
    unannotated bright square: the hard negatives a mining model should score highest."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(2 + negatives):
        img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
        boxes, labels = np.zeros((0, 4)), []
        if i < 2:
            img[4:16, 6:18] = 220
            boxes, labels = np.array([[4.0, 6.0, 16.0, 18.0]]), ["cell"]
        elif i < 4:
            img[14:26, 10:22] = 200
        Image.fromarray(img).save(root / "JPEGImages" / f"img{i}.png")
        write_voc(ImageAnnotation(f"JPEGImages/img{i}.png", boxes, labels, image_shape=(32, 32)),
                  root / "Annotations" / f"img{i}.xml")
        ids.append(f"img{i}")
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _experiment(root: Path, **train):
    """test_runs' tiny VOC experiment, with mining from epoch 2 (every 2 epochs) and every detection kept."""
    cfg = _runs_experiment(root, epochs=3, val_every=0, keep_checkpoints=3, hard_negative_images=0.5,
                           hard_negative_start=1, hard_negative_every=2, **train)
    cfg.model.score_thresh = 0.0
    return cfg


def test_mining_runs_in_training_and_a_killed_run_resumes_exactly(tmp_path):
    _voc(tmp_path / "voc")
    run = tmp_path / "run"
    history = run_training(_experiment(tmp_path / "voc"), run, device="cpu")
    assert "hard_negative_mean_score" not in history[0]  # epoch 1: uniform extra draws
    row = history[1]  # epoch 2 starts with a mining round; epoch 3 reuses its list
    assert 0.0 <= row["negative_mean_score"] <= row["hard_negative_mean_score"] <= 1.0
    assert "hard_negative_mean_score" not in history[2]
    state = json.loads((run / "epoch_0003" / "state.json").read_text())
    hard = state["metrics"]["hard_negatives"]
    assert sorted(hard) == [2, 3, 4, 5]  # every box-free image, hardest first
    steps = [int(json.loads((run / f"epoch_{e:04d}" / "state.json").read_text())["step"]) for e in (1, 2, 3)]
    assert steps == [4, 8, 12]  # (6 images + 3 extra draws) // batch 2, every epoch
    # a run killed during epoch 3 resumes from epoch 2 with the list mined then: identical epoch 3
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "epoch_0003")
    (copy / "last.json").unlink()
    with pytest.warns(UserWarning, match="last.json is missing; using the newest intact checkpoint, epoch_0002"):
        run_training(_experiment(tmp_path / "voc"), copy, resume=True, device="cpu")
    assert json.loads((copy / "epoch_0003" / "state.json").read_text())["metrics"]["hard_negatives"] == hard
    a, b = load_file(run / "epoch_0003" / "model.safetensors"), load_file(copy / "epoch_0003" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_to_mine_is_refused_before_the_run_folder_exists(tmp_path):
    _voc(tmp_path / "voc", negatives=0)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train\.hard_negative_images is 0\.5 but split 'train' has no image without boxes"):
        run_training(_experiment(tmp_path / "voc"), run, device="cpu")
    assert not run.exists()


def test_other_tasks_refuse_mining_before_the_run_folder_exists(tmp_path):
    from medetect.apps.train import train
    from medetect.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mias_attention.yaml",
                      overrides=["train.hard_negative_images=0.2"])
    with pytest.raises(ValueError, match="works with task: detection or mammography, this config's task is 'attention'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
