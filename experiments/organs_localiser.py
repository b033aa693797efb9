"""Organ localisation: held-out phantoms, the real organ-ct-sample cases, whole-CT timing, shipping.

    python experiments/organs_localiser.py data [--out DIR] [--n 30]         # held-out phantoms (seeds 5000..)
    python experiments/organs_localiser.py evaluate --weights W [--out DIR] [--real FOLDER ...]
                                               # held-out phantoms + each case of each real organ folder
                                               # (default: ../shared/data/organ-ct-sample)
    python experiments/organs_localiser.py thresholds --weights W [--out DIR] [--real FOLDER ...]
                                               # per score threshold: detection rate of the present organs
                                               # (phantoms, each real folder) and the rate at which an organ
                                               # absent from a phantom is reported present
    python experiments/organs_localiser.py time --weights W [--threads 1]    # 512x512x300 CT, 1 thread
    python experiments/organs_localiser.py ship RUN [--score-thresh T] --weights OUT
                                               # RUN/model.safetensors (or a model file) -> fp16 weights
    python experiments/organs_localiser.py table [--out DIR]                 # the results table of OUT/results.json
    python experiments/organs_localiser.py --smoke [--out DIR]               # data, evaluate, time, table on 2 tiny
                                                                             # phantoms (seconds; not a result)

Training: ``medetect train configs/organs_ct_rpn3d.yaml --run-dir RUN --threads 1`` (phantoms seeds 1000..1239
generated into RUN/phantoms). Results are printed and written to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "organs_ct_rpn3d.safetensors"
SHARED = Path(os.environ.get("MEDETECT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def data(out: Path, n: int, **phantom_kw) -> None:
    from medetect.organs.phantoms import write_organ_dataset

    # held-out: other seeds than training (1000..1239), realistic slice spacing 0.6-5 mm, in-plane 1.5-2.5 mm (a
    # 160-330 matrix: full 512 matrices take ~30 s each to draw on the 2-core machine)
    t = time.time()
    kw = phantom_kw or {"spacing_range": ((0.6, 5.0), (1.5, 2.5))}
    print(write_organ_dataset(out / "heldout", n, 5000, **kw), f"{time.time() - t:.0f} s")


def _folders(out: Path, real: list[Path]) -> list[tuple[str, Path]]:
    """The held-out phantoms (skipped with a line when not generated yet) and each named real folder (which must be
    an organ folder: a missing one is an error, never silently skipped)."""
    for f in real:
        if not (Path(f) / "boxes.csv").is_file():
            raise FileNotFoundError(f"--real {f}: not an organ folder (no boxes.csv there)")
    return [("heldout_phantoms", out / "heldout")] + [(f"real:{Path(f).name}", Path(f)) for f in real]


def evaluate(out: Path, weights: Path, real: list[Path]) -> None:
    from medetect.apps import load_model
    from medetect.organs.report import evaluate_organ_folder, format_organ_table

    loaded = load_model(weights)
    results = {}
    for name, folder in _folders(out, real):
        if not (folder / "boxes.csv").is_file():
            print(f"skipping {name}: {folder} has no boxes.csv")
            continue
        t = time.time()
        res = evaluate_organ_folder(loaded, folder)
        res["seconds"] = round(time.time() - t, 1)
        print(f"== {name}\n{format_organ_table(res) if name != 'heldout_phantoms' else _short(res)}")
        results[name] = res
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written {out / 'results.json'}")


def thresholds(out: Path, weights: Path, real: list[Path], grid=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)) -> None:
    """Every organ's best box at threshold 0 once, then per threshold: detection rate over the present organs
    and mean wall distance over the detected ones (phantoms; each real folder) and, on the phantoms (every organ labelled), the rate at which an absent organ is
    reported present. Real folders label only some of the organs they show, so no false-present rate there."""
    from medetect.apps import load_model
    from medetect.organs.report import evaluate_organ_folder

    loaded = load_model(weights)
    recs = {}
    for name, folder in _folders(out, real):
        if (folder / "boxes.csv").is_file():
            res = evaluate_organ_folder(loaded, folder, score_thresh=0.0)
            recs[name] = [r for case in res["cases"].values() for r in case["organs"].values()]
    rows = []
    for t in grid:
        row = {"threshold": t}
        for name, rs in recs.items():
            present = [r for r in rs if r["present"]]
            hit = [r for r in present if (r["iou"] or 0) > 0 and (r["score"] or 0) >= t]
            walls = [r["wall_distance_mm"] for r in hit if r["wall_distance_mm"] is not None]
            row[f"{name}:detection_rate"] = round(len(hit) / len(present), 3) if present else None
            row[f"{name}:wall_mm"] = round(float(np.mean(walls)), 1) if walls else None
            if name == "heldout_phantoms":
                absent = [r for r in rs if not r["present"]]
                row["heldout_phantoms:false_present_rate"] = round(np.mean([(r["score"] or 0) >= t for r in absent]),
                                                                   3) if absent else None
        rows.append(row)
    (out / "thresholds.json").write_text(json.dumps(rows, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n" + "|---" * len(keys) + "|")
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else f"{row[k]:g}" for k in keys) + " |")


def _short(res: dict) -> str:
    from medetect.organs.report import format_organ_table

    table = format_organ_table(res)
    return table[table.index("all cases"):]


def timing(weights: Path, threads: int, shape=(300, 512, 512), phantom_spacing=(1.25, 0.8, 0.8)) -> None:
    from medetect.apps import load_model
    from medetect.convert import Geometry
    from medetect.data.image import MedicalImage
    from medetect.organs.localiser import localise
    from medetect.organs.phantoms import make_organ_phantom

    torch.set_num_threads(threads)
    hu, _, geom, _ = make_organ_phantom(7, spacing=phantom_spacing, fov="chest_abdomen", max_shape=max(shape))
    vol = np.full(shape, -1000, dtype=np.int16)  # the phantom placed in a 512x512x300 CT
    z, y, x = (min(a, b) for a, b in zip(hu.shape, vol.shape))
    vol[:z, :y, :x] = hu[:z, :y, :x]
    img = MedicalImage(vol[None], Geometry(tuple(phantom_spacing), geom.origin, geom.direction))
    loaded = load_model(weights)
    localise(loaded, img)  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        res = localise(loaded, img)
        times.append(time.perf_counter() - t)
    print(json.dumps({"shape": list(vol.shape), "threads": threads, "seconds": [round(t, 2) for t in times],
                      "median_s": round(sorted(times)[1], 2), "organs_found": int(res["present"].sum())}))


def ship(run: Path, out: Path, score_thresh: float | None = None) -> None:
    """RUN/model.safetensors (or a model file) -> fp16 ``out``; ``score_thresh`` replaces the stored organ threshold
    (the same tensors: fp16 -> fp32 -> fp16 is exact)."""
    from medetect.apps import load_model
    from medetect.models.io import save_model

    loaded = load_model(run if run.is_file() else run / "model.safetensors")
    model = loaded.model.half()
    extra = {**loaded.meta["extra"], "dtype": "float16"}
    if score_thresh is not None:
        extra["organ_score_thresh"] = float(score_thresh)
    save_model(model, out, kind="detector", preprocess=loaded.preprocess, classes=loaded.classes, extra=extra)
    print(f"written {out} ({out.stat().st_size / 1e6:.2f} MB)")


def table(out: Path) -> None:
    """The Xu-style markdown table (per organ: wall distance, centroid distance, IoU, detection rate) of
    ``OUT/results.json``: held-out phantoms, then each real case separately."""
    if not (out / "results.json").is_file():
        raise FileNotFoundError(f"{out / 'results.json'}: not there; run the evaluate stage with the same --out first")
    res = json.loads((out / "results.json").read_text())

    def f(v, nd=1):
        return "-" if v is None else f"{v:.{nd}f}"

    cols = [("held-out phantoms", res["heldout_phantoms"], None)] if "heldout_phantoms" in res else []
    for name, real in res.items():
        if name.startswith("real:"):
            cols += [(case, real, case) for case in real.get("cases", {})]
    organs = [o for o in (res.get("heldout_phantoms") or cols[0][1])["organs_scored"]]
    head = "| organ | " + " | ".join(f"{name}: wall / centroid mm, IoU, detected" for name, _, _ in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for o in organs + ["mean"]:
        row = [o]
        for _, r, case in cols:
            s = r["cases"][case]["summary"] if case else r
            if o != "mean" and o not in s["detection_rate"]["per_organ"]:
                row.append("(absent)")
                continue
            v = {k: s[k]["mean"] if o == "mean" else s[k]["per_organ"][o] for k in
                 ("wall_distance_mm", "centroid_distance_mm", "iou", "detection_rate")}
            row.append(f"{f(v['wall_distance_mm'])} / {f(v['centroid_distance_mm'])}, {f(v['iou'], 2)}, "
                       f"{f(v['detection_rate'], 2)}")
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", choices=["data", "evaluate", "thresholds", "time", "ship", "table"])
    ap.add_argument("run", nargs="?", help="ship: the training run folder")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default /tmp/medetect_organs; smoke: a new "
                                                           "temporary folder)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--weights", type=Path, default=SHIPPED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score-thresh", type=float, default=None,
                    help="ship: the organ score threshold stored in the file (default: the run's)")
    ap.add_argument("--real", type=Path, action="append", default=None,
                    help="a real organ folder (organ-ct-sample layout) to evaluate on; repeat for more (default: "
                         "the shared organ-ct-sample)")
    ap.add_argument("--smoke", action="store_true", help="data, evaluate, time and table on 2 coarse phantoms and a "
                                                         "small timing volume (seconds; not a result)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args()
    if a.stage is None and not a.smoke:
        ap.error("a stage is required (or --smoke)")
    if a.stage == "ship" and not a.run:
        ap.error("ship needs the training run folder (or a model file)")
    if a.score_thresh is not None and not 0 <= a.score_thresh <= 1:
        ap.error(f"--score-thresh must be in [0, 1], got {a.score_thresh:g}")
    try:
        run(a)
    except (FileNotFoundError, ValueError) as e:  # a user mistake: one sentence, exit 2
        if a.debug:
            raise
        print(f"organs_localiser: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(a: argparse.Namespace) -> None:
    if a.out is None:
        import tempfile

        a.out = Path(tempfile.mkdtemp(prefix="medetect_smoke_organs_")) if a.smoke else Path(
            "/tmp/medetect_organs")
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    if a.smoke:  # every stage but ship, on 2 coarse phantoms and a small timing volume
        data(a.out, 2, spacing=(5.0, 4.0, 4.0))
        evaluate(a.out, a.weights, real=[])
        thresholds(a.out, a.weights, real=[], grid=(0.1, 0.3))
        timing(a.weights, a.threads, shape=(48, 96, 96), phantom_spacing=(5.0, 4.0, 4.0))
        table(a.out)
    elif a.stage == "data":
        data(a.out, a.n)
    elif a.stage == "evaluate":
        evaluate(a.out, a.weights, a.real if a.real is not None else [SHARED / "organ-ct-sample"])
    elif a.stage == "thresholds":
        thresholds(a.out, a.weights, a.real if a.real is not None else [SHARED / "organ-ct-sample"])
    elif a.stage == "table":
        table(a.out)
    elif a.stage == "time":
        timing(a.weights, a.threads)
    else:
        ship(Path(a.run), a.weights, a.score_thresh)


if __name__ == "__main__":
    main()
