"""``convert`` (a dataset in any supported format -> COCO, CSV or a MONAI datalist) and ``plan`` (a dataset -> a training config)."""

from __future__ import annotations

import argparse

from .common import check_out_dir, check_out_file, print_json
from .errors import UsageError

__all__ = ["register"]


def _source(spec: str) -> dict:
    """``FORMAT:PATH`` (see :mod:`medetect.data.formats`) or a config YAML (its data section)."""
    from ..data.formats import FORMATS, source_from_spec

    if spec.endswith((".yaml", ".yml")):
        from ..config import load_config

        data = getattr(load_config(spec), "data", None)
        if data is None or not hasattr(data, "source"):
            raise UsageError(f"{spec}: convert needs a config with a detection data section (task: detection)")
        return data.source()
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise UsageError(f"SOURCE must be FORMAT:PATH with FORMAT one of {list(FORMATS)}, or a config YAML; "
                         f"got {spec!r}")
    return source_from_spec(fmt, path)


def cmd_convert(args) -> int:
    from ..apps.convert import convert_dataset

    if args.to == "datalist":
        check_out_file(args.out)
    else:
        check_out_dir(args.out)
    src = _source(args.source)
    if args.source_box_mode:
        src["box_mode"] = args.source_box_mode
    if args.source_box_units:
        src["box_units"] = args.source_box_units
    res = convert_dataset(src, args.splits, args.to, args.out, holdout=args.holdout or 0, names=args.names or (),
                           box_mode=args.box_mode, units=args.box_units)
    print_json(res, indent=1)
    return 0


def cmd_plan(args) -> int:
    from ..apps.plan import plan_dataset

    check_out_file(args.out)
    if args.report:
        check_out_dir(args.report, "--report")
    print_json(plan_dataset(args.config, args.out, memory_gb=args.memory_gb, report=args.report, sets=args.sets,
                            modality=args.modality, device=args.device), indent=1)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="read a dataset once and write a whole training config (anchors, scale, "
                        "normalisation, batch) for it",
                        description="DATA_CONFIG needs a data section (any format); the plan is a task: detection "
                                    "config that `medetect train PLAN` runs as is. Rules: medetect/apps/plan.py.")
    pl.add_argument("config", metavar="DATA_CONFIG")
    pl.add_argument("--out", required=True, help="the planned config (YAML)")
    pl.add_argument("--report", default=None, metavar="DIR", help="write DIR/index.html, the dataset fingerprint")
    pl.add_argument("--memory-gb", type=float, default=8.0,
                    help="memory budget: one training step on the largest images, measured, stays within 80%% of it "
                         "(default 8)")
    pl.add_argument("--modality", default="", choices=("", "microscopy", "xray", "mammography", "ct", "mri"),
                    help="decides the flips (xray: none; microscopy: all); default: from the data format, else unknown "
                         "(all flips on)")
    pl.add_argument("--device", default=None, help="device of the measured training step (default: cuda if available, "
                    "else cpu)")
    pl.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of DATA_CONFIG first (repeatable)")
    pl.set_defaults(fn=cmd_plan)

    c = sub.add_parser(
        "convert", help="a dataset (VOC, COCO, CSV, datalist, mias, dsb2018, luna16_patches) -> COCO / CSV / datalist",
        description="Write the annotations of SOURCE in another format; images are not copied (paths stay relative "
                    "to the source's image folder, printed as image_root). Examples: `medetect convert "
                    "dsb2018:../shared/data/dsb2018-nuclei --splits train val --to coco --out dsb2018-coco`; "
                    "`medetect convert luna16_patches:../shared/data/luna16-node21-patches --splits all --holdout 5 "
                    "--to datalist --out luna16_patches.json`.")
    c.add_argument("source", metavar="SOURCE", help="FORMAT:PATH (PATH: the annotation file for coco/csv/datalist, "
                   "else the dataset folder) or a config YAML")
    c.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to read (default: train val)")
    c.add_argument("--to", required=True, choices=("coco", "csv", "datalist"))
    c.add_argument("--out", required=True, help="folder (coco, csv: <split>.json / .csv) or file (datalist)")
    c.add_argument("--holdout", type=int, default=None, metavar="K",
                   help="divide the one split read: every K-th patient/series/image group is held out")
    c.add_argument("--names", nargs=2, default=None, metavar=("KEPT", "HELD"),
                   help="split names with --holdout (default training validation for a datalist, else train val)")
    c.add_argument("--box-mode", default=None, choices=("xyzxyz", "xyzwhd", "cccwhd", "xyxy", "xywh", "ccwh"),
                   help="the written datalist's box mode (default xyxy / xyzxyz)")
    c.add_argument("--box-units", default="voxel", choices=("voxel", "world"),
                   help="the written datalist's units (world: mm, from each image's geometry)")
    c.add_argument("--source-box-mode", default=None, help="a datalist SOURCE's box mode")
    c.add_argument("--source-box-units", default=None, choices=("voxel", "world"), help="a datalist SOURCE's units")
    c.set_defaults(fn=cmd_convert)
