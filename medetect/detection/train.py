"""The detection task's training: datasets and transforms from a :class:`~medetect.detection.config.DataConfig`,
the model from its config, evaluation on a validation split, and the trainer (:func:`run_training`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


from .config import DataConfig, ExperimentConfig
from ..data import transforms as T
from ..data.datasets import DetectionDataset
from ..data.formats import open_dataset
from ..engine.predictor import Predictor
from ..engine.runs import prepare_run_dir
from ..engine.trainer import Trainer, seed_everything
from ..evaluation.detection import evaluate_detections
from ..models.detector import Detector, build_detector
from ..data.transforms import normalize_intensity

__all__ = ["build_transform", "build_pre_transform", "build_dataset", "evaluate_model", "highest_scores", "run_training",
           "train_detection",
           "predict_dataset"]


class _Rescale(T.Transform):
    """Divide intensities by ``max_value`` then normalise with mean/std (per channel or shared)."""

    def __init__(self, *, max_value: float, mean, std):
        self.max_value, self.mean, self.std = max_value, list(mean), list(std)

    def __call__(self, sample, generator=None):
        return {**sample, "image": normalize_intensity(sample["image"], self.max_value, self.mean, self.std)}


def build_pre_transform(cfg: DataConfig) -> T.Transform | None:
    """The deterministic first step of :func:`build_transform` (the fixed resize by ``cfg.scale``), or None."""
    return _Fixed(T.scale, factor=cfg.scale) if cfg.scale != 1.0 else None


def build_transform(cfg: DataConfig, train: bool, *, include_pre: bool = True) -> T.Compose:
    """The whole sample pipeline: fixed resize, (train) augmentation, intensity normalisation. With
    ``include_pre=False`` the fixed resize (:func:`build_pre_transform`) is left out: :func:`build_dataset` gives it
    to the dataset as its cached ``pre_transform`` so that it runs once per image instead of on every access."""
    steps: list = []
    pre = build_pre_transform(cfg)
    if pre is not None and include_pre:
        steps.append(pre)
    if train:
        if cfg.intensity:
            steps.append(T.RandomIntensity(scale=(0.85, 1.15), shift=(-12.0, 12.0), noise_std=None, gamma=None))
        if cfg.random_scale[0] != 1.0 or cfg.random_scale[1] != 1.0:
            steps.append(T.RandomScale(range=tuple(cfg.random_scale)))
        if cfg.hflip:
            steps.append(T.RandomFlip(axes=(-1,), p=0.5))
        if cfg.vflip:
            steps.append(T.RandomFlip(axes=(-2,), p=0.5))
        if cfg.rot90:
            steps.append(T.RandomRot90(axes=(-2, -1), p=0.5))
    steps.append(_Rescale(max_value=cfg.max_value, mean=cfg.mean, std=cfg.std))
    return T.Compose(steps)


class _Fixed(T.Transform):
    """A functional transform with fixed arguments, as a picklable transform object."""

    def __init__(self, fn, **kw):
        self.fn, self.kw = fn, kw

    def __call__(self, sample, generator=None):
        return self.fn(sample, **self.kw)


def build_dataset(cfg: DataConfig, split: str, train: bool) -> DetectionDataset:
    """The dataset of ``split``; samples equal ``build_transform(cfg, train)(raw_sample)``, with the fixed resize run
    once per image and cached (``cfg.cache``) as the dataset's ``pre_transform``."""
    tf = build_transform(cfg, train, include_pre=False)
    pre = build_pre_transform(cfg)
    return open_dataset(**cfg.source(), split=split, transform=tf, cache=cfg.cache, pre_transform=pre)


def predict_dataset(model: Detector, data: Iterable, *, device=None) -> tuple[list[dict], list[dict]]:
    """Run ``model`` over a dataset of samples; returns (predictions, targets) as lists of dicts."""
    pred = Predictor(model, device=device)
    preds, gts = [], []
    for s in data:
        preds.append(pred.predict(s["image"]))
        gts.append({"boxes": s["boxes"], "labels": s["labels"]})
    return preds, gts


def highest_scores(model: Detector, samples: Iterable[dict], *, device=None) -> list[float]:
    """Each sample's highest detection score (0 without a detection): how strongly the model calls it abnormal;
    the hardness of a box-free image for ``train.hard_negative_images``."""
    pred = Predictor(model, device=device)
    out = []
    for s in samples:
        scores = pred.predict(s["image"])["scores"]
        out.append(float(scores.max()) if scores.numel() else 0.0)
    return out


def evaluate_model(model: Detector, data: DetectionDataset, *, device=None) -> dict[str, float]:
    """Validation metrics for the training log: :func:`~medetect.evaluation.detection.evaluate_detections` with every
    key prefixed ``val_`` and the per-class dict flattened, i.e. ``val_images``, ``val_boxes``, ``val_map50``,
    ``val_map50_07``, ``val_coco_map`` and ``val_ap50_<class>`` per class. These are the column names of
    ``metrics.csv`` and the keys of the training history (one rule, no other names)."""
    was_training = model.training
    preds, gts = predict_dataset(model, data, device=device)
    model.train(was_training)
    res = evaluate_detections(preds, gts, class_names=list(data.classes))
    per_class = res.pop("ap50_per_class")
    out = {f"val_{k}": v for k, v in res.items()}
    out.update({f"val_ap50_{k}": v for k, v in per_class.items()})
    return out


_BODY_PREFIXES = ("features.body.", "trunk.body.")  # a detector's backbone, a localizer's trunk


def init_backbone(model, path) -> int:
    """Load the backbone tensors of the model file ``path`` (a detector's ``features.body.*`` or a localizer's
    ``trunk.body.*``) into ``model``'s backbone where name and shape match; returns how many. A file that gives none
    is an error naming it (wrong kind, width or channels)."""
    from safetensors import safe_open

    from ..models.io import read_metadata

    read_metadata(path)  # refuses anything that is not a safetensors model file, naming it
    own = {k: v for k, v in model.state_dict().items() if k.startswith("features.body.")}
    loaded = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            for prefix in _BODY_PREFIXES:
                if key.startswith(prefix):
                    name = "features.body." + key[len(prefix):]
                    if name in own and tuple(own[name].shape) == tuple(f.get_slice(key).get_shape()):
                        loaded[name] = f.get_tensor(key).to(own[name].dtype)
    if not loaded:
        raise ValueError(f"train.init_backbone {path}: no backbone tensor matches this model's (check the backbone, "
                         "base_width, norm and in_channels)")
    model.load_state_dict(loaded, strict=False)
    return len(loaded)


def run_training(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                 allow_config_change: bool = False, device=None, validate=None,
                 best_metric: str = "val_map50") -> list[dict]:
    """Train ``cfg`` in ``run_dir``; returns the history (one dict per epoch). ``validate(model, dataset, device)``
    gives the validation metrics of the log (default :func:`evaluate_model`; a task may add its own, e.g. the
    mammography lesion metrics), ``best_metric`` the one that picks the best epoch. The run folder rules
    (:func:`~medetect.engine.runs.prepare_run_dir`): a folder that already holds a run needs ``resume`` (continue it;
    a changed config needs ``allow_config_change``) or ``overwrite`` (move it aside to ``RUN.old-<UTC time>``).
    Data errors are raised before the run folder is touched."""
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False) if cfg.data.val_split else None
    if not cfg.model.class_names:
        cfg.model.class_names = list(train_ds.classes)
    if cfg.model.num_classes != len(train_ds.classes):
        raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the dataset has {len(train_ds.classes)} classes {list(train_ds.classes)}")
    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)  # the initial weights are part of the run: seeded like the data order
    model = build_detector(cfg.model)
    if cfg.train.init_backbone:  # a bad file is refused before the run folder is touched
        n = init_backbone(model, cfg.train.init_backbone)
        print(f"backbone: {n} tensors from {cfg.train.init_backbone}", flush=True)
    negatives, score_negatives = None, None
    if cfg.train.hard_negative_images:  # mining on the box-free images (e.g. normal breasts), seen unaugmented
        negatives = [i for i, r in enumerate(train_ds.records) if len(r) == 0]
        if not negatives:
            raise ValueError(f"train.hard_negative_images is {cfg.train.hard_negative_images} but split "
                             f"{cfg.data.train_split!r} has no image without boxes to mine")
        plain = build_dataset(cfg.data, cfg.data.train_split, train=False)

        def score_negatives(m, idx):
            return highest_scores(m, (plain[i] for i in idx), device=trainer.device)
    prepare_run_dir(run_dir, cfg.to_dict(), resume=resume, overwrite=overwrite, allow_config_change=allow_config_change,
                    defaults=type(cfg)().to_dict())  # keys a later medetect added are no change at their default
    if cfg.data.cache and cfg.train.num_workers > 0:
        train_ds.preload()  # decode once here: forked loader workers share the cache instead of each filling its own
    trainer = Trainer(
        model=model, train_data=train_ds, val_data=val_ds, config=cfg.train, run_dir=run_dir,
        evaluate=lambda m, d: (validate or evaluate_model)(m, d, device=trainer.device), run_config=cfg.to_dict(),
        device=device, best_metric=best_metric,
        negatives=negatives, score_negatives=score_negatives,
    )
    if resume and trainer.resume():
        print(f"resumed {run_dir} after epoch {trainer.epoch} (step {trainer.step}); continuing with epoch "
              f"{trainer.epoch + 1}", flush=True)
    return trainer.fit()


def train_detection(cfg: ExperimentConfig, run_dir: Path, **kw) -> dict:
    """The detection task's ``train`` (:mod:`medetect.engine.tasks`): :func:`run_training`, summarised by its last
    metrics row."""
    history = run_training(cfg, Path(run_dir), **kw)
    return dict(history[-1]) if history else {}
