"""``medetect`` command line: train | predict | evaluate | export | demo | froc | phantoms | luna | luna-fpr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> int:
    from .config import load_config
    from .experiment import run_training

    _threads(args.threads)
    cfg = load_config(args.config)
    if args.epochs:
        cfg.train.epochs = args.epochs
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    history = run_training(cfg, run_dir, resume=args.resume, device=args.device)
    print(json.dumps(history[-1] if history else {}))
    return 0


def _load_model(weights: str, device=None):
    from .models.io import load_model

    return load_model(weights, device=device)


def cmd_predict(args) -> int:
    from .models.io import predict_paths

    _threads(args.threads)
    out = Path(args.out)
    written = predict_paths(args.weights, args.paths, out, tile_size=args.tile, overlap=args.overlap, device=args.device,
                            score_thresh=args.score_thresh)
    print(f"wrote {len(written)} prediction files to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .models.io import evaluate_spec

    _threads(args.threads)
    res = evaluate_spec(args.weights, args.data, device=args.device, plot_dir=args.plots)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"images: {res['images']}  boxes: {res['boxes']}")
        print(f"VOC mAP@0.5 (all-point): {res['map50']:.4f}   VOC07 11-point: {res['map50_07']:.4f}   COCO mAP@[.5:.95]: {res['coco_map']:.4f}")
        for name, ap in res["ap50_per_class"].items():
            print(f"  AP@0.5 {name:>12s}: {ap:.4f}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _threads(args.threads)
    path = run_demo(Path(args.out), device=args.device or "cpu")
    print(f"demo report: {path}")
    return 0


def cmd_export(args) -> int:
    from .models.io import export_from_run, export_onnx

    if args.onnx:
        print(export_onnx(args.run_dir, args.out, args.onnx))
    else:
        print(export_from_run(args.run_dir, args.out))
    return 0


def cmd_froc(argv) -> int:
    from .evaluation.froc import main as froc_main

    return froc_main(argv, prog="medetect froc")


def cmd_phantoms(argv) -> int:
    from .data.phantoms import main as phantoms_main

    return phantoms_main(argv, prog="medetect phantoms") or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-commands with their own full parsers.
    if argv and argv[0] == "froc":
        return cmd_froc(argv[1:])
    if argv and argv[0] == "phantoms":
        return cmd_phantoms(argv[1:])
    if argv and argv[0] == "luna":
        from .luna.detection import main as luna_main

        return luna_main(argv[1:], prog="medetect luna")
    if argv and argv[0] == "luna-fpr":
        from .luna.fpr import main as fpr_main

        return fpr_main(argv[1:], prog="medetect luna-fpr")
    p = argparse.ArgumentParser(prog="medetect", description="Object detection for medical images, 2D and 3D.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    t = sub.add_parser("train", help="train a detector from a YAML config")
    t.add_argument("config")
    t.add_argument("--run-dir", default=None, help="checkpoints and metrics (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --run-dir")
    t.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    common(t)
    t.set_defaults(fn=cmd_train)

    pr = sub.add_parser("predict", help="detect objects in images/volumes")
    pr.add_argument("--weights", required=True, help="a shipped .safetensors model (config and preprocessing are in its metadata)")
    pr.add_argument("paths", nargs="+", help="image files, volumes or folders")
    pr.add_argument("--out", required=True, help="output folder (one CSV per image + predictions.json)")
    pr.add_argument("--tile", type=int, nargs="+", default=None, help="tile size for sliding-window inference")
    pr.add_argument("--overlap", type=float, default=0.25)
    pr.add_argument("--score-thresh", type=float, default=0.05)
    common(pr)
    pr.set_defaults(fn=cmd_predict)

    ev = sub.add_parser("evaluate", help="VOC/COCO mAP of a model on a dataset")
    ev.add_argument("--weights", required=True)
    ev.add_argument("--data", required=True, help="FOLDER:SPLIT, e.g. ../shared/data/bccd:val (a VOC folder)")
    ev.add_argument("--plots", default=None, help="folder for PR curves (PNG)")
    ev.add_argument("--json", action="store_true")
    common(ev)
    ev.set_defaults(fn=cmd_evaluate)

    de = sub.add_parser("demo", help="the shipped detector on bundled images -> HTML report")
    de.add_argument("--out", default="medetect-demo")
    common(de)
    de.set_defaults(fn=cmd_demo)

    ex = sub.add_parser("export", help="a run's last checkpoint -> one shippable .safetensors (or ONNX)")
    ex.add_argument("run_dir", help="training run folder (or, with --onnx, a shipped .safetensors model)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--onnx", type=int, nargs="+", default=None, metavar="SIZE",
                    help="export the backbone+FPN of a shipped model to ONNX for this input size")
    ex.set_defaults(fn=cmd_export)

    sub.add_parser("froc", help="LUNA16 FROC/CPM (see medetect froc --help)")
    sub.add_parser("phantoms", help="synthetic LUNA16-format CT phantoms (see medetect phantoms --help)")
    sub.add_parser("luna", help="LUNA16 stage one: 3D detector train/predict (see medetect luna --help)")
    sub.add_parser("luna-fpr", help="LUNA16 stage two: false-positive reduction (see medetect luna-fpr --help)")
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"medetect {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
