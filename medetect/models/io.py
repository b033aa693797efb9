"""One model file: a ``.safetensors`` whose metadata says what the model is and how its input must be prepared, one
atomic writer (:func:`save_model`) and one loader (:func:`load_model`). Never unpickles anything.

Metadata (every value a JSON string, as safetensors requires)::

    format_version  "2"
    kind            "detector" (2D/3D detectors, the LUNA stage one, the 2D slice model) | "fpr" (stage-two classifier)
                    | "attention" (attention classifier, medetect.models.attention)
                    | "localizer" (classification + localisation of one window, medetect.models.localizer)
                    | "rcnn" (R-CNN: warped-proposal CNN, SVMs and box regressors, medetect.models.rcnn)
    config          the model's config dict (DetectorConfig / FPRConfig)
    preprocess      a :class:`Preprocess` dict: how a raw image becomes the model's input tensor
    classes         class names, in label order
    task            the task that trained the model and whose predict / evaluate serve it (``medetect.apps.tasks``):
                    ``detection``, ``mammography``, ``attention``, ``organ-localisation``, ``luna-detection``,
                    ``luna-fpr``, ``lineage``. Files written before the key existed get the task of their kind
                    (:func:`default_task`); nothing is guessed from class names or folders.
    extra           free-form provenance (run, epoch, training data, ...)

A new kind of model is one entry in :data:`BUILDERS` (``{kind: (config dict) -> nn.Module}``). Files of the first
release (``format: medetect-detector-v1``, the FPR ``medetect_fpr_config`` and slice ``medetect_slices2d_config``
files) still load: their metadata is converted on reading.

Layering: this module imports torch, safetensors, the standard library and ``medetect.models`` only. Applying a
:class:`Preprocess` to an image is :func:`medetect.data.preprocess.prepare` (the data layer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomically
from .attention import AttentionConfig, build_attention
from .detector import DetectorConfig, build_detector
from .fp_reduction import FPRConfig, build_fpr
from .localizer import LocalizerConfig, build_localizer
from .rcnn import RCNNConfig, build_rcnn

__all__ = [
    "BUILDERS",
    "FORMAT_VERSION",
    "LoadedModel",
    "Preprocess",
    "check_safetensors_file",
    "default_task",
    "fpr_preprocess",
    "load_model",
    "load_state",
    "read_metadata",
    "read_tensors",
    "save_model",
]

FORMAT_VERSION = 2
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclasses.dataclass
class Preprocess:
    """What the model expects (pure data, stored with the weights; applied by ``medetect.data.preprocess.prepare``).

    Geometry: ``spacing`` is the target mm per ARRAY axis (``z, y, x`` / ``y, x``); ``None`` = no resampling (the
    array grid is used as stored). ``orientation`` ``None`` = the array as stored, no re-orientation (the only value
    supported today; a code such as ``"LPS"`` is reserved for a later release and refused). ``scale`` resizes by a
    factor (2D photos/microscopy; applied after resampling).

    Intensity is ONE family: with ``window = [lo, hi]`` values are mapped ``lo -> 0, hi -> 1`` and clipped to [0, 1]
    (CT Hounsfield units); otherwise ``(x / max_value - mean) / std`` (per channel when ``mean``/``std`` have one
    entry per channel). ``bit_depth`` / ``value_range`` describe the raw inputs the model was trained on (e.g. 8 and
    ``[0, 255]`` for PNG/JPEG photos, ``[-1024, 3071]`` HU for CT); ``None`` = not recorded (no check).

    ``pyramid``: extra zoom factors (each in (0, 1): coarser grids) at which the model ALSO runs, the image pyramid
    of the classic detectors: level ``f`` is the prepared image resized by ``f``, so an object ``1 / f`` times larger
    than the largest the model learned at full resolution appears at a learned size. Detections of all levels are
    mapped to the input grid and merged by NMS (:meth:`medetect.engine.predictor.Predictor.predict_image`).
    ``None`` = the prepared grid only. A model should have been trained on the same levels (the LUNA16 trainer
    samples patches from every level). ``pyramid_min_size``: on a coarser level, detections whose longest side is
    below this many voxels OF THAT LEVEL are dropped, so each coarser level answers only for objects too large for
    the finer ones (the valid ranges of SNIP, Singh & Davis 2018); 0 keeps all."""

    ndim: int = 2
    channels: int = 1
    spacing: list[float] | None = None
    orientation: str | None = None
    window: list[float] | None = None
    max_value: float = 255.0
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.5])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.25])
    scale: float = 1.0
    bit_depth: int | None = None
    value_range: list[float] | None = None
    pyramid: list[float] | None = None
    pyramid_min_size: float = 0.0

    def __post_init__(self) -> None:
        if self.ndim not in (1, 2, 3):
            raise ValueError(f"preprocess.ndim must be 1, 2 or 3, got {self.ndim!r}")
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"preprocess.channels must be a positive int, got {self.channels!r}")
        if self.spacing is not None:
            sp = [float(self.spacing)] * self.ndim if isinstance(self.spacing, (int, float)) else [float(v) for v in self.spacing]
            if len(sp) != self.ndim or not all(v > 0 for v in sp):
                raise ValueError(f"preprocess.spacing must be {self.ndim} positive numbers (mm per array axis), got {self.spacing!r}")
            self.spacing = sp
        if self.orientation is not None:
            raise ValueError(f"preprocess.orientation must be null (the array as stored), got {self.orientation!r}")
        if self.window is not None:
            w = [float(v) for v in self.window]
            if len(w) != 2 or not w[0] < w[1]:
                raise ValueError(f"preprocess.window must be [lo, hi] with lo < hi, got {self.window!r}")
            self.window = w
        if not self.max_value > 0:
            raise ValueError(f"preprocess.max_value must be positive, got {self.max_value!r}")
        self.mean = [float(v) for v in (self.mean if isinstance(self.mean, (list, tuple)) else [self.mean])]
        self.std = [float(v) for v in (self.std if isinstance(self.std, (list, tuple)) else [self.std])]
        if not all(s > 0 for s in self.std):
            raise ValueError(f"preprocess.std must be positive, got {self.std!r}")
        if not self.scale > 0:
            raise ValueError(f"preprocess.scale must be positive, got {self.scale!r}")
        if self.pyramid is not None:
            f = [float(v) for v in (self.pyramid if isinstance(self.pyramid, (list, tuple)) else [self.pyramid])]
            if not all(0 < v < 1 for v in f):
                raise ValueError(f"preprocess.pyramid must be zoom factors in (0, 1), got {self.pyramid!r}")
            self.pyramid = f or None
        if not self.pyramid_min_size >= 0:
            raise ValueError(f"preprocess.pyramid_min_size must be >= 0, got {self.pyramid_min_size!r}")
        if self.value_range is not None:
            r = [float(v) for v in self.value_range]
            if len(r) != 2 or not r[0] < r[1]:
                raise ValueError(f"preprocess.value_range must be [lo, hi] with lo < hi, got {self.value_range!r}")
            self.value_range = r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown preprocess key {unknown[0]!r}; allowed: {sorted(names)}")
        return cls(**dict(d))


@dataclasses.dataclass
class LoadedModel:
    """What :func:`load_model` returns: the model (eval mode), its kind, preprocessing, class names and metadata."""

    model: torch.nn.Module
    kind: str
    preprocess: Preprocess
    classes: list[str]
    meta: dict
    task: str = "detection"


def _build_detector(config: dict) -> torch.nn.Module:
    return build_detector(DetectorConfig(**config), pretrained=False)  # the file holds the weights


def _build_fpr(config: dict) -> torch.nn.Module:
    return build_fpr(FPRConfig(**config))


def _build_attention(config: dict) -> torch.nn.Module:
    return build_attention(AttentionConfig(**config), pretrained=False)


def _build_localizer(config: dict) -> torch.nn.Module:
    return build_localizer(LocalizerConfig(**config))


def _build_rcnn(config: dict) -> torch.nn.Module:
    return build_rcnn(RCNNConfig(**config))


BUILDERS: dict[str, Callable[[dict], torch.nn.Module]] = {"detector": _build_detector, "fpr": _build_fpr,
                                                          "attention": _build_attention,
                                                          "localizer": _build_localizer, "rcnn": _build_rcnn}


# ------------------------------------------------------------------------------------------------ writing


def save_model(model: torch.nn.Module, path: str | os.PathLike, *, kind: str, preprocess: Preprocess,
               classes: list[str] | tuple[str, ...], task: str | None = None, extra: dict | None = None,
               fp16: bool = True) -> Path:
    """Write ``model`` (needs ``model.config.to_dict()``) as one self-describing file, atomically (temporary file in
    the same folder, fsync, ``os.replace``), mode 0644. ``fp16`` stores floating-point tensors in float16 (half the
    size; loading casts back to the model's float32)."""
    from safetensors.torch import save

    if kind not in BUILDERS:
        raise ValueError(f"kind must be one of {sorted(BUILDERS)}, got {kind!r}")
    if not isinstance(preprocess, Preprocess):
        raise ValueError(f"preprocess must be a medetect.models.io.Preprocess, got {type(preprocess).__name__}")
    meta = {
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(preprocess.to_dict()),
        "classes": json.dumps([str(c) for c in classes]),
        "task": task or default_task(kind, extra or {}, model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if fp16:
        sd = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in sd.items()}
    blob = save(sd, metadata=meta)
    return write_atomically(path, lambda tmp: tmp.write_bytes(blob))


# ------------------------------------------------------------------------------------------------ reading


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, read by hand BEFORE safetensors opens it: anything that is not one
    (a pickle ``.pt``, a renamed pickle, a text file, a truncated file) raises one friendly ``ValueError``. A file
    whose header is intact but whose tensor data is shorter (or longer) than the header's offsets say, e.g. a copy
    cut short, is "truncated or damaged", with both lengths."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    bad = ValueError(f"{path}: not a safetensors model file: pickled checkpoints are never loaded")
    if not path.is_file():
        raise bad
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise bad
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2]
    if not all(isinstance(v, int) for v in ends):
        raise bad
    need, have = max(ends, default=0), size - 8 - n
    if have != need:
        raise ValueError(f"{path} is truncated or damaged: its header describes {need} bytes of tensor data but the "
                         f"file holds {have} (an interrupted download or copy?); fetch or copy it again")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's raw ``__metadata__`` (strings), after :func:`check_safetensors_file`."""
    meta = check_safetensors_file(path).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _json(meta: Mapping[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{path}: model metadata has no {key!r} entry")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata entry {key!r} is not valid JSON ({e.msg})") from None


CT_VALUE_RANGE = (-3024.0, 4095.0)  # HU a CT model accepts without a warning (12-bit CT with the usual rescale)


def _detector_preprocess_v1(cfg: dict, pre: dict, extra: dict) -> Preprocess:
    """First-release detector metadata -> :class:`Preprocess` (LUNA models carried the resampling in ``extra``)."""
    luna = extra.get("luna")
    if luna:
        return Preprocess(ndim=3, channels=1, spacing=list(luna["spacing"]), window=[luna["hu_lo"], luna["hu_hi"]],
                          value_range=list(CT_VALUE_RANGE))
    mv = float(pre.get("max_value", 255.0))
    return Preprocess(ndim=int(cfg.get("ndim", 2)), channels=int(cfg.get("in_channels", 1)),
                      scale=float(pre.get("scale", 1.0)), max_value=mv, mean=pre.get("mean", [0.5]),
                      std=pre.get("std", [0.25]), bit_depth=8 if mv == 255.0 else None,
                      value_range=[0.0, 255.0] if mv == 255.0 else None)


def fpr_preprocess(cfg: dict) -> Preprocess:
    """The FPR classifier extracts its own multi-scale cubes; the preprocess records the finest grid and the window."""
    nd = int(cfg.get("ndim", 3))
    return Preprocess(ndim=nd, channels=int(cfg.get("in_channels", 1)), spacing=[float(cfg.get("spacing_mm", 1.0))] * nd,
                      window=list(cfg.get("hu_window", [-1000.0, 400.0])))


def default_task(kind: str, extra: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """The task of a model file written before files recorded one: fixed by its kind (and, for the organ localiser
    and the LUNA16 stage one, by what their first release wrote into ``extra``; a Fast R-CNN, which needs proposals
    from outside, belongs to the lineage)."""
    if kind == "detector":
        if (config or {}).get("arch") == "fast_rcnn":
            return "lineage"
        if extra.get("task") == "organ-localisation":
            return "organ-localisation"
        return "luna-detection" if "luna" in extra else "detection"
    return {"fpr": "luna-fpr", "attention": "attention", "localizer": "lineage", "rcnn": "lineage"}.get(kind, kind)


def _normalise_meta(meta: Mapping[str, str], path: Path) -> tuple[str, dict, Preprocess, list[str], dict]:
    """Any supported metadata (current or first-release) -> (kind, config, preprocess, classes, extra)."""
    if "format_version" in meta:
        v = meta["format_version"]
        if v != str(FORMAT_VERSION):
            raise ValueError(f"{path}: model format_version {v} is newer than this medetect understands ({FORMAT_VERSION}); upgrade medetect")
        kind = meta.get("kind", "")
        if kind not in BUILDERS:
            raise ValueError(f"{path}: unknown model kind {kind!r}; this medetect knows {sorted(BUILDERS)}")
        return (kind, _json(meta, "config", path), Preprocess.from_dict(_json(meta, "preprocess", path)),
                list(_json(meta, "classes", path, [])), _json(meta, "extra", path, {}))
    if meta.get("format") == "medetect-detector-v1":
        cfg, extra = _json(meta, "config", path), _json(meta, "extra", path, {})
        pre = _detector_preprocess_v1(cfg, _json(meta, "preprocess", path), extra)
        classes = cfg.get("class_names") or [str(i) for i in range(int(cfg.get("num_classes", 1)))]
        return "detector", cfg, pre, list(classes), extra
    if "medetect_fpr_config" in meta:
        cfg = _json(meta, "medetect_fpr_config", path)
        return "fpr", cfg, fpr_preprocess(cfg), ["nodule"], {}
    if "medetect_slices2d_config" in meta:
        cfg = _json(meta, "medetect_slices2d_config", path)
        # the slice model's input: CT slices (+ context slices as channels) in the lung window, no resampling
        pre = Preprocess(ndim=2, channels=int(cfg.get("in_channels", 1)), window=[-1000.0, 400.0])
        return "detector", cfg, pre, list(cfg.get("class_names") or ["nodule"]), {}
    raise ValueError(f"{path}: not a medetect model file (its metadata names no model kind)")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file, after :func:`check_safetensors_file`: the one reader of
    weight files (model files, checkpoints, optimizer states). Damage is a ``ValueError`` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(header.get("__metadata__") or {})
    except (SafetensorError, OSError) as e:  # damage the header check cannot see (e.g. overlapping offsets)
        raise ValueError(f"{path} is truncated or damaged: {e}") from None


def load_state(model: torch.nn.Module, weights: str | os.PathLike, *, strict: bool = True) -> dict[str, str]:
    """Load the safetensors file ``weights`` into ``model`` (float16 tensors are copied into the model's own dtype);
    returns the file's metadata. A tensor of the wrong shape, or (``strict``) missing / unexpected tensors, is one
    ``ValueError`` naming the file and the tensor: the one weight loader of the library."""
    weights = Path(weights)
    sd, meta = read_tensors(weights)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{weights}: tensor {k} has shape {tuple(v.shape)} but the model expects "
                             f"{tuple(own[k].shape)}; does the config match the weights?")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{weights}: weights do not match the model config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedModel:
    """A model file (any supported format) -> a :class:`LoadedModel` in eval mode on ``device`` (default CPU). The
    file is checked before safetensors opens it. A training run folder loads with :func:`medetect.apps.load_model`
    (which knows the checkpoint layout, a layer above this one)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a model file (a training run folder loads with "
                         "medetect.apps.load_model; the command line accepts both)")
    return load_from_metadata(read_metadata(path), path, path, device=device)


def load_from_metadata(meta: Mapping[str, str], weights: Path, source: Path,
                       device: str | torch.device | None = None) -> LoadedModel:
    """Build the model that ``meta`` (file metadata, any supported format) describes and load ``weights`` into it.
    ``source`` names the file or folder in messages."""
    kind, cfg, pre, classes, extra = _normalise_meta(meta, source)
    task = str(meta.get("task") or default_task(kind, extra, cfg))
    try:
        model = BUILDERS[kind](cfg)
    except TypeError as e:
        raise ValueError(f"{source}: the stored {kind} config does not fit this medetect ({e})") from None
    load_state(model, weights)
    model.eval()
    if device is not None:
        model.to(device)
    out_meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": cfg, "preprocess": pre.to_dict(),
                "classes": classes, "task": task, "extra": extra,
                "source_format": meta.get("format", meta.get("format_version", ""))}
    return LoadedModel(model=model, kind=kind, preprocess=pre, classes=classes, meta=out_meta, task=task)
