"""LUNA16 two-stage nodule detection on SYNTHETIC phantoms: data, stage two (FPR), the 2D slice variant, held-out FROC.

This script is the source of the candidate-track numbers in ``medetect/weights/nodule_fpr_phantom.md`` (its
``--stage evaluate`` scores the shipped model; that model itself is trained by ``experiments/luna_phantom_stage1.py
train-fpr`` on the stage-one phantoms and the stage-one detector's marks). It uses only public medetect APIs and runs
on a CPU. The stages are:

``data``
    ``medetect.data.phantoms.write_luna16_dataset`` writes 48 computer-generated chest CTs in the LUNA16 layout
    (``OUT/data``): 24 in ``subset0`` (training) and 24 in ``subset1`` (held out). It uses seed 7, a 64x160x160 grid,
    at most 400 vessel branches, nodules of 4-20 mm and 1-4 nodules per scan. The files are deterministic, so the
    same arguments give the same files (byte for byte). Takes about 10 seconds.
``train-fpr``
    ``medetect.luna.fpr.train_fpr`` trains the stage-two cube classifier on the ``candidates.csv`` candidates of
    ``subset0``. Settings: 24^3 cubes at 1.25 mm, AdamW with lr 1e-3, 50 warm-up steps, weight decay 1e-4, batch 16,
    50 % positives, seed 0, and a cosine schedule over ``--epochs`` (6). The previously shipped stage-two model (replaced, see the model card) was the
    epoch-3 checkpoint of this 6-epoch run: training was stopped after 3 epochs. ``--stop-after 3`` (the default) does
    the same. It runs the
    training in a child process, ends that process once the epoch-3 checkpoint is written, and exports that
    checkpoint to ``OUT/fpr/model.safetensors``. ``--stop-after 0`` runs the whole schedule. Three epochs take
    2 minutes on an idle 2-core CPU with 1 thread, and up to 13 minutes when the CPU is shared.
``train-2d``
    ``medetect.luna.slices2d.train_slices2d`` trains the 2D variant on the axial slices of ``subset0``. It is a
    slice Faster R-CNN, and its boxes are linked into 3D candidates. Settings: 8 epochs, batch 4, AdamW with
    lr 2e-3, 30 warm-up steps, seed 0, and random negative slices at half the number of positive slices. It writes
    ``OUT/s2d/model.safetensors`` and takes 2-10 minutes, depending on the CPU load.
``evaluate``
    This stage scores the held-out ``subset1`` (24 scans) with the official LUNA16 FROC/CPM
    (``medetect.evaluation.froc.froc``, ``--bootstrap`` samples with seed 0). The rows are:

    * ``candidates_constant``, ``candidates_random``: every ``candidates.csv`` candidate scored 0.5, or scored
      uniformly at random (``numpy.random.default_rng(0)``). These are the baselines.
    * ``candidates_fpr``, ``candidates_fpr_tta``: the same candidates scored by the FPR model, without and with
      averaging over the 8 axis flips of each cube.
    * ``candidates_oracle_labels``: the candidates' class labels used as scores. This is the upper bound of any
      stage two on these candidates.
    * ``slices2d_stage1``, ``slices2d_fpr``, ``slices2d_fused_product``, ``slices2d_fused_mean``: the 2D variant's
      linked candidates, scored with their stage-one score, the FPR score, and the two fusions. These rows need
      2D weights.

    The stage writes one submission CSV per row and ``results.json`` under ``OUT/eval``, and prints the table. It
    takes 2.5-4 minutes with 1 thread, most of it for the TTA row. ``--no-tta``, ``--no-2d``, ``--bootstrap 0`` or
    ``--threads 2`` make it faster.
``all``
    Runs every stage in order, then evaluates the weights it has just trained.

Reproducibility. ``train_fpr`` and ``train_slices2d`` seed torch with the training seed before they build the
model, so a run repeats on the same machine and thread count. The runs that made the previously shipped FPR weights
(and the first 2D weights) did not seed the initialisation, so retraining cannot give them back bit for bit: expect a
retrained model's CPMs to differ from the model card by run-to-run variation. The evaluation is exact:
``--stage data`` and ``--stage evaluate`` with the same weights give the model card's numbers (and submission CSVs)
exactly.

Which weights are evaluated:

* FPR: ``--weights`` if given. Otherwise ``--stage all`` uses the model it has just trained
  (``OUT/fpr/model.safetensors``), and ``--stage evaluate`` uses the shipped
  ``medetect/weights/nodule_fpr_phantom.safetensors``. ``--weights`` also accepts a training run folder, in which
  case its latest checkpoint is used.
* 2D: ``--slice-weights`` if given. Otherwise ``OUT/s2d/model.safetensors`` if it exists. If neither exists, the
  2D rows are skipped; the 2D weights are not shipped.

Examples::

    python experiments/luna_phantom_two_stage.py --stage data                 # write the phantoms
    python experiments/luna_phantom_two_stage.py --stage evaluate --no-2d     # re-score with the shipped weights
    python experiments/luna_phantom_two_stage.py --stage all                  # regenerate, retrain, evaluate
    python experiments/luna_phantom_two_stage.py --smoke                      # every stage on 4 tiny scans (seconds)

``--smoke`` runs every stage (data, train-fpr, train-2d, evaluate) on 4 tiny phantoms with a few training steps
into a fresh temporary folder (or ``--out``): a check that the script works, not a result.

All numbers concern synthetic phantoms. They show that the pipeline works; they say nothing about real CT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:  # run from a checkout without `pip install -e .`: use the package next to this folder
    import medetect  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medetect.data.annotations import read_luna_csv, write_luna_submission  # noqa: E402
from medetect.data.phantoms import write_luna16_dataset  # noqa: E402
from medetect.engine.trainer import TrainConfig, seed_everything  # noqa: E402
from medetect.evaluation.froc import froc  # noqa: E402
from medetect.luna import fpr  # noqa: E402
from medetect.luna import slices2d  # noqa: E402

DEFAULT_OUT = Path("/tmp/medetect_phantom_two_stage")
SHIPPED_FPR = REPO / "medetect" / "weights" / "nodule_fpr_phantom.safetensors"

# The dataset. These arguments must not change, or the numbers in the model card no longer apply.
PHANTOMS = dict(n_scans=48, seed=7, subsets=2, shape=(64, 160, 160), n_vessel_branches=400,
                nodule_diameters_mm=(4, 20), n_nodules=(1, 4))
TRAIN_SUBSET, TEST_SUBSET = "subset0", "subset1"
# Stage two (FPR): 24^3 cubes at 1.25 mm, one field of view.
FPR_MODEL = dict(cube_size=24, spacing_mm=1.25, scales=[1.0], in_channels=1, widths=[16, 32, 64])
FPR_TRAIN = dict(batch_size=16, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0, seed=0,
                 max_steps_per_epoch=0, weight_decay=1e-4)
FPR_POS_FRACTION = 0.5
# The 2D slice variant.
S2D_TRAIN = dict(batch_size=4, lr=2e-3, optimizer="adamw", warmup_iters=30, num_workers=0, seed=0, log_every=10)
S2D_NEG_RATIO = 0.5
# --smoke: 4 tiny scans and a few steps per training, to check that every stage runs (seconds, not a result).
SMOKE_PHANTOMS = dict(n_scans=4, seed=7, subsets=2, shape=(32, 64, 64), n_vessel_branches=20,
                      nodule_diameters_mm=(5, 10), n_nodules=(1, 2))
SMOKE_STEPS = dict(max_steps_per_epoch=2, batch_size=4, warmup_iters=1)


def _paths(out: Path) -> dict[str, Path]:
    return {"data": out / "data", "fpr": out / "fpr", "s2d": out / "s2d", "eval": out / "eval"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _subset_scans(root: Path, subset: str) -> dict[str, Path]:
    scans = {u: p for u, p in fpr.find_scans(root).items() if p.parent.name == subset}
    if not scans:
        raise SystemExit(f"no scans in {root}/{subset}: run --stage data first (same --out)")
    return scans


# ----------------------------------------------------------------------------------------------------------- stages


def stage_data(out: Path, phantoms: dict = PHANTOMS) -> dict:
    root = _paths(out)["data"]
    t = time.time()
    manifest = write_luna16_dataset(root, **phantoms)
    summary = {k: v for k, v in manifest.items() if k != "scans"}
    summary["seconds"] = round(time.time() - t, 1)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    print("data:", json.dumps(summary), flush=True)
    return summary


def stage_train_fpr(out: Path, epochs: int, threads: int, stop_after: int, steps: dict | None = None) -> Path:
    """Train the FPR classifier into ``OUT/fpr``. A run folder that already has checkpoints is resumed."""
    p = _paths(out)
    _subset_scans(p["data"], TRAIN_SUBSET)
    if not 0 < stop_after < epochs:
        from medetect.models.fp_reduction import FPRConfig

        tc = TrainConfig(epochs=epochs, **{**FPR_TRAIN, **(steps or {})})
        print(f"train-fpr: train_fpr({TRAIN_SUBSET} of {p['data']}, {FPR_MODEL}, {tc})", flush=True)
        torch.set_num_threads(max(1, threads))
        _, hist = fpr.train_fpr(p["data"], p["data"] / "candidates.csv", p["fpr"], config=FPRConfig(**FPR_MODEL),
                                train=tc, subsets=[TRAIN_SUBSET], pos_fraction=FPR_POS_FRACTION, resume=True,
                                progress=False)
        print("train-fpr:", json.dumps(hist[-1] if hist else {}, default=str), flush=True)
        return p["fpr"] / "model.safetensors"
    # Stop after `stop_after` epochs of the `epochs`-epoch cosine schedule, as was done for the previously shipped
    # weights. The Trainer has no early stop, so the training runs in a child process (this same script, full
    # schedule), which is ended once the epoch checkpoint is on disk; that checkpoint is then exported like
    # train_fpr exports.
    last = p["fpr"] / "last.json"

    def done_epochs() -> int:
        try:
            return int(json.loads(last.read_text())["epoch"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    if done_epochs() < stop_after:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", "train-fpr", "--out", str(out),
               "--epochs", str(epochs), "--threads", str(threads), "--stop-after", "0"]
        child = subprocess.Popen(cmd)
        try:
            while child.poll() is None and done_epochs() < stop_after:
                time.sleep(2.0)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()
        print(flush=True)
    n = done_epochs()
    if n != stop_after:
        raise SystemExit(f"train-fpr: expected the epoch-{stop_after} checkpoint in {p['fpr']}, found epoch {n}. "
                         f"The run folder may already hold a longer run: use a fresh --out or --stop-after 0.")
    model = fpr.load_fpr(p["fpr"])  # the run folder's latest checkpoint (epoch `stop_after`)
    path = fpr.save_fpr(model, p["fpr"] / "model.safetensors")
    print(f"train-fpr: stopped after epoch {n} of {epochs}; exported {path}", flush=True)
    return path


def stage_train_2d(out: Path, epochs: int, steps: dict | None = None) -> Path:
    p = _paths(out)
    root = p["data"]
    scans = _subset_scans(root, TRAIN_SUBSET)
    ann = read_luna_csv(root / "annotations.csv")
    tc = TrainConfig(epochs=epochs, **{**S2D_TRAIN, **(steps or {})})
    print(f"train-2d: train_slices2d({len(scans)} scans of {TRAIN_SUBSET}, {tc}, neg_ratio={S2D_NEG_RATIO})", flush=True)
    seed_everything(tc.seed)  # the initial weights too (see "Reproducibility" in the module docstring)
    _, hist = slices2d.train_slices2d(scans, ann, p["s2d"], train=tc, neg_ratio=S2D_NEG_RATIO)
    print("train-2d:", hist[-1] if hist else {}, flush=True)
    return p["s2d"] / "model.safetensors"


def stage_evaluate(out: Path, weights: Path, slice_weights: Path | None, *, tta: bool, n_bootstrap: int) -> dict:
    p = _paths(out)
    root = p["data"]
    scans = _subset_scans(root, TEST_SUBSET)
    uids = list(scans)
    cands = fpr.read_candidates(root / "candidates.csv")
    ev = p["eval"]
    ev.mkdir(parents=True, exist_ok=True)
    res: dict = {"data": str(root), "held_out": TEST_SUBSET, "n_scans": len(uids), "n_bootstrap": n_bootstrap,
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    t_all = time.time()

    def cpm(name: str, rows: dict) -> None:
        path = ev / f"{name}.csv"
        write_luna_submission(path, rows)
        r = froc(root / "annotations.csv", path, root / "annotations_excluded.csv", seriesuids=uids,
                 n_bootstrap=n_bootstrap, seed=0)
        ci = None if r.cpm_ci_low is None else [round(r.cpm_ci_low, 4), round(r.cpm_ci_high, 4)]
        res[name] = {"cpm": round(r.cpm, 4), "cpm_ci95": ci,
                     "sens_at_fps": dict(zip(map(str, r.fps.tolist()), np.round(r.sensitivities, 3).tolist())),
                     "max_sens": round(r.max_sensitivity, 4), "n_marks": r.n_marks, "n_nodules": r.n_nodules}
        print(f"  {name:28s} CPM {r.cpm:.4f}", flush=True)

    # baselines on the candidates.csv candidates
    rng = np.random.default_rng(0)
    cpm("candidates_constant", {u: (cands[u][0], np.full(len(cands[u][0]), 0.5)) for u in uids if u in cands})
    cpm("candidates_random", {u: (cands[u][0], rng.random(len(cands[u][0]))) for u in uids if u in cands})

    # stage two on the same candidates
    model = fpr.load_fpr(weights)
    res["fpr_weights"] = {"path": str(weights)}
    if weights.is_file():
        res["fpr_weights"]["sha256"] = _sha256(weights)
    elif (weights / "last.json").is_file():
        res["fpr_weights"]["checkpoint"] = json.loads((weights / "last.json").read_text())
    t = time.time()
    scored = fpr.score_scans(model, scans, cands)
    res["fpr_score_seconds"] = round(time.time() - t, 1)
    cpm("candidates_fpr", scored)
    if tta:
        t = time.time()
        scored_tta = fpr.score_scans(model, scans, cands, tta=True)
        res["fpr_tta_score_seconds"] = round(time.time() - t, 1)
        cpm("candidates_fpr_tta", scored_tta)
    cpm("candidates_oracle_labels", {u: (cands[u][0], cands[u][1].astype(float)) for u in uids if u in cands})

    # the 2D slice variant: stage one alone, stage two alone and fused
    if slice_weights is not None:
        det = slices2d.load_slice_model(slice_weights)
        res["s2d_weights"] = {"path": str(slice_weights)}
        if slice_weights.is_file():
            res["s2d_weights"]["sha256"] = _sha256(slice_weights)
        rows = {}
        t = time.time()
        for u, path in scans.items():
            vol, geom = fpr.load_scan(path)
            c = slices2d.detect_scan_2d(det, vol, geom)
            rows[u] = (c["centres_world"], c["scores"])
        res["s2d_detect_seconds"] = round(time.time() - t, 1)
        res["s2d_candidates_per_scan"] = float(np.mean([len(v[1]) for v in rows.values()]))
        cpm("slices2d_stage1", rows)
        sc2 = fpr.score_scans(model, scans, rows)
        cpm("slices2d_fpr", sc2)
        cpm("slices2d_fused_product", {u: (c, fpr.fuse(rows[u][1], q, "product")) for u, (c, q) in sc2.items()})
        cpm("slices2d_fused_mean", {u: (c, fpr.fuse(rows[u][1], q, "mean")) for u, (c, q) in sc2.items()})
    res["evaluate_seconds"] = round(time.time() - t_all, 1)
    (ev / "results.json").write_text(json.dumps(res, indent=1))
    _print_table(res)
    print(f"wrote {ev / 'results.json'}", flush=True)
    return res


def _print_table(res: dict) -> None:
    fps = ["0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"]
    print(f"\nHeld-out phantom {res['held_out']} ({res['n_scans']} scans), LUNA16 FROC, "
          f"{res['n_bootstrap']} bootstrap samples")
    print(f"{'scores':28s} {'CPM':>6s}  {'95% CI':13s} " + " ".join(f"{f:>5s}" for f in fps) + "  marks")
    for name, r in res.items():
        if not (isinstance(r, dict) and "cpm" in r):
            continue
        ci = "-" if r["cpm_ci95"] is None else f"{r['cpm_ci95'][0]:.3f}-{r['cpm_ci95'][1]:.3f}"
        sens = " ".join(f"{r['sens_at_fps'][f]:5.3f}" for f in fps)
        print(f"{name:28s} {r['cpm']:6.3f}  {ci:13s} {sens}  {r['n_marks']}")
    print(f"(nodules: {next(r['n_nodules'] for r in res.values() if isinstance(r, dict) and 'n_nodules' in r)}; "
          f"columns 0.125..8.0: sensitivity at that many false positives per scan)\n", flush=True)


# ----------------------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Stages and defaults are described in the module docstring of this file.")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"work folder: data/, fpr/, s2d/, eval/ (default {DEFAULT_OUT}; with --smoke a new temporary "
                         "folder)")
    ap.add_argument("--stage", choices=["data", "train-fpr", "train-2d", "evaluate", "all"], default="all")
    ap.add_argument("--weights", type=Path, default=None,
                    help="FPR weights (.safetensors or a run folder) to evaluate. Default: the shipped "
                         "nodule_fpr_phantom.safetensors for --stage evaluate, the freshly trained OUT/fpr model "
                         "for --stage all")
    ap.add_argument("--slice-weights", type=Path, default=None,
                    help="2D slice-detector weights (.safetensors or a run folder). Default: OUT/s2d/model.safetensors "
                         "if it exists (the 2D weights are not shipped)")
    ap.add_argument("--epochs", type=int, default=6, help="FPR cosine schedule length in epochs (default 6)")
    ap.add_argument("--stop-after", type=int, default=3,
                    help="stop FPR training after this many epochs, as for the previously shipped weights (default 3; "
                         "0 = run all --epochs)")
    ap.add_argument("--epochs-2d", type=int, default=8, help="2D slice-detector epochs (default 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as for the model-card numbers)")
    ap.add_argument("--no-2d", action="store_true", help="skip the 2D slice variant (training and evaluation)")
    ap.add_argument("--no-tta", action="store_true", help="skip the 8-flip test-time-augmentation row")
    ap.add_argument("--bootstrap", type=int, default=1000, help="FROC bootstrap samples (default 1000; 0 = no CI)")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage on 4 tiny phantoms with 2 steps per training, no TTA, no bootstrap (seconds)")
    a = ap.parse_args(argv)

    torch.set_num_threads(max(1, a.threads))
    phantoms, steps = PHANTOMS, None
    if a.smoke:
        import tempfile

        a.stage, a.epochs, a.stop_after, a.epochs_2d, a.no_tta, a.bootstrap = "all", 1, 0, 1, True, 0
        phantoms, steps = SMOKE_PHANTOMS, SMOKE_STEPS
        a.out = a.out or Path(tempfile.mkdtemp(prefix="medetect_smoke_two_stage_"))
    out = (a.out or DEFAULT_OUT).resolve()
    p = _paths(out)
    stages = ["data", "train-fpr", "train-2d", "evaluate"] if a.stage == "all" else [a.stage]
    if a.no_2d:
        stages = [s for s in stages if s != "train-2d"]
    trained_fpr = None
    for stage in stages:
        print(f"== stage {stage} (out {out})", flush=True)
        if stage == "data":
            stage_data(out, phantoms)
        elif stage == "train-fpr":
            trained_fpr = stage_train_fpr(out, a.epochs, a.threads, a.stop_after, steps)
        elif stage == "train-2d":
            stage_train_2d(out, a.epochs_2d, steps)
        else:
            weights = a.weights or trained_fpr or SHIPPED_FPR
            slice_weights = None
            if not a.no_2d:
                slice_weights = a.slice_weights
                if slice_weights is None and (p["s2d"] / "model.safetensors").is_file():
                    slice_weights = p["s2d"] / "model.safetensors"
                if slice_weights is None:
                    print("evaluate: no 2D weights (--slice-weights, or OUT/s2d from --stage train-2d): "
                          "the 2D rows are skipped", flush=True)
            print(f"evaluate: FPR weights {weights}; 2D weights {slice_weights}", flush=True)
            stage_evaluate(out, Path(weights), None if slice_weights is None else Path(slice_weights),
                           tta=not a.no_tta, n_bootstrap=a.bootstrap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
