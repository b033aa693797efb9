"""LUNA16 stage one trained on REAL nodules: the luna16-node21-patches cubes.

Data: the cubes' scans are split by scan (``medetect.luna.mosaics.split_by_scan``, every 4th scan -> val). Training
scans are the train cubes laid out 2 x 2 four times with different seeds (so every nodule appears in four positions
and flips), as subset0..3 of one LUNA16-layout folder; validation is ``medetect luna mosaics SRC VAL`` (seed 0).
Training is the ordinary ``medetect train`` route with ``configs/luna_real_cubes.yaml``. Run from the repository root::

    python experiments/real_cubes_stage1.py data  --src ../shared/data/luna16-node21-patches --root /tmp/real_cubes
    medetect train configs/luna_real_cubes.yaml --run-dir /tmp/real_cubes/run --set data.root=/tmp/real_cubes/train --threads 1
    python experiments/real_cubes_stage1.py evaluate --root /tmp/real_cubes --weights /tmp/real_cubes/run

``evaluate`` predicts the val mosaics with the weights (a model file or a run folder's newest checkpoint) and prints
the exact LUNA16 FROC (CPM with a 95% bootstrap interval).

Stage two (false-positive reduction) on real candidates: the stage-one detector's 100 most probable marks on the
training mosaics, labelled by the strict LUNA16 hit rule (marks on excluded findings dropped), plus every training
nodule's centre as a positive::

    python experiments/real_cubes_stage1.py fpr-data --root /tmp/real_cubes --weights medetect/weights/nodule_ct_det3d.safetensors
    medetect train configs/luna_fpr_real_cubes.yaml --run-dir /tmp/real_cubes/run_fpr --threads 1
    python experiments/real_cubes_stage1.py evaluate --root /tmp/real_cubes --weights medetect/weights/nodule_ct_det3d.safetensors --fpr /tmp/real_cubes/run_fpr/model.safetensors

With ``--fpr``, ``evaluate`` also rescores the val marks with stage two and prints the fused FROC (``product``).
``--smoke`` runs ``data`` (one mosaic layout), ``fpr-data`` and ``evaluate`` (with the shipped stage one and two)
on the first 8 cubes of ``--src``, in a fresh temporary folder (or ``--root``): a check that the script works, not a
result.

``lidc --weights W`` runs stage one on the two real LIDC-IDRI slabs and scores its marks against the readers'
consensus nodules (``medetect.data.annotations.lidc``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medetect.luna.mosaics import build_mosaics  # noqa: E402

SHIPPED_DET = REPO / "medetect" / "weights" / "nodule_ct_det3d.safetensors"
SHIPPED_FPR = REPO / "medetect" / "weights" / "nodule_fpr_ct.safetensors"


def smoke_source(src: Path, dst: Path, n: int = 8) -> Path:
    """The first ``n`` cubes of ``src`` as a luna16-node21-patches-layout folder ``dst`` (--smoke)."""
    import csv

    with open(src / "patches.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    if not rows:
        raise SystemExit(f"{src / 'patches.csv'} lists no cubes")
    (dst / "patches").mkdir(parents=True)
    for name in ("patches.csv", "components.csv"):
        if not (src / name).is_file():
            continue
        with open(src / name, newline="") as f, open(dst / name, "w", newline="") as g:
            r = csv.DictReader(f)
            w = csv.DictWriter(g, r.fieldnames)
            w.writeheader()
            keep = {row["patch_id"] for row in rows}
            w.writerows(row for row in r if row["patch_id"] in keep)
    for row in rows:
        shutil.copy(src / "patches" / f"{row['patch_id']}.npz", dst / "patches")
    return dst


def cmd_data(src: Path, root: Path, seeds: int = 4) -> None:
    train = root / "train"
    if train.exists():
        raise SystemExit(f"{train} exists: remove it or choose another --root")
    parts = []
    for s in range(seeds):
        part = root / f"train_seed{s}"
        build_mosaics(src, part, split="train", seed=100 + s)
        parts.append(part)
    train.mkdir(parents=True)
    for name in ("annotations.csv", "annotations_excluded.csv"):
        lines = []
        for k, part in enumerate(parts):
            rows = (part / name).read_text().splitlines()
            lines += rows[1:] if k else rows
        (train / name).write_text("\n".join(lines) + "\n")
    uids = []
    for k, part in enumerate(parts):
        shutil.move(str(part / "subset0"), str(train / f"subset{k}"))
        uids += (part / "seriesuids.csv").read_text().split()
        shutil.rmtree(part)
    (train / "seriesuids.csv").write_text("".join(f"{u}\n" for u in uids))
    print(json.dumps({"train_scans": len(uids)}))
    print(json.dumps({k: v for k, v in build_mosaics(src, root / "val", split="val", seed=0).items() if k != "mosaics"}))


def cmd_fpr_data(root: Path, weights: str, threads: int) -> None:
    import numpy as np

    from medetect.cli import main as cli
    from medetect.data.annotations import WorldPoints, read_world_points, write_world_points
    from medetect.luna.fpr import candidates_from_marks, merge_candidates

    train = root / "train"
    sub = root / "train_marks.csv"
    args = ["--threads", str(threads)] if threads else []
    if cli(["luna", "predict", str(train), "--weights", weights, "--out", str(sub), "--force", *args]):
        raise SystemExit(2)
    ann = read_world_points(train / "annotations.csv", "annotations")
    exc = read_world_points(train / "annotations_excluded.csv", "excluded")
    from_marks = candidates_from_marks(read_world_points(sub, "marks"), ann, top_k=100, excluded=exc)
    positives = {u: (p.centres, np.ones(len(p), dtype=np.int64)) for u, p in ann.by_uid().items()}
    cands = merge_candidates(from_marks, positives)
    uids = [u for u, (c, _) in cands.items() for _ in range(len(c))]
    centres = np.concatenate([c for c, _ in cands.values()])
    labels = np.concatenate([np.asarray(y) for _, y in cands.values()])
    write_world_points(root / "fpr_candidates.csv",
                       WorldPoints.from_arrays(uids, centres, labels=labels, source="fpr candidates"), "candidates")
    n_marks = sum(len(y) for _, y in from_marks.values())
    print(json.dumps({"marks": n_marks, "marks_positive": int(sum(np.sum(y) for _, y in from_marks.values())),
                      "candidates": int(len(labels)), "positives": int(labels.sum())}))


def cmd_lidc(lidc: Path, weights: str) -> None:
    """The stage-one detector on the two real LIDC-IDRI slabs: per consensus nodule (>= 3 mm, clustered from the four
    readers' XML), the rank of the first mark within the nodule's radius and the distance of the nearest mark."""
    import numpy as np

    from medetect.convert import Geometry
    from medetect.data.annotations.lidc import LidcGeometry, cluster_lidc_marks, read_lidc_xml
    from medetect.data.image import MedicalImage
    from medetect.luna.detection import load_luna_model, predict_scan

    model, pre = load_luna_model(weights)
    vol = json.loads((lidc / "volumes.json").read_text())
    for pid, v in vol.items():
        d = np.load(lidc / "volumes" / f"{pid}.npz")
        img = MedicalImage(d["image"][None], Geometry(tuple(float(x) for x in d["spacing_zyx"]),
                                                       tuple(float(x) for x in d["origin_xyz"]),
                                                       (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), path=pid)
        marks = predict_scan(model, pre, img)
        g = LidcGeometry(tuple(v["origin_xyz"][:2]), tuple(v["spacing_zyx"][1:]), tuple(v["z_positions"]))
        xml_marks, _, _ = read_lidc_xml(lidc / "xml" / Path(v["xml_file"]).name)
        for n in cluster_lidc_marks(xml_marks, g, prefix=f"{pid}_N"):
            box = g.box_mm(n.union_box_px, n.union_z_mm)
            radius = float(np.max(box[3:] - box[:3])) / 2
            dist = np.linalg.norm(marks["centres_xyz"] - np.asarray(n.centre_mm), axis=1)
            hit = np.flatnonzero(dist < radius)
            print(json.dumps({"nodule": n.cluster_id, "readers": n.n_readers, "in_slab": n.slab_box(g)[0] is not None,
                              "truncated_by_slab": n.slab_box(g)[1], "radius_mm": round(radius, 1),
                              "rank_of_first_mark_within_radius": int(hit[0]) + 1 if len(hit) else None,
                              "nearest_mark_mm": round(float(dist.min()), 1) if len(dist) else None,
                              "top_mark_prob": round(float(marks["probabilities"][0]), 3) if len(dist) else None}))


def cmd_evaluate(root: Path, weights: str, threads: int, fpr: str | None = None) -> int:
    from medetect.cli import main as cli

    val = root / "val"
    sub = root / "val_submission.csv"
    args = ["--threads", str(threads)] if threads else []
    rc = cli(["luna", "predict", str(val), "--weights", weights, "--out", str(sub), "--force", *args])
    froc = ["--excluded", str(val / "annotations_excluded.csv"), "--seriesuids", str(val / "seriesuids.csv")]
    rc = rc or cli(["froc", str(val / "annotations.csv"), str(sub), *froc])
    if fpr and not rc:
        fused = root / "val_submission_fused.csv"
        rc = cli(["luna-fpr", "score", "--weights", fpr, str(val), "--candidates", str(sub), "--out", str(fused),
                  "--fuse", "product", "--force", *args])
        print("stage one + stage two, fused (product):")
        rc = rc or cli(["froc", str(val / "annotations.csv"), str(fused), *froc])
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", choices=("data", "fpr-data", "evaluate", "lidc"))
    p.add_argument("--lidc", default=str(REPO.parent / "shared" / "data" / "lidc-idri-slabs"))
    p.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "luna16-node21-patches"))
    p.add_argument("--root", default=None, help="work folder, outside the repository (default /tmp/real_cubes; with "
                                                "--smoke a new temporary folder)")
    p.add_argument("--weights", help="evaluate: a model file or a run folder")
    p.add_argument("--fpr", help="evaluate: also fuse with this stage-two model (file or run folder)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="data, fpr-data and evaluate (shipped weights) on the first 8 "
                                                        "cubes of --src (seconds)")
    a = p.parse_args(argv)
    if a.smoke:
        import tempfile

        root = Path(a.root or tempfile.mkdtemp(prefix="medetect_smoke_real_cubes_"))
        cmd_data(smoke_source(Path(a.src), root / "src"), root, seeds=1)
        cmd_fpr_data(root, str(SHIPPED_DET), a.threads)
        return cmd_evaluate(root, str(SHIPPED_DET), a.threads, str(SHIPPED_FPR))
    if a.stage is None:
        p.error("a stage is required (or --smoke)")
    root = Path(a.root or "/tmp/real_cubes")
    if a.stage == "data":
        cmd_data(Path(a.src), root)
    elif a.stage == "lidc":
        cmd_lidc(Path(a.lidc), a.weights)
    elif a.stage == "fpr-data":
        cmd_fpr_data(root, a.weights, a.threads)
    else:
        return cmd_evaluate(root, a.weights, a.threads, a.fpr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
