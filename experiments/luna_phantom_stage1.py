"""LUNA16 stage one on synthetic phantoms: data -> train a small-nodule 3D RetinaNet -> held-out FROC (stage one alone
and fused with a stage-two FPR model) -> whole-scan timing -> ship; stage two trained on stage one's marks.

Every number in ``medetect/weights/nodule_phantom_det3d.md`` comes from these commands (run from the repository root)::

    python experiments/luna_phantom_stage1.py data     --root /tmp/medetect_luna_stage1
    python experiments/luna_phantom_stage1.py train    --root /tmp/medetect_luna_stage1 --recipe s125 --threads 1
    python experiments/luna_phantom_stage1.py train    --root /tmp/medetect_luna_stage1 --recipe s100 --threads 1
    python experiments/luna_phantom_stage1.py evaluate --root /tmp/medetect_luna_stage1 --recipe s125
    python experiments/luna_phantom_stage1.py evaluate --root /tmp/medetect_luna_stage1 --recipe s100
    python experiments/luna_phantom_stage1.py ship     --root /tmp/medetect_luna_stage1 --recipe RECIPE   # the better one
    python experiments/luna_phantom_stage1.py time     --root /tmp/medetect_luna_stage1 --threads 2

Stage two trained on this detector's own false positives (``medetect/weights/nodule_fpr_phantom.md``)::

    python experiments/luna_phantom_stage1.py train-fpr --root /tmp/medetect_luna_stage1 --threads 1
    python experiments/luna_phantom_stage1.py evaluate  --root /tmp/medetect_luna_stage1 \
        --weights medetect/weights/nodule_phantom_det3d.safetensors \
        --fpr /tmp/medetect_luna_stage1/run_fpr/model.safetensors --out /tmp/medetect_luna_stage1/eval_fpr
    python experiments/luna_phantom_stage1.py ship-fpr  --root /tmp/medetect_luna_stage1
    python experiments/luna_phantom_stage1.py evaluate  --root /tmp/medetect_luna_stage1 \
        --weights medetect/weights/nodule_phantom_det3d.safetensors --out /tmp/medetect_luna_stage1/eval_shipped

``train-fpr`` runs the shipped stage-one detector (``--weights`` overrides) on the 39 training scans, keeps its 100
most probable marks per scan, labels each mark 1 when it lies within the radius of a nodule (else 0; marks on excluded
findings are dropped) and trains the FPR cube classifier on those marks plus the training scans' ``candidates.csv``
(``ROOT/run_fpr``, checkpoints every epoch, resumed automatically). ``evaluate`` fuses the held-out marks with the
shipped stage-two model unless ``--fpr`` names other weights, in the modes product, mean, geometric and fpr (stage two
alone), and lists both stages' probabilities for each held-out nodule.

``train`` writes checkpoints every epoch (``ROOT/run_RECIPE/epoch_*``) and resumes from the last one (so it can be
stopped and restarted, e.g. with another ``--threads``); ``evaluate`` scores ``ROOT/run_RECIPE/model.safetensors`` if
training finished, else the latest checkpoint (``--weights`` overrides) and writes ``ROOT/eval_RECIPE/metrics.json``.

``--smoke`` runs data, train, evaluate, train-fpr and time on 4 tiny phantoms with 2 training steps each, into a
fresh temporary folder (or ``--root``): a check that the script works, not a result.

The data are synthetic chest phantoms (:mod:`medetect.data.phantoms`) in the LUNA16 layout: 52 scans dealt
round-robin into subset0..3; subset0-2 (39 scans) train, subset3 (13 scans) is held out. Nothing here is patient data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medetect.luna.detection import (  # noqa: E402
    LunaLayout,
    LunaPreprocess,
    _froc_summary,
    default_detector_config,
    evaluate_submission,
    load_luna_model,
    predict_layout,
    save_luna_model,
    time_inference,
    train_detector,
    write_submission,
)

# ---------------------------------------------------------------------------------------------- the recipe
DATA = dict(n_scans=52, seed=2026, subsets=4, n_nodules=(1, 4), shape=(80, 160, 160), spacing=(1.5, 1.2, 1.2),
            nodule_diameters_mm=(4.0, 30.0))
TRAIN_SUBSETS = ["subset0", "subset1", "subset2"]
TEST_SUBSET = "subset3"
# two recipes were trained (both commands below); "s125" was the first, "s100" the second
RECIPES = {
    # 1.25 mm isotropic: strides 4 and 8 are 5 and 10 mm; anchors 4, 8 voxels (5, 10 mm) and 14, 24 (17.5, 30 mm)
    "s125": dict(spacing=1.25, anchor_shapes=[[[4.0] * 3, [8.0] * 3], [[14.0] * 3, [24.0] * 3]], epochs=30),
    # 1.0 mm isotropic: strides 4 and 8 are 4 and 8 mm; anchors 5, 10 voxels (mm) and 18, 30
    "s100": dict(spacing=1.0, anchor_shapes=[[[5.0] * 3, [10.0] * 3], [[18.0] * 3, [30.0] * 3]], epochs=32),
}
MODEL = dict(arch="retinanet", base_width=8, fpn_channels=16, levels=[2, 3], score_thresh=0.01, nms_thresh=0.1,
             detections_per_img=100)
TRAIN = dict(batch_size=4, lr=2e-3, optimizer="adamw", warmup_iters=100, num_workers=0, max_steps_per_epoch=100,
             log_every=10, weight_decay=1e-4)
PATCH, PATCHES_PER_VOLUME, POS_PROB = 64, 12, 0.7
FPR_WEIGHTS = REPO / "medetect" / "weights" / "nodule_fpr_phantom.safetensors"
# stage two trained on stage one's marks: two fields of view as channels, 24^3 voxels of 1.25 mm (30 mm: the
# phantoms' resolution) and of 2.5 mm (60 mm: sees the largest, 30 mm, nodules with their surroundings)
FPR_MODEL = dict(cube_size=24, spacing_mm=1.25, scales=[1.0, 2.0], in_channels=2, widths=[16, 32, 64])
FPR_TRAIN = dict(epochs=12, batch_size=16, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0, seed=0,
                 max_steps_per_epoch=300, weight_decay=1e-4, log_every=50)
FPR_TOP_K, FPR_POS_FRACTION = 100, 0.5
SHIP = REPO / "medetect" / "weights" / "nodule_phantom_det3d.safetensors"
N_BOOTSTRAP = 1000  # FROC bootstrap resamples of the scans (the CPM's 95 % interval)
TIME_SHAPE = (256, 512, 512)  # the whole-scan timing's volume


def use_smoke_settings() -> None:
    """--smoke: 4 tiny phantoms (one per subset), 2 steps per training, no bootstrap, a small timing volume."""
    global PATCH, PATCHES_PER_VOLUME, N_BOOTSTRAP, TIME_SHAPE, FPR_TOP_K
    DATA.update(n_scans=4, shape=(32, 64, 64), n_nodules=(1, 2), nodule_diameters_mm=(5.0, 12.0))
    for r in RECIPES.values():
        r["epochs"] = 1
    TRAIN.update(batch_size=2, warmup_iters=1, max_steps_per_epoch=2)
    MODEL.update(score_thresh=0.05, detections_per_img=20)  # an untrained head scores near its 0.01 prior everywhere
    FPR_TRAIN.update(epochs=1, batch_size=4, warmup_iters=1, max_steps_per_epoch=2)
    PATCH, PATCHES_PER_VOLUME, N_BOOTSTRAP, TIME_SHAPE, FPR_TOP_K = 32, 2, 0, (32, 64, 64), 10


def cmd_data(root: Path) -> None:
    from medetect.data.phantoms import write_luna16_dataset

    t0 = time.perf_counter()
    man = write_luna16_dataset(root / "data", **DATA)
    print(json.dumps({"n_scans": man["n_scans"], "n_nodules": man["n_nodules"], "n_candidates": man["n_candidates"],
                      "seconds": round(time.perf_counter() - t0, 1)}))


def model_config(recipe: str):
    return default_detector_config(**MODEL, anchor_shapes=RECIPES[recipe]["anchor_shapes"])


def cmd_train(root: Path, recipe: str) -> None:
    from medetect.engine.trainer import TrainConfig

    layout = LunaLayout(root / "data")
    w = train_detector(layout, root / f"run_{recipe}", subsets=TRAIN_SUBSETS,
                       pre=LunaPreprocess(spacing=RECIPES[recipe]["spacing"]), model_config=model_config(recipe),
                       train_config=TrainConfig(**TRAIN, epochs=RECIPES[recipe]["epochs"]),
                       patch_size=PATCH, patches_per_volume=PATCHES_PER_VOLUME, pos_prob=POS_PROB,
                       cache_dir=root / "cache", resume=True, progress=False)
    print(f"weights: {w}")


def resolve_weights(root: Path, recipe: str, weights: str | None) -> Path:
    """The finished model, else a model file made from the latest checkpoint of the run."""
    if weights:
        return Path(weights)
    run = root / f"run_{recipe}"
    if (run / "model.safetensors").is_file():
        return run / "model.safetensors"
    from medetect.engine.checkpoint import latest_checkpoint
    from medetect.models.detector import build_detector
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no model.safetensors and no checkpoint")
    model = build_detector(model_config(recipe))
    model.load_state_dict(load_file(str(Path(ckpt) / "model.safetensors")))
    out = root / f"model_{recipe}_{Path(ckpt).name}.safetensors"
    save_luna_model(model.eval(), out, LunaPreprocess(spacing=RECIPES[recipe]["spacing"]),
                    extra={"checkpoint": Path(ckpt).name})
    print(f"weights from checkpoint {ckpt} -> {out}")
    return out


def _with_ci(res) -> dict:
    """FROC summary plus the bootstrap 95% interval of the CPM (N_BOOTSTRAP resamples of the scans)."""
    out = _froc_summary(res)
    out["cpm_ci95"] = [round(float(res.cpm_ci_low), 4), round(float(res.cpm_ci_high), 4)] \
        if res.cpm_ci_low is not None else None
    return out


def two_stage(layout: LunaLayout, marks: dict, uids, out_dir: Path, modes=("product", "mean", "geometric", "fpr"),
              fpr_weights: Path = FPR_WEIGHTS) -> dict:
    """Stage-one marks rescored by an FPR model (default the shipped one), fused, written and scored."""
    from medetect.luna.fpr import fuse, load_fpr, score_scans

    fpr = load_fpr(fpr_weights)
    scans = {u: layout.path(u) for u in uids}
    scored = score_scans(fpr, scans, {u: (marks[u]["centres_xyz"], None) for u in uids})
    res = {}
    for mode in modes:
        fused = {u: {"centres_xyz": marks[u]["centres_xyz"],
                     "probabilities": fuse(marks[u]["probabilities"], scored[u][1], mode)} for u in uids}
        sub = write_submission(out_dir / f"submission_two_stage_{mode}.csv", fused)
        res[mode] = _with_ci(evaluate_submission(layout, sub, uids, n_bootstrap=N_BOOTSTRAP))
    res["per_nodule"] = per_nodule(layout, marks, {u: scored[u][1] for u in uids}, uids)
    return res


def per_nodule(layout: LunaLayout, marks: dict, p_fpr: dict, uids) -> list[dict]:
    """Per held-out nodule: its diameter and, for the most probable stage-one mark within its radius, both stages'
    probabilities (``None`` when no mark hits it)."""
    rows = []
    for u in uids:
        ctr, dia = layout.annotations.get(u, (np.zeros((0, 3)), np.zeros(0)))
        c, p = np.asarray(marks[u]["centres_xyz"]).reshape(-1, 3), np.asarray(marks[u]["probabilities"])
        for a, d in zip(ctr, dia):
            hit = np.flatnonzero(((c - a) ** 2).sum(1) <= (d / 2) ** 2)
            k = hit[np.argmax(p[hit])] if len(hit) else None
            rows.append({"seriesuid": u, "diameter_mm": round(float(d), 2),
                         "p_det": None if k is None else round(float(p[k]), 4),
                         "p_fpr": None if k is None else round(float(p_fpr[u][k]), 4)})
    return rows


def cmd_evaluate(root: Path, recipe: str, weights: str | None, out: Path | None, fpr: str | None = None) -> dict:
    layout = LunaLayout(root / "data")
    w = resolve_weights(root, recipe, weights)
    model, pre = load_luna_model(w)
    test = layout.uids_in([TEST_SUBSET])
    out = out or root / f"eval_{recipe}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    marks = predict_layout(model, pre, layout, test)
    seconds = time.perf_counter() - t0
    sub = write_submission(out / "submission_stage1.csv", marks)
    res = {"weights": str(w), "test_subset": TEST_SUBSET, "n_test_scans": len(test),
           "predict_seconds_per_scan": round(seconds / max(1, len(test)), 2),
           "stage1": _with_ci(evaluate_submission(layout, sub, test, n_bootstrap=N_BOOTSTRAP))}
    fpr_weights = Path(fpr) if fpr else FPR_WEIGHTS
    res["fpr_weights"] = str(fpr_weights)
    res["two_stage"] = two_stage(layout, marks, test, out, fpr_weights=fpr_weights)
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


def _excluded_by_uid(layout: LunaLayout) -> dict:
    ex = layout.excluded
    if ex is None:
        return {}
    return {u: (ex.centres[ex.seriesuids == u], ex.diameters[ex.seriesuids == u]) for u in np.unique(ex.seriesuids)}


def fpr_training_candidates(root: Path, weights: str | None) -> dict:
    """``candidates.csv`` of the training scans plus the stage-one detector's top marks on them (labelled)."""
    from medetect.luna.fpr import candidates_from_marks, merge_candidates

    layout = LunaLayout(root / "data")
    train = layout.uids_in(TRAIN_SUBSETS)
    cache = root / "fpr_marks_train.json"
    if cache.is_file():
        marks = {u: {k: np.asarray(v) for k, v in m.items()} for u, m in json.loads(cache.read_text()).items()}
    else:
        model, pre = load_luna_model(Path(weights) if weights else SHIP)
        t0 = time.perf_counter()
        marks = predict_layout(model, pre, layout, train)
        print(f"stage-one marks on {len(train)} training scans: {time.perf_counter() - t0:.0f} s")
        cache.write_text(json.dumps({u: {"centres_xyz": m["centres_xyz"].tolist(),
                                         "probabilities": m["probabilities"].tolist()} for u, m in marks.items()}))
    from_marks = candidates_from_marks(marks, layout.annotations, top_k=FPR_TOP_K, excluded=_excluded_by_uid(layout))
    csv_c = {u: layout.candidates[u] for u in train if u in layout.candidates}
    stats = {"marks": sum(len(y) for _, y in from_marks.values()),
             "marks_positive": int(sum(y.sum() for _, y in from_marks.values())),
             "candidates_csv": sum(len(y) for _, y in csv_c.values()),
             "candidates_csv_positive": int(sum(np.asarray(y).sum() for _, y in csv_c.values()))}
    print(json.dumps({"fpr_training_candidates": stats}))
    return merge_candidates(csv_c, from_marks), stats


def cmd_train_fpr(root: Path, weights: str | None) -> None:
    from medetect.engine.trainer import TrainConfig
    from medetect.luna.fpr import train_fpr
    from medetect.models.fp_reduction import FPRConfig

    cands, stats = fpr_training_candidates(root, weights)
    run = root / "run_fpr"
    run.mkdir(parents=True, exist_ok=True)
    (run / "candidates_stats.json").write_text(json.dumps(stats))
    t0 = time.perf_counter()
    _, hist = train_fpr(root / "data", cands, run, config=FPRConfig(**FPR_MODEL), train=TrainConfig(**FPR_TRAIN),
                        subsets=TRAIN_SUBSETS, pos_fraction=FPR_POS_FRACTION, resume=True, progress=False)
    print(json.dumps({"seconds": round(time.perf_counter() - t0), "last": hist[-1] if hist else None}, default=str))


def cmd_ship_fpr(root: Path, fpr: str | None) -> None:
    from medetect.luna.fpr import load_fpr, save_fpr

    model = load_fpr(Path(fpr) if fpr else root / "run_fpr" / "model.safetensors")
    save_fpr(model, FPR_WEIGHTS)
    print(f"{FPR_WEIGHTS}: {FPR_WEIGHTS.stat().st_size} bytes")


def cmd_time(root: Path, recipe: str, weights: str | None) -> None:
    model, pre = load_luna_model(Path(weights) if weights else SHIP if SHIP.is_file() else
                                 resolve_weights(root, recipe, None))
    print(json.dumps(time_inference(model, pre, shape=TIME_SHAPE)))


def cmd_ship(root: Path, recipe: str, weights: str | None) -> None:
    model, pre = load_luna_model(resolve_weights(root, recipe, weights))
    save_luna_model(model, SHIP, pre, extra={"recipe": recipe, "data": {k: list(v) if isinstance(v, tuple) else v for k, v in DATA.items()},
                                             "train_subsets": TRAIN_SUBSETS, "synthetic_only": True})
    print(f"{SHIP}: {SHIP.stat().st_size} bytes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", choices=("data", "train", "evaluate", "time", "ship", "train-fpr", "ship-fpr"))
    p.add_argument("--root", default=None, help="work folder (data, run, eval), outside the repo (default "
                                                "/tmp/medetect_luna_stage1; with --smoke a new temporary folder)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="s100", help="training recipe (run folder ROOT/run_RECIPE)")
    p.add_argument("--weights", help="evaluate/time/ship these weights instead of the run's; train-fpr: the stage-one "
                                     "detector whose marks are the training candidates (default the shipped one)")
    p.add_argument("--out", help="evaluate: output folder (default ROOT/eval_RECIPE)")
    p.add_argument("--fpr", help="evaluate: the stage-two weights to fuse with (default the shipped "
                                 "nodule_fpr_phantom.safetensors; a run folder means its latest checkpoint); "
                                 "ship-fpr: the weights to ship (default ROOT/run_fpr/model.safetensors)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="data, train, evaluate, train-fpr and time on 4 tiny phantoms "
                                                        "with 2 steps per training (seconds; nothing is shipped)")
    a = p.parse_args(argv)
    if a.stage is None and not a.smoke:
        p.error("a stage is required (or --smoke)")
    if a.threads:
        torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.smoke:
        import tempfile

        use_smoke_settings()
        root = Path(a.root or tempfile.mkdtemp(prefix="medetect_smoke_stage1_"))
        cmd_data(root)
        cmd_train(root, a.recipe)
        cmd_evaluate(root, a.recipe, None, None)
        cmd_train_fpr(root, str(root / f"run_{a.recipe}" / "model.safetensors"))
        cmd_time(root, a.recipe, str(root / f"run_{a.recipe}" / "model.safetensors"))
        return 0
    root = Path(a.root or "/tmp/medetect_luna_stage1")
    if a.stage == "data":
        cmd_data(root)
    elif a.stage == "train":
        cmd_train(root, a.recipe)
    elif a.stage == "evaluate":
        cmd_evaluate(root, a.recipe, a.weights, Path(a.out) if a.out else None, a.fpr)
    elif a.stage == "train-fpr":
        cmd_train_fpr(root, a.weights)
    elif a.stage == "ship-fpr":
        cmd_ship_fpr(root, a.fpr)
    elif a.stage == "time":
        cmd_time(root, a.recipe, a.weights)
    else:
        cmd_ship(root, a.recipe, a.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
