"""Helpers shared by the engine tests, and a DDP worker script.

Run by ``tests/test_engine.py`` as ``python -m torch.distributed.run --nproc_per_node=2 --standalone _ddp_worker.py
RUN_DIR``: trains the tiny 2D detector for one epoch on CPU (gloo) and has every rank write a digest of its final
weights to ``RUN_DIR/rank{r}.json``, so the test can check that the ranks stayed in sync.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

if __package__ in (None, ""):  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medetect.models.detector import DetectorConfig  # noqa: E402


def tiny_detector_config(d: int = 2, arch: str = "faster_rcnn", **kw) -> DetectorConfig:
    base = dict(
        arch=arch, ndim=d, in_channels=1, num_classes=2, backbone="resnet18", base_width=8, fpn_channels=16,
        roi_hidden=32, roi_output_size=4, levels=[2, 3], anchor_sizes=[[8], [16]], aspect_ratios=[1.0],
        rpn_pre_nms_top_n=[100, 50], rpn_post_nms_top_n=[50, 20], rpn_batch_size_per_image=32,
        roi_batch_size_per_image=32,
    )
    base.update(kw)
    return DetectorConfig(**base)


class SquaresDataset(Dataset):
    """``n`` synthetic samples ``{"image": [1, S, S], "boxes": [G, 4], "labels": [G]}``: bright squares on a dark,
    noisy background; sample ``i`` is a pure function of ``i`` (no global RNG), some samples have no objects."""

    def __init__(self, n: int = 4, size: int = 32):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1234 + i)
        s = self.size
        img = 0.1 * torch.rand(1, s, s, generator=g)
        count = int(torch.randint(0, 3, (1,), generator=g)) if i % 3 else 0
        boxes, labels = [], []
        for _ in range(count):
            w = int(torch.randint(6, 12, (1,), generator=g))
            y, x = (int(v) for v in torch.randint(0, s - w, (2,), generator=g))
            lab = int(torch.randint(0, 2, (1,), generator=g))
            img[0, y : y + w, x : x + w] = 1.0 if lab == 0 else 0.6
            boxes.append([y, x, y + w, x + w])
            labels.append(lab)
        return {
            "image": img,
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def weights_digest(model: torch.nn.Module) -> list[float]:
    return [float(v.double().sum()) for v in model.state_dict().values() if v.is_floating_point()]


def main(run_dir: str) -> None:
    from medetect.engine.trainer import TrainConfig, Trainer
    from medetect.models.detector import build_detector

    torch.set_num_threads(1)
    torch.manual_seed(int(os.environ.get("RANK", "0")))  # different initial weights per rank: DDP must broadcast
    model = build_detector(tiny_detector_config())
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, optimizer="adamw", warmup_iters=1, num_workers=0, log_every=1)
    trainer = Trainer(model=model, train_data=SquaresDataset(4), config=cfg, run_dir=Path(run_dir), progress=False)
    assert trainer.ddp is not None, "WORLD_SIZE > 1 must wrap the model in DistributedDataParallel"
    trainer.fit()
    rank = int(os.environ["RANK"])
    info = {"rank": rank, "world": trainer.world, "backend": torch.distributed.get_backend(), "steps": trainer.step,
            "digest": weights_digest(trainer.model)}
    (Path(run_dir) / f"rank{rank}.json").write_text(json.dumps(info))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
