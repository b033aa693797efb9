"""The attention task (``task: attention``): an image classifier (abnormal, malignant) whose attention map is
supervised by lesion circles turned into Gaussian heatmaps; scored on image AUC and on where it looks."""

from __future__ import annotations

from pathlib import Path

from ..engine.tasks import EvaluateOptions, PredictOptions, Task
from .config import AttentionTaskConfig
from .evaluate import evaluate_attention
from .predict import predict_attention

__all__ = ["TASK"]


def _train(cfg, run_dir, **kw) -> dict:
    from .train import train_attention

    return train_attention(cfg, run_dir, **kw)


def _predict(loaded, inputs, out_dir: Path, options: PredictOptions) -> list[Path]:
    return predict_attention(loaded, [i.path for i in inputs], Path(out_dir), device=options.device,
                             allow_range_mismatch=options.allow_range_mismatch, skip_errors=options.skip_errors)


def _evaluate(loaded, spec: str, options: EvaluateOptions) -> dict:
    folder, _, split = spec.rpartition(":")
    if not folder or not split:
        raise ValueError(f"--data must be FOLDER:SPLIT for an attention model (a mini-MIAS-layout folder), got {spec!r}")
    return evaluate_attention(loaded, folder, split, method=options.saliency, n_boot=options.n_boot)


def _report(res: dict) -> str:
    lines = []
    for k in ("image_auc_abnormal", "image_auc_malignant", "pointing_game", "attention_in_lesion",
              "attention_froc_mean"):
        lo, hi = res.get(f"{k}_ci") or (None, None)
        ci = f"({lo:.3f}-{hi:.3f})" if lo is not None else ""
        lines.append(f"{k:>22s}: {res[k]:.4f} {ci}" if res[k] is not None
                     else f"{k:>22s}: undefined ({res.get('undefined', {}).get(k, 'no value')})")
    return "\n".join(lines)


TASK = Task(
    name="attention",
    summary="Image classification (abnormal, malignant) with attention supervised by lesion heatmaps: image ROC AUC, "
            "pointing game, attention in lesion and attention FROC with patient-bootstrap intervals; predict writes "
            "scores.csv and an attention overlay PNG per input (always).",
    config=AttentionTaskConfig,
    model_kinds=("attention",),
    train=_train,
    predict=_predict,
    evaluate=_evaluate,
    report=_report,
    overlays=True,
)
