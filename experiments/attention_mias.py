"""Detection with attention on mini-MIAS: the ablation (plain classifier + Grad-CAM, unsupervised attention
lambda = 0, supervised attention), its table with 95% patient-bootstrap intervals, overlays, and shipping.

    python experiments/attention_mias.py train  [--out /tmp/medetect_attention] [--epochs 40]   # 3 runs, ~10 min
    python experiments/attention_mias.py table  [--out ...] [--split val] [--overlays DIR]     # table + JSON
    python experiments/attention_mias.py ship   [--out ...]                                    # fp16 model file

Every run is ``medetect train configs/mias_attention.yaml --run-dir OUT/<method> --threads 1`` with the overrides
below; ``table`` scores ``OUT/<method>/model.safetensors`` with the code of ``medetect evaluate --data
FOLDER:SPLIT --json`` (:func:`medetect.attention.evaluate.evaluate_attention`). ``--overlays DIR`` writes one overlay
PNG per method of the first abnormal image of the split (generated, never committed: MIAS is research-only).

``--smoke`` runs ``train`` (one step per method) and ``table`` (with overlays) on 16 synthetic films
(experiments/_smoke_data.py) in a fresh temporary folder (or ``--out``): a check that the script works, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = {  # name -> (--set overrides, saliency scored)
    "gradcam": (["model.attention=none", "model.attention_weight=0"], "gradcam"),
    "lambda0": (["model.attention_weight=0"], "attention"),
    "supervised": ([], "attention"),
}
KEYS = ("image_auc_abnormal", "image_auc_malignant", "pointing_game", "attention_in_lesion", "attention_froc_mean")


def _data_root(args) -> str:
    return args.data or os.path.join(os.environ.get("MEDETECT_DATA", str(REPO.parent / "shared" / "data")), "mini-mias")


def train(args) -> None:
    procs = []
    for name, (sets, _) in METHODS.items():
        cmd = [sys.executable, "-m", "medetect", "train", str(REPO / "configs" / "mias_attention.yaml"), "--run-dir",
               str(Path(args.out) / name), "--threads", "1", "--set", f"train.epochs={args.epochs}",
               "--set", f"data.root={_data_root(args)}", "--set", f"train.seed={args.seed}"]
        for s in [*args.set, *sets]:
            cmd += ["--set", s]
        log = open(Path(args.out) / f"{name}.log", "w")
        print(" ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO)}))
        if not args.parallel:
            procs[-1].wait()
    for p in procs:
        p.wait()


def table(args) -> None:
    import torch

    from medetect.apps import load_model
    from medetect.attention.data import LesionImages
    from medetect.data.lesion_folder import read_lesion_folder
    from medetect.attention.evaluate import evaluate_attention
    from medetect.attention.infer import saliency
    from medetect.attention.predict import overlay_rgb

    torch.set_num_threads(args.threads)
    results = {}
    for name, (_, method) in METHODS.items():
        w = Path(args.out) / name / "model.safetensors"
        if not w.is_file():
            print(f"{name}: {w} missing, skipped")
            continue
        loaded = load_model(w)
        results[name] = evaluate_attention(loaded, _data_root(args), args.split, method=method, n_boot=args.n_boot)
        if args.overlays:
            from PIL import Image
            import numpy as np

            recs = read_lesion_folder(_data_root(args), args.split)
            i = next(k for k, r in enumerate(recs) if len(r.radii))
            ds = LesionImages(recs, loaded.preprocess)
            x, _ = ds.prepared(i)
            _, sal = saliency(loaded.model, x[None], method)
            rgb = overlay_rgb(x[0].numpy(), sal[0].numpy())
            c, r, sp = ds.circles(i)  # draw the lesion circle(s) in white
            yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]] + 0.5
            for (cy, cx), rad in zip(c, r / sp[0]):
                ring = np.abs(np.hypot(yy - cy, xx - cx) - rad) < 0.8
                rgb[ring] = 255
            Path(args.overlays).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(Path(args.overlays) / f"{recs[i].image_id}_{name}.png")
    lines = ["| method | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, res in results.items():
        cells = []
        for k in KEYS:
            lo, hi = res[f"{k}_ci"]
            cells.append(f"{res[k]:.3f} ({lo:.2f}-{hi:.2f})" if lo is not None else f"{res[k]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = Path(args.out) / f"table_{args.split}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def ship(args) -> None:
    from medetect.apps import load_model
    from medetect.models.io import save_model

    src = Path(args.out) / "supervised" / "model.safetensors"
    loaded = load_model(src)
    dst = REPO / "medetect" / "weights" / "mammo_mias_attention.safetensors"
    save_model(loaded.model, dst, kind="attention", preprocess=loaded.preprocess, classes=loaded.classes,
               extra={**loaded.meta.get("extra", {}), "source": "experiments/attention_mias.py train (supervised)"},
               fp16=True)
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", choices=("train", "table", "ship"))
    ap.add_argument("--out", default=None, help="work folder (run folders, logs, table JSON; default "
                                                "/tmp/medetect_attention, with --smoke a new temporary folder)")
    ap.add_argument("--data", default=None, help="mini-MIAS-layout folder (default $MEDETECT_DATA/mini-mias)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", action="store_true", help="train the three runs at once (one thread each)")
    ap.add_argument("--set", action="append", default=[], help="config override for all three runs (KEY=VALUE)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overlays", default=None, help="folder for one overlay PNG per method (table stage)")
    ap.add_argument("--smoke", action="store_true", help="train (one step per method) and table on 16 synthetic "
                                                         "films (seconds; not a result)")
    args = ap.parse_args()
    if args.stage is None and not args.smoke:
        ap.error("a stage is required (or --smoke)")
    if args.smoke:
        import tempfile

        from _smoke_data import write_mias_folder

        args.out = args.out or tempfile.mkdtemp(prefix="medetect_smoke_attention_")
        args.data = str(write_mias_folder(Path(args.out) / "mias-smoke"))
        args.epochs, args.n_boot, args.parallel = 1, 10, True
        args.overlays = args.overlays or str(Path(args.out) / "overlays")
        args.set = [*args.set, "train.max_steps_per_epoch=1", "train.batch_size=2"]
        for stage in (train, table):
            stage(args)
        return
    args.out = args.out or "/tmp/medetect_attention"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"train": train, "table": table, "ship": ship}[args.stage](args)


if __name__ == "__main__":
    main()
