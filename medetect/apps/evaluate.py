"""``medetect evaluate``: a model's metrics on labelled data. The model's recorded task
(:data:`medetect.apps.tasks.TASKS`) reads ``--data`` and computes them: VOC / COCO mAP for a detector
(:mod:`medetect.detection.evaluate`), lesion FROC and ROC AUC for a mammography detector, image AUC and localisation
for an attention model, per-organ distances for an organ localiser."""

from __future__ import annotations

from ..engine.load import load_model
from ..engine.tasks import EvaluateOptions
from .tasks import task_of_model

__all__ = ["evaluate_spec", "format_report"]


def evaluate_spec(weights, spec: str, **options) -> dict:
    """Evaluate the model ``weights`` (a model file or a run folder) on ``--data`` ``spec`` (its task says what it
    may be); ``options`` are the fields of :class:`~medetect.engine.tasks.EvaluateOptions`."""
    opts = EvaluateOptions(**options)
    loaded = load_model(weights, device=opts.device)
    task = task_of_model(loaded, weights)
    if task.evaluate is None:
        raise ValueError(f"medetect evaluate does not serve {task.name} models: {task.evaluate_note}")
    return {**task.evaluate(loaded, spec, opts), "task": task.name}


def format_report(res: dict) -> str:
    """The terminal summary of :func:`evaluate_spec`'s result, written by its task."""
    from .tasks import TASKS

    task = TASKS[res["task"]]
    return task.report(res) if task.report else "\n".join(f"{k}: {v}" for k, v in res.items())
