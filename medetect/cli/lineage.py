"""``medetect lineage``: train every step of the lecture's lineage on a dataset, evaluate them into the lecture's
table, and measure region-proposal recall."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_force, add_runtime, apply_runtime, check_out_dir, positive_float, positive_int, print_json
from .errors import UsageError

__all__ = ["register", "SHIPPED_LINEAGE"]

SHIPPED_LINEAGE = Path(__file__).resolve().parents[1] / "weights" / "lineage"


def _steps(text: str) -> list[str]:
    from ..lineage.steps import STEP_KEYS

    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in STEP_KEYS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown step(s) {bad or [text]}: choose from {','.join(STEP_KEYS)}")
    return keys


def cmd_train(args) -> int:
    from ..config import load_config
    from ..data.formats import parse_data_spec
    from ..lineage.config import LineageConfig
    from ..lineage.train import train_lineage

    apply_runtime(args)
    if args.allow_config_change and not args.resume:
        raise UsageError("--allow-config-change goes with --resume (a fresh run has no config to change)")
    sets = list(args.sets)
    if args.data:
        fmt, path, split = parse_data_spec(args.data)
        sets += [f"data.root={Path(path).resolve()}", f"data.format={fmt}", f"data.train_split={split}"]
    if args.val is not None:
        sets.append(f"data.val_split={args.val}")
    if args.classes:
        sets.append("data.classes=[" + ", ".join(c.strip() for c in args.classes.split(",")) + "]")
    if args.config:
        cfg = load_config(args.config, sets)
        if not isinstance(cfg, LineageConfig):
            raise UsageError(f"{args.config} is not a lineage config (task: lineage)")
    else:
        from ..config import config_from_dict

        cfg = config_from_dict({"task": "lineage"}, overrides=sets)
    if not cfg.data.root:
        raise UsageError("give the dataset with --data FOLDER:SPLIT (a VOC folder such as BCCD) or a --config whose "
                         "data.root is set")
    summary = train_lineage(cfg, args.out, steps=args.steps, resume=args.resume, overwrite=args.overwrite,
                            allow_config_change=args.allow_config_change, device=args.device or "cpu",
                            progress=not args.no_progress)
    print_json({"out": str(args.out), "steps": {k: {kk: v.get(kk) for kk in ("status", "train_seconds", "weights",
                                                                              "error") if kk in v}
                                                for k, v in summary.get("steps", {}).items()}})
    return 0


def cmd_evaluate(args) -> int:
    from ..lineage.evaluate import evaluate_lineage, format_table

    apply_runtime(args)
    out = check_out_dir(args.out, force=args.force) if args.out else None
    result = evaluate_lineage(args.weights_dir, args.data, out_dir=out, steps=args.steps, device=args.device or "cpu",
                              progress=not args.no_progress and not args.json)
    if args.json:
        print_json(result["rows"], indent=1)
    else:
        print(format_table(result))
        if out is not None:
            print(f"table, JSON and plot written to {out}")
    return 0


def cmd_proposals(args) -> int:
    from ..data.formats import parse_data_spec
    from ..lineage.recall import recall_study

    apply_runtime(args)
    out = check_out_dir(args.out, force=args.force)
    scales = args.scale or [0.5] * len(args.data)
    if len(scales) != len(args.data):
        raise UsageError(f"--scale needs one value per --data ({len(args.data)}), got {len(scales)}")
    specs, sc, classes = {}, {}, {}
    for spec, s in zip(args.data, scales):
        fmt, path, split = parse_data_spec(spec)
        name = f"{Path(path).name}:{split}"
        specs[name], sc[name] = spec, s
        if fmt == "voc":
            classes[name] = [c.strip() for c in args.classes.split(",") if c.strip()]
    rpn = {next(iter(specs)): args.rpn} if args.rpn else None
    result = recall_study(specs, methods=args.methods or None, counts=args.counts or None, rpn_weights=rpn,
                          cache_dir=Path(out) / "cache", out_dir=out, scales=sc, classes=classes,
                          device=args.device or "cpu", progress=not args.no_progress)
    print_json(result["summary"], indent=1)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="the lecture's lineage: classification + localisation, OverFeat, selective "
                       "search, R-CNN, Fast R-CNN, Faster R-CNN, YOLO, RetinaNet, trained and compared")
    ls = p.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")

    t = ls.add_parser("train", help="train every step on a dataset (BCCD by default) into one folder")
    t.add_argument("--data", metavar="FOLDER:SPLIT", help="training data: a VOC folder and split (or "
                   "FORMAT:PATH:SPLIT); default: the config's data section")
    t.add_argument("--out", required=True, help="the lineage folder (model files, train records, checkpoints)")
    t.add_argument("--config", help="a task: lineage YAML (default: the built-in BCCD settings, "
                   "configs/lineage_bccd.yaml)")
    t.add_argument("--val", metavar="SPLIT", help="validation split in the same folder (default: val; '' for none)")
    t.add_argument("--classes", metavar="A,B,C", help="class names in label order (default: RBC,WBC,Platelets)")
    t.add_argument("--steps", type=_steps, help="comma-separated steps to train (default: all): "
                   "localizer,rcnn,fast_rcnn,faster_rcnn,yolo,retinanet")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue: trained steps are kept, an interrupted one "
                   "resumes from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="move an existing folder aside (never deleted) and start "
                   "afresh")
    t.add_argument("--allow-config-change", action="store_true", help="with --resume: accept a changed config")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set fast_rcnn.train.epochs=4; repeatable")
    t.add_argument("--no-progress", action="store_true", help="no progress lines")
    add_runtime(t)
    t.set_defaults(fn=cmd_train)

    e = ls.add_parser("evaluate", help="the lecture's table (mAP, proposals, test and train time) on one split")
    e.add_argument("--weights-dir", default=str(SHIPPED_LINEAGE),
                   help="a lineage folder (default: the shipped models, medetect/weights/lineage)")
    e.add_argument("--data", required=True, metavar="FOLDER:SPLIT", help="the split to evaluate, e.g. "
                   "../shared/data/bccd:val")
    e.add_argument("--json", action="store_true", help="print the rows as JSON (keys: method, map50, map50_07, "
                   "seconds_per_image, train_seconds, ...)")
    e.add_argument("--out", help="folder for lineage_table.md, lineage_table.json and lineage_map_vs_time.png")
    e.add_argument("--steps", type=_steps, help="only these steps (comma-separated)")
    e.add_argument("--no-progress", action="store_true", help="no progress lines")
    add_force(e, "the table files")
    add_runtime(e)
    e.set_defaults(fn=cmd_evaluate)

    r = ls.add_parser("proposals", help="recall of region proposals (selective search, sliding windows, uniform, "
                      "RPN) against the number of proposals, with a plot")
    r.add_argument("--data", required=True, action="append", metavar="FOLDER:SPLIT",
                   help="a dataset split (repeatable), e.g. ../shared/data/bccd:val")
    r.add_argument("--out", required=True, help="folder for recall.json and recall.png")
    r.add_argument("--scale", type=positive_float, nargs="+", help="working scale per --data (default 0.5 each; "
                   "1.0 for DSB2018's 256-px tiles)")
    r.add_argument("--classes", default="RBC,WBC,Platelets", metavar="A,B,C",
                   help="class names of the VOC folders (default: BCCD's)")
    r.add_argument("--rpn", help="a Faster R-CNN model file whose RPN joins the study (for the first --data)")
    r.add_argument("--counts", type=positive_int, nargs="+", help="numbers of proposals at which recall is read "
                   "(default 10 .. 2000)")
    r.add_argument("--methods", nargs="+", help="subset of: 'selective search (fast)', 'selective search (quality)', "
                   "'sliding windows', 'uniform', 'RPN'")
    r.add_argument("--no-progress", action="store_true", help="no progress lines")
    add_force(r, "the recall files")
    add_runtime(r)
    r.set_defaults(fn=cmd_proposals)
