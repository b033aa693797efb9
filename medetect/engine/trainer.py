"""Training loop: bf16 autocast on GPU, gradient clipping, warm-up + cosine/step schedule, a checkpoint every epoch,
exact ``resume``, a NaN-loss guard, progress bar (on a terminal; plain lines in a log), CSV metrics (``metrics.csv``
one row per epoch, ``steps.csv`` every ``log_every`` steps and at the last step of every epoch, so a short epoch
logs too; a new file is written whole, rows are appended one whole line at a time; TensorBoard when installed),
``curves.png`` and the best validation epoch (``best.json`` + ``best.safetensors``, see :mod:`medetect.engine.curves`), seeds, DDP via torchrun.

Resuming is exact at epoch granularity: the data order of epoch ``e`` depends only on ``(seed, e)``, and the model,
optimizer, scheduler and RNG states are restored from the last complete checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..schema import check, option
from ..files import write_text_atomically
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from .curves import BEST_JSON, BEST_WEIGHTS, read_best, write_curves

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "TrainingOutOfMemory", "seed_everything", "detection_collate",
           "json_safe", "truncate_metrics"]


def json_safe(obj):
    """``obj`` with every NaN / inf float replaced by None (recursively through dicts, lists and tuples; numpy and
    0-d torch scalars become Python numbers), so that ``json.dumps(json_safe(x), allow_nan=False)`` is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        obj = obj.tolist()  # a Python number, or nested lists of them
        if isinstance(obj, list):
            return json_safe(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the rows of the CSV ``path`` logged at or before global ``step`` (the step of the checkpoint a run
    resumes from), rewriting the file atomically; returns how many rows were dropped. A killed run's partial epoch
    logged rows after its last checkpoint: without this they would appear twice once the epoch is trained again.
    Rows without a readable step are kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    if not header:
        return 0

    def keep(row: dict) -> bool:
        try:
            return int(float(row.get("step") or "")) <= step
        except ValueError:
            return True

    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows):
        return 0
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="", extrasaction="ignore")
    w.writeheader()
    w.writerows(kept)
    write_text_atomically(path, buf.getvalue())
    return len(rows) - len(kept)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept on disk."""


class TrainingOutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message suggests a smaller batch or patch."""


@dataclass
class TrainConfig:
    epochs: int = option(24, doc="passes over the training set", ge=1)
    batch_size: int = option(4, doc="images (or patches) per step per process", ge=1)
    lr: float = option(0.01, doc="peak learning rate after warm-up", gt=0)
    optimizer: str = option("sgd", doc="sgd (momentum, the Faster R-CNN recipe) or adamw", choices=("sgd", "adamw"))
    momentum: float = option(0.9, doc="SGD momentum", ge=0, lt=1)
    weight_decay: float = option(1e-4, doc="L2 (sgd) / decoupled (adamw) weight decay", ge=0)
    warmup_iters: int = option(200, doc="steps of linear warm-up from warmup_factor * lr", ge=0)
    warmup_factor: float = option(0.001, doc="learning-rate factor at the first warm-up step", gt=0, le=1)
    schedule: str = option("cosine", doc="cosine, step (x0.1 at 2/3 and 8/9 of training) or constant",
                           choices=("cosine", "step", "constant"))
    grad_clip: float = option(10.0, doc="max global gradient norm; 0 disables clipping", ge=0)
    amp: str = option("auto", doc="mixed precision: auto (bf16 autocast on CUDA), bf16 or off",
                      choices=("auto", "bf16", "off"))
    seed: int = option(0, doc="seed of weights init, data order and augmentation", ge=0)
    num_workers: int = option(2, doc="data loader worker processes (0: load in the main process)", ge=0)
    val_every: int = option(1, doc="epochs between validations (0: never)", ge=0)
    keep_checkpoints: int = option(2, doc="most recent checkpoints kept in the run folder", ge=1)
    log_every: int = option(10, doc="steps between metric rows", ge=1)
    max_steps_per_epoch: int = option(0, doc="cap on steps per epoch (0: the whole dataset; for smoke tests)", ge=0)
    extra: dict = option({}, doc="free-form settings carried into the run record")
    init_backbone: str = option("", doc="detection task: start the backbone from this model file's backbone (e.g. a "
                                "localizer pretrained on lesion vs background patches, as Shen et al. 2019); tensors "
                                "of matching name and shape are loaded, the rest keep their initialisation; empty: "
                                "from scratch", path=True)
    hard_negative_images: float = option(0.0, doc="hard negative mining on box-free training images (e.g. normal "
                                         "breasts): each epoch also draws this fraction of the training set from the "
                                         "box-free images, the ones the current model scores highest (its highest "
                                         "detection score) first; detection task only; 0: off", ge=0, le=4)
    hard_negative_every: int = option(5, doc="epochs between re-scoring the box-free images for "
                                      "hard_negative_images", ge=1)
    hard_negative_start: int = option(10, doc="epochs trained before the first mining (until then the extra draws "
                                      "of hard_negative_images are box-free images taken uniformly)", ge=0)

    def validate(self, prefix: str = "train") -> None:
        """Ranges and choices of every key (see :mod:`medetect.schema`)."""
        check(self, prefix)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def detection_collate(samples: list[dict], size_divisor: int = 32) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack samples ``{"image": [C, *S], "boxes", "labels"}`` into ``[B, C, *S_max]`` (zero padding at the high end,
    rounded up to ``size_divisor`` so every pyramid level divides evenly) and a list of targets."""
    shapes = torch.tensor([s["image"].shape for s in samples])  # [B, 1 + d]
    c = int(shapes[:, 0].max())
    if (shapes[:, 0] != c).any():
        raise ValueError(f"all images of a batch need the same number of channels, got {shapes[:, 0].tolist()}")
    size = [int(math.ceil(int(m) / size_divisor) * size_divisor) for m in shapes[:, 1:].max(0).values]
    batch = samples[0]["image"].new_zeros((len(samples), c, *size))
    targets = []
    for i, s in enumerate(samples):  # loop over the images of a batch
        img = s["image"]
        batch[(i, slice(None), *[slice(0, n) for n in img.shape[1:]])] = img
        t = {k: v for k, v in s.items() if k != "image"}
        targets.append(t)
    return batch, targets


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        warm = 1.0
        if step < cfg.warmup_iters:
            a = step / max(1, cfg.warmup_iters)
            warm = cfg.warmup_factor * (1 - a) + a
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
        if cfg.schedule == "step":
            return warm * (0.1 ** sum(step >= total_steps * m for m in (2 / 3, 8 / 9)))
        return warm

    return f


class _EpochSampler(torch.utils.data.Sampler):
    """Random order that depends only on (seed, epoch, ``hard``): resuming at an epoch replays the same order.

    With ``extra`` > 0 each epoch also draws ``extra`` indices from ``pool`` (hard negative mining): the first
    ``extra`` of ``hard`` (hardest first, repeated when it is shorter) once it is set, else a seeded uniform draw."""

    def __init__(self, n: int, seed: int, extra: int = 0, pool: list[int] | None = None):
        self.n, self.seed, self.epoch, self.extra = n, seed, 0, int(extra)
        self.pool = list(pool or [])
        self.hard: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def extras(self, g: torch.Generator) -> list[int]:
        if not self.extra or not self.pool:
            return []
        if self.hard:
            reps = -(-self.extra // len(self.hard))
            return (self.hard * reps)[: self.extra]
        pick = torch.randint(len(self.pool), (self.extra,), generator=g).tolist()
        return [self.pool[i] for i in pick]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = list(range(self.n)) + self.extras(g)
        return iter([order[i] for i in torch.randperm(len(order), generator=g).tolist()])

    def __len__(self) -> int:
        return self.n + (self.extra if self.pool else 0)


class Trainer:
    """Train a model whose forward ``model(images, targets)`` returns ``{"losses": {...}, ...}``."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        train_data: Dataset,
        config: TrainConfig,
        run_dir: Path,
        val_data: Dataset | None = None,
        evaluate: Callable[[torch.nn.Module, Iterable], dict[str, float]] | None = None,
        collate: Callable = detection_collate,
        run_config: dict | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        best_metric: str | None = "val_map50",
        negatives: list[int] | None = None,
        score_negatives: Callable[[torch.nn.Module, list[int]], list[float]] | None = None,
    ):
        """``progress``: report progress (a tqdm bar when stderr is a terminal, else a plain line every
        ``log_every`` steps, and one line per epoch). ``best_metric``: the validation key (higher is better) that
        picks the best epoch, whose weights are kept in ``best.safetensors`` with ``best.json``; None: no best.
        ``negatives`` (indices of ``train_data`` without boxes) and ``score_negatives(model, indices)`` (their
        hardness, e.g. the highest detection score) drive ``config.hard_negative_images``."""
        config.validate()
        if len(train_data) == 0:
            raise ValueError("the training dataset is empty: check the data spec / split")
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if device is None:
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            else:
                device = "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(config.seed + self.rank)
        self.model = model.to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True
            )
        self.train_data, self.val_data = train_data, val_data
        self.evaluate, self.collate = evaluate, collate
        self.run_config = run_config or {}
        self.progress = progress and self.rank == 0
        self.best_metric = best_metric
        self.best: dict | None = None
        extra = int(round(config.hard_negative_images * len(train_data)))
        if extra and (not negatives or score_negatives is None):
            raise ValueError("train.hard_negative_images is set but the training split has no image without boxes "
                             "to mine (or this task does not support it)")
        if extra and self.world > 1:
            raise ValueError("train.hard_negative_images needs a single training process (not torchrun)")
        self.negatives, self.score_negatives = list(negatives or []), score_negatives
        if self.world > 1:
            self.sampler = DistributedSampler(train_data, num_replicas=self.world, rank=self.rank, shuffle=True, seed=config.seed)
        else:
            self.sampler = _EpochSampler(len(train_data), config.seed, extra, self.negatives if extra else None)
        self.loader = DataLoader(
            train_data, batch_size=config.batch_size, sampler=self.sampler, num_workers=config.num_workers,
            collate_fn=collate, drop_last=len(train_data) >= config.batch_size * self.world * 2,
            persistent_workers=config.num_workers > 0, pin_memory=self.device.type == "cuda",
        )
        steps = len(self.loader) if not config.max_steps_per_epoch else min(len(self.loader), config.max_steps_per_epoch)
        self.steps_per_epoch = max(1, steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(config, config.epochs * self.steps_per_epoch))
        self.epoch, self.step = 0, 0
        self.history: list[dict] = []
        amp = config.amp
        self.autocast = self.device.type == "cuda" and amp in ("auto", "bf16") or amp == "bf16"
        self._tb = None

    # ------------------------------------------------------------------------------------------- state
    def resume(self) -> bool:
        """Continue from the newest intact checkpoint in ``run_dir`` (a damaged newer one is skipped with a warning
        naming it); False when there is none (training starts at epoch 0). ``metrics.csv`` keeps only the rows up to
        the resumed step, so the rows of an interrupted epoch never appear twice."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model=self.model, optimizer=self.opt, scheduler=self.sched)
            self.epoch, self.step = state["epoch"], state["step"]
            self.history = state.get("metrics", {}).get("history", [])
            hard = state.get("metrics", {}).get("hard_negatives")
            if isinstance(self.sampler, _EpochSampler):
                self.sampler.hard = [int(i) for i in hard] if hard else None
        if self.rank == 0:
            truncate_metrics(self.run_dir / "metrics.csv", self.step)
            truncate_metrics(self.run_dir / "steps.csv", self.step)
            best = read_best(self.run_dir)
            self.best = best if best is not None and int(best.get("step", 0)) <= self.step else None
        return ckpt is not None

    def _save(self) -> None:
        if self.rank != 0:
            return
        save_checkpoint(
            self.run_dir, epoch=self.epoch, step=self.step, model=self.model, optimizer=self.opt, scheduler=self.sched,
            metrics={"history": self.history, "hard_negatives": getattr(self.sampler, "hard", None)},
            config=self.run_config, keep=self.cfg.keep_checkpoints,
        )

    def _mine(self) -> dict:
        """Hard negative mining at the start of an epoch (``train.hard_negative_*``): score the box-free training
        images with the current model and draw the highest-scoring ones first from this epoch on. The model's state
        at an epoch's start is its checkpoint, so a resumed run mines the same images."""
        cfg, s = self.cfg, self.sampler
        if not (isinstance(s, _EpochSampler) and s.extra and s.pool) or self.epoch < cfg.hard_negative_start:
            return {}
        if (self.epoch - cfg.hard_negative_start) % cfg.hard_negative_every:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            scores = np.asarray(self.score_negatives(self.model, self.negatives), dtype=np.float64)
        self.model.train(was_training)
        order = np.argsort(-scores, kind="stable")
        s.hard = [self.negatives[i] for i in order]
        top = scores[order[: min(s.extra, len(order))]]
        return {"hard_negative_mean_score": float(top.mean()), "negative_mean_score": float(scores.mean())}

    def _update_best(self, row: dict) -> None:
        """Keep the weights of the best validation epoch so far (``best.safetensors``, written then renamed) and
        point ``best.json`` at them; called after the epoch's checkpoint, so ``best.json`` never runs ahead of it."""
        if self.rank != 0 or not self.best_metric or self.best_metric not in row:
            return
        value = row[self.best_metric]
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            return
        if self.best is not None and not value > float(self.best["value"]):
            return
        tmp = self.run_dir / (BEST_WEIGHTS + ".tmp")
        save_weights(self.model, tmp)
        os.replace(tmp, self.run_dir / BEST_WEIGHTS)
        self.best = {"metric": self.best_metric, "value": float(value), "epoch": row["epoch"], "step": row["step"],
                     "weights": BEST_WEIGHTS}
        write_text_atomically(self.run_dir / BEST_JSON, json.dumps(self.best, indent=1))

    def _curves(self) -> None:
        if self.rank != 0:
            return
        try:
            write_curves(self.run_dir, self.history)
        except Exception as e:  # a picture must never stop a training run
            warnings.warn(f"could not draw {self.run_dir / 'curves.png'}: {e}", RuntimeWarning, stacklevel=2)

    def _log(self, row: dict, name: str = "metrics.csv") -> None:
        if self.rank != 0:
            return
        path = self.run_dir / name
        new = not path.exists() or path.stat().st_size == 0
        keys = sorted(row)
        if not new:
            with open(path) as f:
                header = f.readline().strip().split(",")
            if set(keys) - set(header):
                # New columns (e.g. the first validation metrics): rewrite the file with the union of columns.
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
                keys = header + sorted(set(keys) - set(header))
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
                write_text_atomically(path, buf.getvalue())  # a kill during the rewrite leaves the old file whole
            else:
                keys = header
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        if new:
            w.writeheader()
        w.writerow(row)
        if new:
            write_text_atomically(path, buf.getvalue())  # header and first row together: never a file without its header
        else:
            with open(path, "a", newline="") as f:
                f.write(buf.getvalue())  # one write of one whole line
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self._tb = False
        if self._tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self._tb.add_scalar(k, v, row.get("step", 0))

    # ------------------------------------------------------------------------------------------- loop
    def _to_device(self, images, targets):
        images = images.to(self.device, non_blocking=True)
        targets = [{k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        return images, targets

    def _oom(self, images: torch.Tensor) -> TrainingOutOfMemory:
        return TrainingOutOfMemory(
            f"out of GPU memory at epoch {self.epoch + 1}, step {self.step} with train.batch_size={self.cfg.batch_size} "
            f"and inputs of shape {tuple(images.shape)}: lower train.batch_size, or the patch / image size; the last "
            f"complete checkpoint in {self.run_dir} is kept"
        )

    def fit(self) -> list[dict]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        net = self.ddp or self.model
        while self.epoch < self.cfg.epochs:
            mined = self._mine()
            self.model.train()
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.train_data, "set_epoch"):  # e.g. PatchDataset: new patches every epoch
                self.train_data.set_epoch(self.epoch)
            bar = None
            if self.progress and sys.stderr.isatty():  # a bar on a terminal; plain lines in a log file
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False)
            t0, seen, sums = time.perf_counter(), 0, {}
            for i, (images, targets) in enumerate(self.loader):
                if i >= self.steps_per_epoch:
                    break
                images, targets = self._to_device(images, targets)
                try:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        out = net(images, targets)
                    losses = out["losses"]
                    loss = sum(losses.values())
                    vals = {k: float(v.detach()) for k, v in losses.items()}  # one sync per step, for the log and guard
                except torch.cuda.OutOfMemoryError as e:
                    raise self._oom(images) from e
                total = sum(vals.values())
                if not math.isfinite(total):
                    kept = (f"the last good checkpoint in {self.run_dir} is kept" if self.epoch > 0 else
                            "no checkpoint was written (it diverged in the first epoch)")
                    raise TrainingDiverged(
                        f"loss became {total} at epoch {self.epoch + 1}, step {self.step} ({vals}); {kept}. Lower "
                        "train.lr or raise train.warmup_iters."
                    )
                self.opt.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except torch.cuda.OutOfMemoryError as e:
                    raise self._oom(images) from e
                if self.cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                self.opt.step()
                self.sched.step()
                self.step += 1
                seen += images.shape[0] * self.world
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                rate = seen / max(1e-9, time.perf_counter() - t0)
                if bar is not None:
                    bar.set_postfix(loss=f"{total:.3f}", img_s=f"{rate:.1f}")
                    bar.update(1)
                last = i + 1 >= self.steps_per_epoch or i + 1 >= len(self.loader)
                if self.step % self.cfg.log_every == 0 or last:  # and the epoch's last step: short epochs too
                    lr = self.sched.get_last_lr()[0]
                    self._log({"epoch": self.epoch + 1, "step": self.step, "loss": total, "lr": lr, "images_per_s": rate,
                               **vals}, "steps.csv")
                    if self.progress and bar is None and self.step % self.cfg.log_every == 0:
                        print(f"epoch {self.epoch + 1}/{self.cfg.epochs} step {i + 1}/{self.steps_per_epoch} "
                              f"loss={total:.4g} lr={lr:.3g} images_per_s={rate:.3g}", flush=True)
            if bar is not None:
                bar.close()
            self.epoch += 1
            n = max(1, min(self.steps_per_epoch, i + 1))
            row = {"epoch": self.epoch, "step": self.step, "train_loss": sum(sums.values()) / n, "images_per_s": seen / max(1e-9, time.perf_counter() - t0), **mined}
            if self.evaluate is not None and self.val_data is not None and self.cfg.val_every and self.epoch % self.cfg.val_every == 0 and self.rank == 0:
                row.update(self.evaluate(self.model, self.val_data))
            self.history.append(row)
            self._log(row)
            self._save()
            self._update_best(row)
            self._curves()
            if self.progress:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        return self.history
