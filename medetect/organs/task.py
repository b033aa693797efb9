"""The organ-localisation task (``task: organ-localisation``): a 3D Faster R-CNN with a focal-loss RPN on a
downsampled whole CT that keeps one box per organ; per-organ wall / centroid distance, IoU and detection rate."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.tasks import INPUT_ERRORS, EvaluateOptions, PredictOptions, Task, first_line, read_input, write_errors
from .config import OrganLocalisationConfig

__all__ = ["TASK"]


def _train(cfg, run_dir, **kw) -> dict:
    from .localiser import train_organs

    w, history = train_organs(cfg, run_dir, **kw)
    return {**(history[-1] if history else {}), "weights": str(w)}


def _predict(loaded, inputs, out_dir: Path, options: PredictOptions) -> list[Path]:
    from .report import predict_organs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, everything, errors = [], {}, []
    for inp in inputs:  # one CT per input
        try:
            w, rec = predict_organs(loaded, [inp.path], out_dir, read=lambda f: read_input(f, options),
                                    png=options.overlays)
        except INPUT_ERRORS as e:
            if not options.skip_errors:
                raise
            errors.append((str(inp.path), first_line(e)))
            continue
        written += w
        everything.update(rec)
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    write_errors(out_dir, errors, len(written))
    return written


def _evaluate(loaded, spec: str, options: EvaluateOptions) -> dict:
    from .report import evaluate_organ_folder, is_organ_folder

    folder, cases = spec, None
    if not is_organ_folder(spec):
        head, _, names = spec.rpartition(":")
        if not head or not is_organ_folder(head):
            raise ValueError(f"--data must be an organ folder (boxes.csv and volumes/), FOLDER or FOLDER:CASE[,CASE..], "
                             f"for an organ-localisation model, got {spec!r}")
        folder, cases = head, [c for c in names.split(",") if c]
    return evaluate_organ_folder(loaded, folder, cases=cases)


def _report(res: dict) -> str:
    from .report import format_organ_table

    return format_organ_table(res)


TASK = Task(
    name="organ-localisation",
    summary="3D organ localisation on CT (a focal-loss RPN on the downsampled whole scan, one box per organ): "
            "per-organ wall and centroid distance (mm), IoU and detection rate; predict writes <stem>_organs.csv "
            "and, with --overlays, a three-view PNG.",
    config=OrganLocalisationConfig,
    model_kinds=("detector",),
    train=_train,
    predict=_predict,
    evaluate=_evaluate,
    report=_report,
    overlays=True,
)
