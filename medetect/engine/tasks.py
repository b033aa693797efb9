"""The task plug-in interface. A task is one application of the library (detection, mammography, attention, organ
localisation, LUNA16 stage one and two, the lineage): its package exports a :class:`Task` and the registry
(:mod:`medetect.apps.tasks`) lists them. ``medetect train`` picks the task from the config's ``task:`` key;
``predict`` and ``evaluate`` from the model file's recorded task (``meta.task``, :mod:`medetect.models.io`). Nothing
is guessed from folder layouts or class names.

A task's parts are plain functions with fixed signatures:

=============  ==========================================================================================================
``config``     the config dataclass of its YAML (``task:`` value = ``name``), checked by ``validate()``
``train``      ``(cfg, run_dir, *, resume, overwrite, allow_config_change, device) -> summary dict``
``predict``    ``(loaded, inputs: list[PredictInput], out_dir, options: PredictOptions) -> list of result files``
``evaluate``   ``(loaded, data: str, options: EvaluateOptions) -> metrics dict`` (``data``: ``medetect evaluate --data``)
``report``     ``(metrics dict) -> text`` for the terminal (``--json`` prints the dict itself)
=============  ==========================================================================================================

What a task can write is declared (``formats``, ``overlays``, ``tiles``, ``tta``) so the command line refuses an
option the task would ignore before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data.image import MedicalImageError
from ..data.io import read_image

__all__ = ["EvaluateOptions", "INPUT_ERRORS", "PredictInput", "PredictOptions", "Task", "check_predict_options",
           "first_line", "read_input", "stem", "write_errors"]

INPUT_ERRORS = (ValueError, FileNotFoundError, MedicalImageError, OSError, RuntimeError)  # --skip-errors records these


@dataclasses.dataclass(frozen=True)
class PredictInput:
    """One input of ``medetect predict``: an image file, a volume or a DICOM series folder, and the id the user gave
    it (from a COCO file's ``images``; None for plain paths)."""

    path: Path
    image_id: int | None = None


@dataclasses.dataclass
class PredictOptions:
    """The options of ``medetect predict`` (each is a command-line flag of the same name)."""

    tile_size: Sequence[int] | None = None  # --tile, input voxels
    overlap: float = 0.25  # --overlap, tile overlap fraction
    device: Any = None
    score_thresh: float = 0.05  # --score-thresh
    max_detections: int | None = None  # --max-detections (default: the model's own cap)
    skip_errors: bool = False  # --skip-errors: failed inputs go to errors.csv
    allow_range_mismatch: bool = False
    progress: bool = True
    series_uid: str | None = None  # DICOM folders with several series
    allow_gaps: bool = False  # DICOM series with missing slices
    formats: Sequence[str] = ("csv",)  # --format
    overlays: bool = False  # --overlays
    tta: str | None = None  # --tta: none | flips (default: the model's own)


@dataclasses.dataclass
class EvaluateOptions:
    """The options of ``medetect evaluate``."""

    device: Any = None
    plot_dir: str | Path | None = None  # --plots
    allow_range_mismatch: bool = False
    froc: bool = False  # --froc: box FROC besides mAP (detection)
    saliency: str | None = None  # --saliency (attention)
    n_boot: int = 1000  # --n-boot: bootstrap draws of the 95 % intervals
    threshold_split: str | None = "train"  # --threshold-split (mammography)
    tta: str | None = None  # --tta


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its name (the config's ``task:`` and the model file's ``task``), what it is, its parts (module
    docstring) and what its ``predict`` can write."""

    name: str
    summary: str
    config: type
    model_kinds: tuple[str, ...]
    train: Callable[..., dict]
    predict: Callable[..., list[Path]] | None = None
    evaluate: Callable[..., dict] | None = None
    report: Callable[[dict], str] | None = None
    formats: tuple[str, ...] = ("csv",)  # values of --format it writes (csv: its own result files, always written)
    overlays: bool = False  # --overlays
    tiles: bool = False  # --tile / --overlap
    tta: bool = False  # --tta
    predict_note: str = ""  # what to run instead when predict is None
    evaluate_note: str = ""  # what to run instead when evaluate is None


def check_predict_options(task: Task, options: PredictOptions, *, ndim: int) -> None:
    """Refuse, before anything is read or written, an option that ``task`` would not honour on a ``ndim``-D model:
    one sentence naming the flag."""
    if task.predict is None:
        raise ValueError(f"medetect predict does not serve {task.name} models: {task.predict_note}")
    bad = [f for f in options.formats if f != "csv" and f not in task.formats]
    if bad:
        writes = ", ".join(f for f in task.formats if f != "csv") or "no other format"
        raise ValueError(f"--format {' '.join(bad)}: {task.name} models write their own CSV files and {writes}")
    if "coco" in options.formats and ndim != 2:
        raise ValueError(f"--format coco holds 2D images; this model is {ndim}D (use --format slicer)")
    if "slicer" in options.formats and ndim != 3:
        raise ValueError(f"--format slicer writes 3D Slicer ROIs of volumes; this model is {ndim}D (use --format coco)")
    if options.overlays and not task.overlays:
        raise ValueError(f"--overlays: {task.name} models write no overlay images")
    if options.tile_size is not None and not task.tiles:
        raise ValueError(f"--tile: {task.name} models run on whole images only")
    if options.tta is not None and options.tta != "none" and not task.tta:
        raise ValueError(f"--tta {options.tta}: {task.name} models have no test-time augmentation")


# ------------------------------------------------------------------------- pieces every task's predict shares


def read_input(path: Path, options: PredictOptions):
    """One input (file, or DICOM series folder with ``--series-uid`` / ``--allow-gaps``) as a MedicalImage."""
    if path.is_dir():
        return read_image(path, series_uid=options.series_uid, allow_gaps=options.allow_gaps)
    return read_image(path)


def stem(f: Path) -> str:
    """The output name of input ``f`` (``.nii.gz`` counts as one suffix; a series folder keeps its name)."""
    return f.name[: -len(".nii.gz")] if f.name.lower().endswith(".nii.gz") else (f.stem if f.is_file() else f.name)


def write_errors(out_dir: Path, errors: list[tuple[str, str]], n_done: int) -> None:
    """``errors.csv`` (``input,error``) of the inputs ``--skip-errors`` skipped, and one warning pointing at it."""
    if not errors:
        return
    with open(out_dir / "errors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["input", "error"])
        w.writerows(errors)
    warnings.warn(f"{len(errors)} of {len(errors) + n_done} inputs failed; see {out_dir / 'errors.csv'}", stacklevel=3)


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
