"""Shipping and loading trained detectors: one ``.safetensors`` file whose metadata carries the model config and the
input preprocessing, so that ``medetect predict --weights W`` needs nothing else. Never unpickles anything."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.io import read_image
from ..data.transforms import scale as scale_sample
from ..engine.checkpoint import load_weights, save_weights
from .detector import Detector, DetectorConfig, build_detector

__all__ = ["normalize_intensity", "save_model", "load_model", "Preprocess", "predict_paths", "evaluate_spec", "export_onnx"]


def normalize_intensity(image: torch.Tensor, max_value: float, mean, std) -> torch.Tensor:
    """``(image / max_value - mean) / std`` with per-channel or shared mean/std (a new float tensor; the input is
    untouched). The one definition used by training transforms and by shipped models' preprocessing."""
    x = image.float() / max_value  # a new tensor: the in-place steps below never touch the input
    shape = (-1,) + (1,) * (x.ndim - 1)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    m = m.reshape(shape) if m.numel() > 1 else m
    s = s.reshape(shape) if s.numel() > 1 else s
    if torch.broadcast_shapes(x.shape, m.shape, s.shape) == x.shape:
        return x.sub_(m).div_(s)  # same values, two fewer full-size temporaries
    return (x - m) / s


@dataclasses.dataclass
class Preprocess:
    """What the model expects: images scaled by ``scale``, intensities ``(x / max_value - mean) / std``."""

    scale: float = 1.0
    max_value: float = 255.0
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.5])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.25])

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[C, *S]`` raw pixels -> the normalised float tensor the model takes (resized by ``scale``)."""
        x = torch.as_tensor(np.asarray(image, dtype=np.float32)) if not isinstance(image, torch.Tensor) else image.float()
        if self.scale != 1.0:
            # The resize of training (medetect.data.transforms.scale): same grid, so boxes map back by / scale exactly.
            x = scale_sample({"image": x}, self.scale)["image"]
        return normalize_intensity(x, self.max_value, self.mean, self.std)


def save_model(model: Detector, path: str | Path, preprocess: Preprocess, extra: dict | None = None) -> None:
    meta = {
        "format": "medetect-detector-v1",
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(dataclasses.asdict(preprocess)),
        "extra": json.dumps(extra or {}),
    }
    # Shipped in float16 (half the size; detections agree with float32 to well below the score resolution that
    # matters); loading casts back to float32.
    save_weights(model, Path(path), metadata=meta, dtype=torch.float16)


def load_model(path: str | Path, device=None) -> tuple[Detector, Preprocess]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "medetect-detector-v1":
        raise ValueError(f"{path}: not a medetect detector (metadata format={meta.get('format')!r}); "
                         "train checkpoints hold the config in the run folder's config.json")
    cfg = DetectorConfig(**json.loads(meta["config"]))
    model = build_detector(cfg)
    load_weights(model, path)
    model.eval()
    if device is not None:
        model.to(device)
    return model, Preprocess(**json.loads(meta["preprocess"]))


def _image_files(paths: Sequence[str]) -> list[Path]:
    exts = (".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff", ".bmp", ".mhd", ".mha", ".nii", ".nii.gz", ".npz", ".dcm")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(q.suffix.lower() == ".dcm" for q in p.iterdir()):
            out.extend(sorted(q for q in p.iterdir() if q.name.lower().endswith(exts)))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def predict_paths(weights, paths: Sequence[str], out_dir: Path, *, tile_size=None, overlap=0.25, device=None, score_thresh=0.05) -> list[Path]:
    """Detect in every image/volume; writes ``<stem>.csv`` per input (boxes in input voxels, array order) and
    ``predictions.json`` (all inputs)."""
    from ..engine.predictor import Predictor

    model, pre = load_model(weights, device=device)
    names = model.config.class_names or [str(i) for i in range(model.config.num_classes)]
    tile = None if tile_size is None else [int(round(t * pre.scale)) for t in tile_size]
    predictor = Predictor(model, device=device, tile_size=tile, overlap=overlap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, everything = [], {}
    for f in _image_files(paths):
        img = read_image(f)
        if img.num_channels != model.config.in_channels:
            raise ValueError(f"{f}: image has {img.num_channels} channels, the model expects {model.config.in_channels}")
        det = predictor.predict(pre(img.array))
        keep = det["scores"] >= score_thresh
        boxes = (det["boxes"][keep] / pre.scale).numpy()
        scores, labels = det["scores"][keep].numpy(), det["labels"][keep].numpy()
        d = boxes.shape[1] // 2
        axes = ("z", "y", "x")[-d:] if d <= 3 else tuple(f"a{i}" for i in range(d))
        stem = f.name[: -len(".nii.gz")] if f.name.lower().endswith(".nii.gz") else (f.stem if f.is_file() else f.name)
        path = out_dir / f"{stem}.csv"
        n = 1
        while path in written:  # two inputs with the same name (other folders): never overwrite a result
            n += 1
            path = out_dir / f"{stem}_{n}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*(a + "0" for a in axes), *(a + "1" for a in axes), "label", "score"])
            for b, lab, s in zip(boxes, labels, scores):
                w.writerow([*(f"{v:.2f}" for v in b), names[int(lab)], f"{s:.4f}"])
        everything[str(f)] = {"boxes": boxes.round(2).tolist(), "labels": [names[int(i)] for i in labels], "scores": scores.round(4).tolist()}
        written.append(path)
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    return written


def evaluate_spec(weights, spec: str, *, device=None, plot_dir=None) -> dict:
    """Evaluate on ``FOLDER:SPLIT`` (a Pascal VOC folder); returns VOC/COCO mAP and per-class AP@0.5."""
    from ..data.annotations import read_voc_folder
    from ..data.datasets import DetectionDataset
    from ..evaluation.detection import evaluate_coco, evaluate_voc
    from ..engine.predictor import Predictor

    if ":" not in spec:
        raise ValueError(f"--data must be FOLDER:SPLIT (e.g. ../shared/data/bccd:val), got {spec!r}")
    folder, split = spec.rsplit(":", 1)
    model, pre = load_model(weights, device=device)
    names = list(model.config.class_names)
    records, report = read_voc_folder(folder, split, classes=names)
    ds = DetectionDataset(records=records, root=folder, classes=names)
    if len(ds) == 0:
        raise ValueError(f"{spec}: the split lists no images")
    predictor = Predictor(model, device=device)
    preds, gts = [], []
    for i in range(len(ds)):
        s = ds.raw_sample(i)
        det = predictor.predict(pre(s["image"]))
        det["boxes"] = det["boxes"] / pre.scale
        preds.append(det)
        gts.append({"boxes": s["boxes"], "labels": s["labels"]})
    voc = evaluate_voc(preds, gts, class_names=names)
    voc07 = evaluate_voc(preds, gts, class_names=names, use_07_metric=True)
    coco = evaluate_coco(preds, gts, class_names=names)
    if plot_dir:
        from ..evaluation.plots import pr_curve_png

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        pr_curve_png(voc, Path(plot_dir) / "pr_voc50.png", class_names=names)
    return {
        "images": len(ds), "boxes": int(sum(len(r) for r in records)), "skipped_zero_size": report.skipped_zero_size,
        "map50": float(voc["map"]), "map50_07": float(voc07["map"]), "coco_map": float(coco["map"]),
        "ap50_per_class": {k: float(v) for k, v in voc["per_class"].items()},
    }


class _DenseGraph(torch.nn.Module):
    """The exportable part of a detector: backbone + FPN + the dense head (RPN or RetinaNet head) raw outputs."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        feats = self.model.features(image)
        if self.model.rpn is not None:
            logits, deltas = self.model.rpn.head(feats)
        else:
            logits, deltas = self.model.heads.head(feats)
            return (*feats, logits, deltas)
        return (*feats, *logits, *deltas)


def export_onnx(weights, out: str | Path, image_shape: Sequence[int]) -> Path:
    """Export the dense part of a shipped model (backbone, FPN and the RPN / RetinaNet head's raw outputs) to ONNX.

    Proposal selection, RoI pooling of the selected proposals and NMS stay in medetect: their output sizes depend on
    the data, which an ONNX graph cannot express exactly. Needs the ``onnx`` package (``pip install medetect[onnx]``).
    """
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'medetect[onnx]'") from e
    model, _ = load_model(weights)
    if len(image_shape) != model.config.ndim:
        raise ValueError(f"--onnx needs {model.config.ndim} sizes (the model is {model.config.ndim}D), got {list(image_shape)}")
    dummy = torch.zeros(1, model.config.in_channels, *image_shape)
    out = Path(out)
    torch.onnx.export(_DenseGraph(model).eval(), (dummy,), str(out), input_names=["image"], opset_version=17, dynamo=False)
    return out


def export_from_run(run_dir: str | Path, out: str | Path, extra: dict | None = None) -> Path:
    """Turn a training run's last checkpoint (+ its config.json) into a shippable single-file model."""
    from ..config import config_from_dict
    from ..engine.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint (last.json) to export")
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    model = build_detector(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    pre = Preprocess(scale=cfg.data.scale, max_value=cfg.data.max_value, mean=list(cfg.data.mean), std=list(cfg.data.std))
    state = json.loads((ckpt / "state.json").read_text())
    info = {"run": run_dir.name, "epoch": state["epoch"], "step": state["step"], **(extra or {})}
    save_model(model, out, pre, extra=info)
    return Path(out)
