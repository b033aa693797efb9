"""``medetect predict``: run a model file (or a training run folder) on images and volumes. The model's recorded task
(:data:`medetect.apps.tasks.TASKS`) writes the results: a detector's CSV / JSON / COCO / Slicer / DICOM SR files
(:mod:`medetect.detection.predict`), a mammography detector's image scores too, an attention model's scores and
overlays, an organ localiser's one box per organ. Options the task would not honour are refused before anything is
read or written (:func:`medetect.engine.tasks.check_predict_options`).

Inputs: image files, volumes, DICOM files, DICOM series folders, folders of images (expanded in name order), and COCO
files (``.json`` with ``images``: each image, relative to the file's folder, with the file's own image id, which
``--format coco`` keeps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.annotations import read_coco
from ..data.io import READ_EXTENSIONS
from ..engine.load import load_model
from ..engine.tasks import PredictInput, PredictOptions, check_predict_options
from .tasks import task_of_model

__all__ = ["image_files", "predict_inputs", "predict_paths"]


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (a folder of ``.dcm`` files is one DICOM series) into image files, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(q.suffix.lower() == ".dcm" for q in p.iterdir()):
            out.extend(sorted(q for q in p.iterdir() if q.name.lower().endswith(tuple(READ_EXTENSIONS))))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def predict_inputs(paths: Sequence[str | Path]) -> list[PredictInput]:
    """The inputs of ``medetect predict`` (module docstring): a COCO file gives its images with their ids."""
    out: list[PredictInput] = []
    for p in image_files(paths):
        if p.suffix.lower() == ".json":
            records, _, _ = read_coco(p, p.parent)
            out += [PredictInput(p.parent / r.image, int(r.meta["image_id"])) for r in records]
        else:
            out.append(PredictInput(p))
    ids = [i.image_id for i in out if i.image_id is not None]
    if len(ids) != len(set(ids)):
        raise ValueError("the COCO files given share image ids: predict one COCO file at a time")
    return out


def predict_paths(weights, paths: Sequence[str | Path], out_dir: str | Path, **options) -> list[Path]:
    """Predict with the model ``weights`` (a model file or a run folder) on every input of ``paths`` into
    ``out_dir``; ``options`` are the fields of :class:`~medetect.engine.tasks.PredictOptions` (the command-line
    flags). Returns the result files written (one per input)."""
    opts = PredictOptions(**options)
    loaded = load_model(weights, device=opts.device)
    task = task_of_model(loaded, weights)
    check_predict_options(task, opts, ndim=loaded.preprocess.ndim)
    return task.predict(loaded, predict_inputs(paths), Path(out_dir), opts)
