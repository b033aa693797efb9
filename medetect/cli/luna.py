"""``luna`` (LUNA16 stage one: the 3D nodule detector) and ``luna-fpr`` (stage two: false-positive reduction)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from .common import add_force, add_runtime, apply_runtime, check_out_file, positive_int, print_json
from .detection import add_run_flags
from .errors import UsageError

__all__ = ["register"]


def _subset_name(s: str) -> str:
    if s.startswith("subset"):
        return s
    if not s.isdigit():
        raise UsageError(f"subset {s!r} is neither a number nor subsetN")
    return f"subset{int(s)}"


def _luna_config(args, task: str, shortcuts: list[str]):
    """The stage's typed config: ``--config`` (default: the built-in defaults, those of ``configs/``), then the
    command's shortcut flags, then ``--set`` (the last word wins)."""
    from ..config import config_from_dict, load_config

    sets = shortcuts + list(args.sets)
    if args.config:
        cfg = load_config(args.config, sets)
        if cfg.task != task:
            raise UsageError(f"--config {args.config} is a task: {cfg.task} config; this command needs task: {task}")
        return cfg
    return config_from_dict({"task": task}, base_dir=Path.cwd(), overrides=sets)


def _data_shortcuts(args, paths: tuple[str, ...]) -> list[str]:
    """``--set`` overrides from a training command's shortcut flags: ``paths`` (ROOT, --candidates) resolved against
    the current folder, and ``--subsets``."""
    for k in paths:
        if getattr(args, k) and not Path(getattr(args, k)).exists():
            raise FileNotFoundError(f"{getattr(args, k)}: no such {'folder' if k == 'root' else 'file'}")
    sc = [f"data.{k}={Path(getattr(args, k)).resolve()}" for k in paths if getattr(args, k)]
    if args.subsets:
        sc.append(f"data.subsets=[{', '.join(_subset_name(s) for s in args.subsets)}]")
    return sc


def _luna_train(args) -> int:
    from .detection import run_train

    sc = _data_shortcuts(args, ("root",))
    if args.test_subset:
        sc.append(f"data.test_subset={_subset_name(args.test_subset)}")
    if args.hard_negatives:  # Faster R-CNN: sampled BCE objectness with the highest-loss negatives
        sc += ["model.arch=faster_rcnn", "model.rpn_objectness_loss=bce", "model.rpn_negative_sampling=hard"]
    return run_train(_luna_config(args, "luna-detection", sc), args, Path(args.run_dir))


def _luna_predict(args) -> int:
    from ..data.io import read_image
    from ..luna.detection import (LunaLayout, _froc_summary, evaluate_submission, load_luna_model, predict_layout,
                                  predict_scan, write_submission)

    out = check_out_file(args.out, force=args.force)
    model, pre = load_luna_model(args.weights)
    ins = [Path(i) for i in args.inputs]
    if len(ins) == 1 and ins[0].is_dir():
        layout = LunaLayout(ins[0], allow_missing_scans=True)
        uids = layout.uids_in(args.subsets) if args.subsets else layout.uids
        if not uids:
            raise UsageError(f"{ins[0]} holds no scans in subset*/ folders (a LUNA16 layout); give scan files instead")
        marks = predict_layout(model, pre, layout, uids, tile_size=args.tile, lung_mask=args.lung_mask)
        sub = write_submission(out, marks)
        print(f"wrote {sum(len(m['probabilities']) for m in marks.values())} marks for {len(marks)} scans to {sub}")
        if args.froc:
            print_json(_froc_summary(evaluate_submission(layout, sub, uids)))
        return 0
    if args.froc or args.subsets:
        raise UsageError("--froc and --subsets need a LUNA16 folder as the single input")
    marks = {}
    for f in ins:
        if not f.exists():
            raise FileNotFoundError(f"input not found: {f}")
        uid = f.name[: -len(".nii.gz")] if f.name.endswith(".nii.gz") else f.stem
        marks[uid] = predict_scan(model, pre, read_image(f), tile_size=args.tile, lung_mask=args.lung_mask)
    sub = write_submission(out, marks)
    print(f"wrote {sum(len(m['probabilities']) for m in marks.values())} marks for {len(marks)} scans to {sub}")
    return 0


def _luna_phantom_demo(args) -> int:
    from ..luna.detection import phantom_demo

    with tempfile.TemporaryDirectory(prefix="medetect-luna-demo-") as tmp:
        res = phantom_demo(args.out or tmp, n_train=args.n_train, n_test=args.n_test, weights=args.weights,
                           epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, seed=args.seed)
    f = res["froc"]
    print(f"CPM {f['cpm']:.3f}  sensitivities at {f['fps']} FPs/scan: {f['sensitivities']}  "
          f"({f['n_nodules']} nodules in {f['n_scans']} held-out phantom scans)")
    return 0


def _luna_mosaics(args) -> int:
    from ..luna.mosaics import build_mosaics

    res = build_mosaics(args.src, args.out, split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                        offset=args.offset)
    print_json({k: v for k, v in res.items() if k != "mosaics"})
    return 0


def _luna_lung_pet_ct(args) -> int:
    from ..luna.detection import load_luna_model, lung_pet_ct_smoke

    if not Path(args.root).is_dir():
        raise UsageError(f"--root {args.root} is not a folder (the Lung-PET-CT-Dx sample, e.g. "
                         "../shared/data/lung-pet-ct-dx-sample)")
    model, pre = load_luna_model(args.weights)
    for r in lung_pet_ct_smoke(model, pre, args.root, lung_mask=not args.no_lung_mask):
        print_json(r)
    return 0


def _luna_time(args) -> int:
    from ..luna.detection import load_luna_model, time_inference

    model, pre = load_luna_model(args.weights)
    print_json(time_inference(model, pre, shape=tuple(args.shape)))
    return 0


def _run_luna(args) -> int:
    apply_runtime(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.luna_fn(args)


def _fpr_train(args) -> int:
    from .detection import run_train

    return run_train(_luna_config(args, "luna-fpr", _data_shortcuts(args, ("root", "candidates"))), args,
                     Path(args.run_dir))


def _fpr_weights(args) -> str:
    """``luna-fpr score W ROOT`` or ``luna-fpr score --weights W ROOT``."""
    if args.weights_opt:
        if args.root is not None:
            raise UsageError("give the weights either as the first argument or as --weights, not both")
        args.root, args.weights = args.weights, args.weights_opt
    if not args.weights or not args.root:
        raise UsageError("luna-fpr score needs the weights (W or --weights W) and the LUNA16 folder ROOT")
    return args.weights


def _fpr_score(args) -> int:
    import csv

    from ..data.annotations import write_luna_submission
    from ..luna.fpr import find_scans, fuse, load_fpr, read_candidates, score_scans

    out = check_out_file(args.out, force=args.force)
    model = load_fpr(_fpr_weights(args), device=args.device)
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"{args.root}: no such folder (the LUNA16 folder with subsetN/)")
    cands = read_candidates(args.candidates)
    scans = find_scans(args.root)
    if args.subsets:
        scans = {u: p for u, p in scans.items() if p.parent.name in {_subset_name(s) for s in args.subsets}}
    if not scans:
        raise UsageError(f"{args.root} holds no scans in subset*/ folders" + (" of --subsets" if args.subsets else ""))
    with open(args.candidates, newline="") as f:
        is_submission = "probability" in next(csv.reader(f), [])
    scored = score_scans(model, scans, cands, tta=args.tta)
    rows = {uid: (c, fuse(cands[uid][1], p, args.fuse) if is_submission else p) for uid, (c, p) in scored.items()}
    write_luna_submission(out, rows)
    print(f"wrote {sum(len(c) for c, _ in rows.values())} scored candidates of {len(rows)} scans to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    lp = sub.add_parser("luna", help="LUNA16 stage one: the 3D nodule detector (train, predict, phantom demo, smoke test, timing)",
                        description="LUNA16-style lung nodule detection (3D detector stage).")
    ls = lp.add_subparsers(dest="sub", required=True, metavar="STEP")
    t = ls.add_parser("train", help="LUNA16 folder -> run folder (checkpoints, model.safetensors); a task: "
                      "luna-detection config (configs/luna_detection.yaml)")
    t.add_argument("root", nargs="?", help="LUNA16 folder (subsetN/<seriesuid>.mhd, annotations.csv); shortcut for "
                   "--set data.root=ROOT")
    t.add_argument("--config", help="YAML config (default: the built-in defaults = configs/luna_detection.yaml)")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--subsets", nargs="+", help="training subsets (default: all but --test-subset); shortcut for data.subsets")
    t.add_argument("--test-subset", help="held-out subset, predicted and scored after training; shortcut for data.test_subset")
    t.add_argument("--hard-negatives", action="store_true",
                   help="Faster R-CNN whose RPN minibatches take the positives plus the highest-loss negatives "
                        "(explicit hard negative mining; sets model.arch, rpn_objectness_loss, rpn_negative_sampling)")
    add_run_flags(t)
    add_runtime(t)
    t.set_defaults(luna_fn=_luna_train)
    pr = ls.add_parser("predict", help="weights + LUNA16 folder or scan files -> submission CSV")
    pr.add_argument("inputs", nargs="+", help="a LUNA16 folder, or .mhd/.mha/.nii(.gz) files (uid = file stem)")
    pr.add_argument("--weights", required=True, help="a nodule detector model file or run folder")
    pr.add_argument("--out", required=True, help="submission CSV (seriesuid,coordX,coordY,coordZ,probability)")
    pr.add_argument("--subsets", nargs="*", help="with a LUNA16 folder: only these subsets (e.g. 3 or subset3)")
    pr.add_argument("--tile", type=positive_int, default=256,
                    help="sliding-window tile in resampled voxels (default 256)")
    pr.add_argument("--froc", action="store_true", help="score against the folder's annotations.csv")
    pr.add_argument("--lung-mask", action="store_true", help="whole chest CTs: keep only marks inside the lungs "
                    "(never for crops of lung tissue such as the cube mosaics)")
    add_force(pr, "the --out file")
    add_runtime(pr)
    pr.set_defaults(luna_fn=_luna_predict)
    d = ls.add_parser("phantom-demo", help="synthetic phantoms -> train briefly (or --weights) -> predict -> CPM")
    d.add_argument("--out", help="work folder (default: a temporary one)")
    d.add_argument("--n-train", type=positive_int, default=8)
    d.add_argument("--n-test", type=positive_int, default=4)
    d.add_argument("--weights", help="use these weights instead of training (e.g. the shipped phantom model)")
    d.add_argument("--epochs", type=positive_int, default=4)
    d.add_argument("--steps-per-epoch", type=positive_int, default=50)
    d.add_argument("--seed", type=int, default=1000)
    add_runtime(d, device=False)
    d.set_defaults(luna_fn=_luna_phantom_demo)
    mo = ls.add_parser("mosaics", help="real nodule cubes (luna16-node21-patches layout) -> 2x2 mosaics in LUNA16 "
                       "layout, split by scan: the real-CT validation protocol")
    mo.add_argument("src", help="folder with patches.csv and patches/<patch_id>.npz")
    mo.add_argument("out", help="output LUNA16 folder (new or empty)")
    mo.add_argument("--split", choices=("val", "train", "all"), default="val")
    mo.add_argument("--val-fraction", type=float, default=0.25, help="share of scans in val (default 0.25)")
    mo.add_argument("--seed", type=int, default=0, help="cube order and flips (default 0)")
    mo.add_argument("--offset", type=int, default=0, help="voxels of air before y and x: moves every cube (default 0)")
    mo.set_defaults(luna_fn=_luna_mosaics)
    s = ls.add_parser("lung-pet-ct", help="smoke test on the Lung-PET-CT-Dx sample: distance of marks to tumour")
    s.add_argument("--weights", required=True)
    s.add_argument("--root", required=True, help="the Lung-PET-CT-Dx sample folder (e.g. ../shared/data/lung-pet-ct-dx-sample)")
    s.add_argument("--no-lung-mask", action="store_true", help="keep marks outside the lungs too")
    add_runtime(s, device=False)
    s.set_defaults(luna_fn=_luna_lung_pet_ct)
    tm = ls.add_parser("time", help="whole-scan inference time on a synthetic 512x512x256 volume")
    tm.add_argument("--weights", required=True)
    tm.add_argument("--shape", type=positive_int, nargs=3, default=[256, 512, 512])
    add_runtime(tm, device=False)
    tm.set_defaults(luna_fn=_luna_time)
    lp.set_defaults(fn=_run_luna)

    fp = sub.add_parser("luna-fpr", help="LUNA16 stage two: false-positive reduction of candidates (train, score)",
                        description="LUNA16 stage two: false-positive reduction of candidates.")
    fs = fp.add_subparsers(dest="sub", required=True, metavar="STEP")
    t = fs.add_parser("train", help="train the cube classifier: LUNA16 folder + candidates.csv -> run folder; a task: "
                      "luna-fpr config (configs/luna_fpr.yaml)")
    t.add_argument("root", nargs="?", help="LUNA16 folder (subsetN/<seriesuid>.mhd); shortcut for data.root")
    t.add_argument("--candidates", help="candidates.csv (seriesuid,coordX,coordY,coordZ,class); shortcut for data.candidates")
    t.add_argument("--config", help="YAML config (default: the built-in defaults = configs/luna_fpr.yaml)")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--subsets", nargs="+", default=None, help="train only on these subset folders, e.g. subset0")
    add_run_flags(t)
    add_runtime(t)
    t.set_defaults(luna_fn=_fpr_train)
    from ..luna.fpr import FUSION_MODES

    s = fs.add_parser("score", help="score candidates: weights + folder + candidates -> LUNA16 submission CSV")
    s.add_argument("weights", nargs="?", help="model.safetensors written by train (or the run folder: its newest "
                   "checkpoint); or give it as --weights")
    s.add_argument("root", nargs="?", help="LUNA16 folder (subsetN/<seriesuid>.mhd)")
    s.add_argument("--weights", dest="weights_opt", metavar="W", help="the same as the first positional argument")
    s.add_argument("--candidates", required=True,
                   help="candidates.csv, or a stage-one submission (probability column, then fused with --fuse)")
    s.add_argument("--out", required=True, help="submission CSV (seriesuid,coordX,coordY,coordZ,probability)")
    s.add_argument("--fuse", choices=FUSION_MODES, default="product", help="with a stage-one submission (default product)")
    s.add_argument("--subsets", nargs="*", default=None)
    s.add_argument("--tta", action="store_true", help="average over the cube's axis flips")
    add_force(s, "the --out file")
    add_runtime(s)
    s.set_defaults(luna_fn=_fpr_score)
    fp.set_defaults(fn=_run_luna)
