"""The general detector commands: ``train``, ``export``, ``predict``, ``evaluate``, ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_force, add_runtime, apply_runtime, check_out_dir, check_out_file, fraction, positive_int,
                     print_json, probability)
from .errors import UsageError

__all__ = ["register", "TASK_NAMES"]

# the registry's task names (medetect.apps.tasks.TASKS), written out so that building the parser imports no task;
# tests/test_cli.py checks that the two agree
TASK_NAMES = ("detection", "mammography", "attention", "organ-localisation", "luna-detection", "luna-fpr", "lineage")


def add_run_flags(t: argparse.ArgumentParser) -> None:
    """The run-folder flags of every training command (rules: :func:`medetect.engine.runs.prepare_run_dir`)."""
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest intact checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh although --run-dir holds a run: the old run is moved aside to RUN.old-<time>, "
                        "never deleted")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the run's (the change is recorded in "
                        "RUN/config_changes.jsonl)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted, value in YAML), e.g. --set train.lr=0.005; repeatable")


def run_train(cfg, args, run_dir: Path) -> int:
    """Train ``cfg`` into ``run_dir`` with the run flags of ``args``; prints the summary as strict JSON."""
    from ..apps.train import train

    if args.allow_config_change and not args.resume:
        raise UsageError("--allow-config-change goes with --resume (a fresh run has no config to change)")
    summary = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change, device=args.device)
    print_json(summary)
    return 0


def cmd_train(args) -> int:
    from ..config import load_config

    apply_runtime(args)
    sets = list(args.sets) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config(args.config, sets)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    if args.folds is None:
        return run_train(cfg, args, run_dir)
    from ..apps.train import train_folds

    if args.allow_config_change and not args.resume:
        raise UsageError("--allow-config-change goes with --resume (a fresh run has no config to change)")
    summary = train_folds(cfg, run_dir, args.folds, resume=args.resume, overwrite=args.overwrite,
                          allow_config_change=args.allow_config_change, device=args.device)
    print_json(summary)
    return 0


def cmd_export(args) -> int:
    from ..apps.export import export_from_run, export_onnx

    check_out_file(args.out, force=args.force)
    if args.onnx:
        print(export_onnx(args.run_dir, args.out, args.onnx))
    else:
        print(export_from_run(args.run_dir, args.out, best=args.best, fp16=args.fp16))
    return 0


def add_tta(p) -> None:
    p.add_argument("--tta", choices=("none", "flips"), default=None,
                   help="detectors: test-time augmentation, flips = the image and its flips fused (default: the "
                        "model's model.tta)")


def cmd_predict(args) -> int:
    from ..apps.predict import predict_paths

    apply_runtime(args)
    out = check_out_dir(args.out, force=args.force)
    written = predict_paths(args.weights, args.paths, out, tile_size=args.tile, overlap=args.overlap,
                            device=args.device, score_thresh=args.score_thresh, max_detections=args.max_detections,
                            skip_errors=args.skip_errors, allow_range_mismatch=args.allow_range_mismatch,
                            progress=not args.no_progress, series_uid=args.series_uid, allow_gaps=args.allow_gaps,
                            formats=args.format, overlays=args.overlays, tta=args.tta)
    print(f"wrote {len(written)} prediction files to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from ..apps.evaluate import evaluate_spec, format_report

    apply_runtime(args)
    if args.plots:
        check_out_dir(args.plots, "--plots")
    res = evaluate_spec(args.weights, args.data, device=args.device, plot_dir=args.plots,
                        allow_range_mismatch=args.allow_range_mismatch, froc=args.froc, saliency=args.saliency,
                        n_boot=args.n_boot, tta=args.tta,
                        threshold_split=None if args.threshold_split.lower() == "none" else args.threshold_split)
    if args.json:
        print_json(res, indent=1)
        return 0
    print(format_report(res))
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    apply_runtime(args)
    path = run_demo(check_out_dir(args.out), device=args.device or "cpu")
    print(f"demo report: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config (its task: key picks the task)",
                       description="Train what a YAML config describes; its task: key picks the task (" +
                                   ", ".join(TASK_NAMES) + "). A checkpoint per epoch (atomic); a used run folder is "
                                   "refused unless --resume or --overwrite.")
    t.add_argument("config", help="YAML config (keys: docs/config-reference.md)")
    t.add_argument("--run-dir", default=None, help="checkpoints and metrics (default runs/<config name>)")
    add_run_flags(t)
    t.add_argument("--epochs", type=positive_int, default=None, help="shortcut for --set train.epochs=N")
    t.add_argument("--folds", type=positive_int, default=None, metavar="K",
                   help="K-fold cross-validation (detection, mammography and attention configs): the patients of "
                        "train_split + val_split in K folds (data.fold_seed shuffles them); fold k trains into "
                        "RUN/fold_k, validated on the held-out fold k; --resume continues unfinished folds and skips "
                        "finished ones. Then RUN/cv_summary.json (and .md): per fold (per_fold) its final validation "
                        "metrics (last validated metrics.csv row) and best epoch; per metric (metrics) the mean, std "
                        "(n - 1), min, max over the folds")
    add_runtime(t)
    t.set_defaults(fn=cmd_train)

    ex = sub.add_parser("export", help="a run's newest checkpoint -> one shippable .safetensors model (or ONNX)")
    ex.add_argument("run_dir", help="training run folder (or, with --onnx, a .safetensors model)")
    ex.add_argument("--out", required=True, help="output file")
    ex.add_argument("--best", action="store_true",
                    help="the best validation epoch (the run's best.json) instead of the newest checkpoint")
    ex.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                    help="store the weights in float16 (half the file; default: detectors yes, other models no)")
    ex.add_argument("--onnx", type=positive_int, nargs="+", default=None, metavar="SIZE",
                    help="export the dense part (backbone, FPN, dense head) to ONNX for this input size")
    add_force(ex, "the --out file")
    ex.set_defaults(fn=cmd_export)

    pr = sub.add_parser("predict", help="run a model file or run folder on images and volumes (its task writes the "
                                         "results)")
    pr.add_argument("--weights", required=True, help="a .safetensors model file (config and preprocessing inside) or a run folder")
    pr.add_argument("paths", nargs="+", help="image files, volumes (NIfTI, MHD, NRRD), DICOM files or series folders, folders")
    pr.add_argument("--out", required=True, help="output folder (one CSV per input + predictions.json)")
    pr.add_argument("--tile", type=positive_int, nargs="+", default=None, metavar="SIZE",
                    help="sliding-window tile size in input pixels/voxels (one per axis, or one for all); default: "
                         "the whole image in one pass")
    pr.add_argument("--overlap", type=fraction, default=0.25, help="tile overlap fraction in [0, 1) (default 0.25)")
    pr.add_argument("--score-thresh", type=probability, default=0.05, help="drop detections below this score (default 0.05)")
    pr.add_argument("--max-detections", type=positive_int, default=None, metavar="N",
                    help="most detections kept per input (default: the model's detections_per_img, tiles included); "
                         "a warning says when an input reaches it")
    pr.add_argument("--skip-errors", action="store_true",
                    help="record inputs that fail in OUT/errors.csv and go on with the others")
    pr.add_argument("--allow-range-mismatch", action="store_true",
                    help="predict even when an input's values lie far outside the range the model was trained on "
                         "(e.g. a 16-bit image for an 8-bit model)")
    pr.add_argument("--series-uid", default=None, metavar="UID", help="for DICOM folders holding several series: the one to read")
    pr.add_argument("--allow-gaps", action="store_true",
                    help="for DICOM series with missing slices: stack anyway with the median slice step")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    add_force(pr, "files in a non-empty --out folder")
    pr.add_argument("--format", nargs="+", default=["csv"], choices=("csv", "coco", "slicer", "dicom-sr"),
                    help="also write: coco (coco_results.json + coco_images.json, 2D), slicer (<stem>_rois/*.mrk.json, "
                         "3D Slicer ROIs in LPS mm), dicom-sr (<stem>.sr.dcm, TID 1500; needs highdicom); the CSVs "
                         "and predictions.json are always written")
    pr.add_argument("--overlays", action="store_true", help="also write overlays/<stem>.png with the boxes drawn")
    add_tta(pr)
    add_runtime(pr)
    pr.set_defaults(fn=cmd_predict)

    ev = sub.add_parser("evaluate", help="a model's metrics on labelled data (its task picks them: mAP, FROC, AUC, "
                                          "organ distances)")
    ev.add_argument("--weights", required=True)
    ev.add_argument("--data", required=True,
                    help="CONFIG.yaml[:SPLIT] (its data section; default split: its val_split), FORMAT:PATH:SPLIT "
                         "(coco:ann/val.json:val, csv:boxes.csv:val, dsb2018:FOLDER:val, mias:FOLDER:val, ...) or "
                         "FOLDER:SPLIT (a VOC folder, e.g. ../shared/data/bccd:val)")
    ev.add_argument("--plots", default=None, help="folder for PR curves (PNG)")
    ev.add_argument("--froc", action="store_true",
                    help="also the box FROC per image/scan (lesion-style data): sensitivity at 1/8..8 FP per image, CPM")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--allow-range-mismatch", action="store_true",
                    help="evaluate even when images lie far outside the value range the model was trained on")
    ev.add_argument("--saliency", choices=("attention", "gradcam"), default=None,
                    help="attention models: the map scored (default: the model's own; gradcam for attention none)")
    ev.add_argument("--n-boot", type=int, default=1000,
                    help="attention models and mammography detectors: bootstrap draws (by patient) of the 95%% intervals (_ci)")
    ev.add_argument("--threshold-split", default="train", metavar="SPLIT",
                    help="mammography detectors: the split of the same folder whose images pick the image thresholds "
                         "of the confusion table (Youden's J; the detector runs on it too); 'none': no table "
                         "(default: %(default)s)")
    add_tta(ev)
    add_runtime(ev)
    ev.set_defaults(fn=cmd_evaluate)

    de = sub.add_parser("demo", help="the shipped detector on bundled images -> HTML report")
    de.add_argument("--out", default="medetect-demo", help="report folder (default medetect-demo)")
    add_runtime(de)
    de.set_defaults(fn=cmd_demo)
