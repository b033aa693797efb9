"""Tiny synthetic data for the experiment scripts' ``--smoke`` runs (a helper module, not a script).

``write_mias_folder`` writes a mini-MIAS-layout folder (``images/<id>.png``, ``images.csv``, ``annotations.csv``,
``train.txt``, ``val.txt``) of synthetic films: a bright half-ellipse breast against the chest-wall side of a dark
film, with one round lesion on abnormal films. Nothing here is patient data; a smoke run checks that a script works,
its figures mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# patient -> (label of the right film, label of the left film); patients p000..p004 train, p005..p007 val. Both
# splits hold normal, benign and malignant films, and the train patients both classes of every patient-level target.
_PATIENTS = [("normal", "normal"), ("benign", "normal"), ("malignant", "normal"), ("normal", "normal"),
             ("benign", "malignant"), ("normal", "normal"), ("malignant", "normal"), ("benign", "normal")]
_VAL_FROM = 5


def write_mias_folder(root: str | Path, size: int = 512, seed: int = 0) -> Path:
    """Write the synthetic mini-MIAS-layout folder ``root`` (16 films of ``size`` x ``size`` pixels) and return it."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images, ann, splits = [], [], {"train": [], "val": []}
    k = 0
    for p, labels in enumerate(_PATIENTS):
        split = "val" if p >= _VAL_FROM else "train"
        for side, label in zip("RL", labels):
            k += 1
            iid = f"mdb{k:03d}"
            wall = size if side == "R" else 0  # the chest wall: the right edge for a right breast
            breast = ((xx - wall) / (0.75 * size)) ** 2 + ((yy - size / 2) / (0.45 * size)) ** 2 < 1
            img = rng.normal(10, 3, (size, size)) + breast * rng.normal(110, 12, (size, size))
            if label != "normal":
                r = size * rng.uniform(0.04, 0.06)
                cx = wall + (-1 if side == "R" else 1) * size * rng.uniform(0.25, 0.4)
                cy = size * rng.uniform(0.4, 0.6)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 90
                cx, cy, r = int(round(cx)), int(round(cy)), int(round(r))
                ann.append(f"{iid},{split},F,CIRC,{'M' if label == 'malignant' else 'B'},{cx},{size - 1 - cy},{r},1,"
                           f"{cx},{cy},{cx - r},{cy - r},{cx + r},{cy + r},")
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{iid}.png")
            abnormal = int(label != "normal")
            images.append(f"{iid},images/{iid}.png,{split},p{p:03d},{side},{size},{size},F,{label},{abnormal},"
                          f"{abnormal},synthetic")
            splits[split].append(iid)
    (root / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label,"
                                     "n_abnormalities,n_boxes,source_pgm_sha256\n" + "\n".join(images) + "\n")
    (root / "annotations.csv").write_text("image_id,split,tissue,abnormality,severity,x_mias,y_mias,radius,"
                                          "has_location,cx,cy,xmin,ymin,xmax,ymax,note\n" + "\n".join(ann) + "\n")
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
