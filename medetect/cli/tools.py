"""``froc`` (LUNA16 FROC/CPM of a submission) and ``phantoms`` (synthetic LUNA16-format CTs, or with ``--organs``
torso CTs with labelled organs in the ``organ-ct-sample`` layout)."""

from __future__ import annotations

import argparse

from pathlib import Path

from .common import add_force, check_out_dir, check_out_file, nonneg_int, positive_float, positive_int, print_json
from .errors import UsageError

__all__ = ["register"]


def cmd_froc(args) -> int:
    from ..evaluation.froc import MAX_MARKS_PER_SCAN, froc, plot_froc

    if args.plot:
        if Path(args.plot).suffix.lower() != ".png":
            raise UsageError(f"--plot {args.plot}: give a .png file name")
        check_out_file(args.plot, "--plot", force=args.force)
    max_marks = MAX_MARKS_PER_SCAN if args.max_marks is None else (args.max_marks or None)  # 0 = all
    result = froc(args.annotations, args.predictions, excluded=args.excluded, seriesuids=args.seriesuids,
                  n_bootstrap=args.bootstrap, seed=args.seed, max_marks_per_scan=max_marks)
    if args.plot:
        try:
            plot_froc(result, args.plot)
        except OSError as exc:
            raise UsageError(f"--plot: cannot write {args.plot}: {exc.strerror or exc}") from exc
    if args.json:
        print_json(result.to_dict(include_curve=args.curve), indent=2)
    else:
        print(result.format_table())
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def cmd_phantoms(args) -> int:
    from ..data.phantoms import write_luna16_dataset

    out = check_out_dir(args.out_dir, "OUT_DIR")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"OUT_DIR {out} is not empty; phantoms are written into a new or empty folder")
    if args.organs:
        return _organ_phantoms(args, out)
    if args.fov is not None:
        raise UsageError("--fov needs --organs (it picks the field of view of the organ phantoms)")
    lo, hi = args.nodules
    if lo > hi:
        raise UsageError(f"--nodules LO HI needs LO <= HI, got {lo} {hi}")
    dmin, dmax = args.diameters
    if dmin > dmax:
        raise UsageError(f"--diameters MIN MAX needs MIN <= MAX, got {dmin:g} {dmax:g}")
    if args.noise < 0:
        raise UsageError(f"--noise must be >= 0, got {args.noise:g}")
    kw = {"shape": tuple(args.shape), "nodule_diameters_mm": (dmin, dmax), "noise_std_hu": args.noise}
    if args.spacing is not None:
        kw["spacing"] = tuple(args.spacing)
    m = write_luna16_dataset(out, args.scans, args.seed, args.subsets, n_nodules=(lo, hi), **kw)
    print_json({k: v for k, v in m.items() if k != "scans"}, indent=2)
    return 0


def _organ_phantoms(args, out) -> int:
    from ..organs.phantoms import write_organ_dataset

    if args.noise < 0:
        raise UsageError(f"--noise must be >= 0, got {args.noise:g}")
    kw = {"fov": args.fov, "noise_hu": None if args.noise == 25.0 else args.noise}
    if args.spacing is not None:
        kw["spacing"] = tuple(args.spacing)
    print_json(write_organ_dataset(out, args.scans, args.seed, **kw), indent=2)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "froc", help="LUNA16 FROC / CPM of a submission (the official script's rules)",
        description="LUNA16 FROC / CPM evaluation with the rules of the official noduleCADEvaluationLUNA16.py (hit = "
                    "centre distance < radius, marks on excluded findings ignored, at most 100 marks per scan, "
                    "bootstrap over scans).")
    f.add_argument("annotations", help="annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm)")
    f.add_argument("predictions", help="predictions CSV (seriesuid,coordX,coordY,coordZ,probability)")
    f.add_argument("--excluded", metavar="F", help="annotations_excluded.csv (marks on these findings are neither TP nor FP)")
    f.add_argument("--seriesuids", metavar="F", help="seriesuids.csv: the evaluated scans, one per line "
                   "(default: the scans of the annotations and predictions)")
    f.add_argument("--bootstrap", metavar="N", type=nonneg_int, default=1000,
                   help="bootstrap resamples of the scans for the confidence intervals (default 1000; 0 = none)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    f.add_argument("--max-marks", type=nonneg_int, default=None,
                   help="most suspicious marks kept per scan (default 100 as in LUNA16; 0 = all)")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.add_argument("--curve", action="store_true", help="with --json: include the full curve")
    f.add_argument("--plot", metavar="OUT.png", help="write the FROC plot to this PNG file")
    add_force(f, "the --plot file")
    f.set_defaults(fn=cmd_froc)

    p = sub.add_parser("phantoms", help="synthetic chest-CT phantoms as a LUNA16-format dataset (MHD/RAW + CSVs)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; must be new or empty)")
    p.add_argument("--scans", type=positive_int, default=10, help="number of scans (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--subsets", type=positive_int, default=1, help="spread scans over subset0..subsetK-1 (default 1)")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("Z", "Y", "X"), default=(128, 256, 256),
                   help="voxels per array axis (default 128 256 256)")
    p.add_argument("--spacing", type=positive_float, nargs=3, metavar=("SZ", "SY", "SX"), default=None,
                   help="mm per array axis; default: drawn per scan like LUNA16's")
    p.add_argument("--nodules", type=nonneg_int, nargs=2, metavar=("LO", "HI"), default=(0, 4),
                   help="nodules per scan, inclusive range (default 0 4)")
    p.add_argument("--diameters", type=positive_float, nargs=2, metavar=("MIN", "MAX"), default=(3.0, 30.0),
                   help="nodule diameters in mm (default 3 30)")
    p.add_argument("--noise", type=float, default=25.0, help="noise standard deviation in HU (default 25; with "
                   "--organs: drawn per scan in 5..30 unless given)")
    p.add_argument("--organs", action="store_true",
                   help="torso CTs with labelled organs (liver, spleen, kidneys, stomach, aorta, heart, lungs, bladder, "
                        "vertebrae) in the organ-ct-sample layout: volumes/, labels/ (NIfTI), boxes.csv, "
                        "label_tables.json; spacing drawn per scan (slices 0.6-5 mm, in-plane 0.6-1 mm) unless "
                        "--spacing is given; --shape, --nodules, --diameters and --subsets do not apply")
    p.add_argument("--fov", default=None, choices=["thorax", "abdomen", "abdomen_pelvis", "chest_abdomen", "whole",
                                                   "slab", "crop"],
                   help="with --organs: the field of view of every scan (default: drawn per scan)")
    p.set_defaults(fn=cmd_phantoms)
