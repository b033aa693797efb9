"""Detection with attention in 3D: nodule vs background sub-cubes of the real LUNA16 nodule patches,
supervised attention, pointing game on a scan-disjoint val split. Same code as the 2D mammograms: the attention
classifier (``ndim: 3``), ``circle_heatmap`` (the nodule as the sphere of its mask's equivalent diameter, centred at the
mask centroid), the engine's Trainer and :func:`medetect.evaluation.attention.attention_metrics`.

    python experiments/attention_luna_cubes.py [--out /tmp/medetect_attention_cubes] [--epochs 30] [--lam 1]

Data: ``$MEDETECT_DATA/luna16-node21-patches`` (113 patches of 50^3 at 1 mm, 68 scans). Split: scans sorted by
seriesuid hash, every 5th scan to val (about 20 %). Sub-cubes of ``--size`` voxels (default 20): a positive holds the
target nodule's centroid at least ``--margin`` voxels inside its border (random position); a negative holds no mask
voxel at all (any component), drawn at random positions (patches whose nodule leaves no such cube give none).
Lung window -1000..400 HU -> [0, 1], then (x - 0.5) / 0.25. Val cubes are drawn once (seed 1): 2 positives and up
to 2 negatives per patch.

``--smoke`` trains 2 steps and scores on 10 synthetic 32^3 patches (a bright sphere in noise, 10 scans) written to a
fresh temporary folder (or ``--out``): a check that the script works, not a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from medetect.attention.data import attention_collate  # noqa: E402
from medetect.attention.infer import saliency  # noqa: E402
from medetect.engine.runs import prepare_run_dir  # noqa: E402
from medetect.engine.trainer import TrainConfig, Trainer, seed_everything  # noqa: E402
from medetect.evaluation.attention import attention_metrics  # noqa: E402
from medetect.heatmaps import circle_heatmap  # noqa: E402
from medetect.models.attention import AttentionConfig, build_attention  # noqa: E402


def load_patches(root: Path) -> list[dict]:
    out = []
    for f in sorted((root / "patches").glob("*.npz")):
        d = np.load(f)
        img, lab = d["image"].astype(np.float32), d["label"]
        x = np.clip((img + 1000.0) / 1400.0, 0, 1)
        x = (x - 0.5) / 0.25
        zz = np.argwhere(lab == 1)
        centre = zz.mean(0) + 0.5  # edge coordinates of the centroid
        radius = 0.5 * (6 * len(zz) / np.pi) ** (1 / 3)  # equivalent sphere, 1 mm voxels
        out.append({"id": f.stem, "uid": str(d["seriesuid"]), "x": x, "mask": lab > 0, "centre": centre,
                    "radius": float(radius)})
    return out


def write_smoke_patches(root: Path, n: int = 10, size: int = 32) -> Path:
    """``n`` synthetic patches in the luna16-node21-patches layout (``patches/<id>.npz``: ``image`` HU, ``label``
    mask, ``seriesuid``), one sphere of 3-4 voxels radius each, one scan each (--smoke)."""
    rng = np.random.default_rng(0)
    (root / "patches").mkdir(parents=True, exist_ok=True)
    zz, yy, xx = np.mgrid[:size, :size, :size] + 0.5
    for k in range(n):
        c, r = rng.uniform(size / 2 - 2, size / 2 + 2, 3), rng.uniform(3, 4)
        mask = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r
        img = (rng.normal(-800, 50, (size,) * 3) + 750 * mask).astype(np.int16)
        np.savez(root / "patches" / f"smoke{k:02d}.npz", image=img, label=mask.astype(np.uint8),
                 seriesuid=np.array(f"1.2.826.0.1.smoke.{k}"))
    return root


def split(patches: list[dict]) -> tuple[list[dict], list[dict]]:
    uids = sorted({p["uid"] for p in patches}, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    val = set(uids[::5])
    return [p for p in patches if p["uid"] not in val], [p for p in patches if p["uid"] in val]


def draw(p: dict, positive: bool, size: int, margin: int, rng: np.random.Generator) -> np.ndarray | None:
    shape = np.array(p["x"].shape)
    hi = shape - size
    if (hi < 0).any():
        return None
    if positive:
        c = p["centre"]
        lo_o = np.clip(np.ceil(c - size + margin), 0, hi).astype(int)
        hi_o = np.clip(np.floor(c - margin), 0, hi).astype(int)
        return np.array([rng.integers(a, max(a, b) + 1) for a, b in zip(lo_o, hi_o)])
    for _ in range(50):  # rejection sampling of a mask-free cube (data preparation, not a hot loop)
        o = np.array([rng.integers(0, h + 1) for h in hi])
        if not p["mask"][o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size].any():
            return o
    return None


class SubCubes(Dataset):
    def __init__(self, patches, size, margin, seed, fixed=False, per_patch=2):
        self.patches, self.size, self.margin = patches, size, margin
        self.rng = np.random.default_rng(seed)
        self.items = [(i, pos) for i in range(len(patches)) for pos in (True, False) for _ in range(per_patch)]
        self.fixed = None
        if fixed:
            self.fixed = [(i, pos, draw(patches[i], pos, size, margin, self.rng)) for i, pos in self.items]
            self.fixed = [t for t in self.fixed if t[2] is not None]

    def __len__(self):
        return len(self.fixed) if self.fixed is not None else len(self.items)

    def sample(self, k):
        if self.fixed is not None:
            i, pos, o = self.fixed[k]
        else:
            i, pos = self.items[k]
            o = draw(self.patches[i], pos, self.size, self.margin, self.rng)
            if o is None:  # no mask-free cube in this patch: a positive instead
                pos, o = True, draw(self.patches[i], True, self.size, self.margin, self.rng)
        p, s = self.patches[i], self.size
        x = p["x"][o[0]:o[0] + s, o[1]:o[1] + s, o[2]:o[2] + s]
        c = (p["centre"] - o)[None] if pos else np.zeros((0, 3))
        r = np.array([p["radius"]]) if pos else np.zeros(0)
        return x, c, r, pos, p["uid"]

    def __getitem__(self, k):
        x, c, r, pos, _ = self.sample(k)
        if self.fixed is None:  # flips along every axis
            axes = [a for a in range(3) if self.rng.random() < 0.5]
            x = np.flip(x, axes)
            c = c.copy()
            c[:, axes] = self.size - c[:, axes]
        s = (self.size,) * 3
        hm = circle_heatmap(torch.as_tensor(c), torch.as_tensor(r), s) if pos else torch.zeros(s)
        return {"image": torch.from_numpy(np.ascontiguousarray(x))[None], "labels": torch.tensor([float(pos)]),
                "heatmap": hm, "has_heatmap": torch.tensor(bool(pos))}


def score(model, data: SubCubes, method: str, n_boot: int = 200) -> dict:
    xs, cs, rs, ys, uids = [], [], [], [], []
    for k in range(len(data)):
        x, c, r, pos, uid = data.sample(k)
        xs.append(torch.from_numpy(np.ascontiguousarray(x))[None])
        cs.append(c)
        rs.append(r)
        ys.append([float(pos)])
        uids.append(uid)
    probs, sals = [], []
    for a in range(0, len(xs), 16):
        p, s = saliency(model, torch.stack(xs[a:a + 16]), method)
        probs.append(p)
        sals.extend(s.numpy())
    return attention_metrics(torch.cat(probs).numpy(), np.array(ys), sals, cs, rs, uids, class_names=("nodule",),
                             n_boot=n_boot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.environ.get("MEDETECT_DATA", str(REPO.parent / "shared" / "data")),
                                                  "luna16-node21-patches"))
    ap.add_argument("--out", default=None, help="work folder (default /tmp/medetect_attention_cubes; with --smoke a "
                                                "new temporary folder)")
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--margin", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lam", type=float, default=1.0, help="attention_weight (0: unsupervised attention)")
    ap.add_argument("--no-stem-pool", action="store_true", help="finer attention map (stride 2 at c2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 training steps on 10 synthetic patches (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_boot, max_steps = 200, 0
    if args.smoke:
        import tempfile

        args.out = args.out or tempfile.mkdtemp(prefix="medetect_smoke_attention_cubes_")
        args.data = str(write_smoke_patches(Path(args.out) / "patches_smoke"))
        args.epochs, args.size, args.margin, n_boot, max_steps = 1, 12, 2, 10, 2
    args.out = args.out or "/tmp/medetect_attention_cubes"
    patches = load_patches(Path(args.data))
    train_p, val_p = split(patches)
    run = Path(args.out) / f"lam{args.lam:g}_e{args.epochs}{'_nopool' if args.no_stem_pool else ''}"
    mcfg = AttentionConfig(ndim=3, num_classes=1, base_width=8, feature_level=2, attention_weight=args.lam,
                           dropout=0.2, stem_pool=not args.no_stem_pool)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=8, lr=1e-3, optimizer="adamw", warmup_iters=20, num_workers=0,
                       seed=0, log_every=20, max_steps_per_epoch=max_steps)
    prepare_run_dir(run, {"model": mcfg.to_dict(), "train": vars(args)}, resume=False, overwrite=args.overwrite,
                    config_name="cubes_config.json")
    seed_everything(0)
    model = build_attention(mcfg)
    train = SubCubes(train_p, args.size, args.margin, seed=0)
    val = SubCubes(val_p, args.size, args.margin, seed=1, fixed=True)
    Trainer(model=model, train_data=train, config=tcfg, run_dir=run, collate=attention_collate,
            run_config={"attention": mcfg.to_dict()}, progress=False).fit()
    res = {"train_patches": len(train_p), "val_patches": len(val_p), "val_cubes": len(val),
           "val_scans": len({p["uid"] for p in val_p}), "attention": score(model, val, "attention", n_boot),
           "gradcam": score(model, val, "gradcam", n_boot)}
    (run / "result.json").write_text(json.dumps(res, indent=1))
    a = res["attention"]
    print(json.dumps({"lambda": args.lam, "val_cubes": len(val), "auc": a["image_auc_nodule"],
                      "auc_ci": a["image_auc_nodule_ci"], "pointing_game": a["pointing_game"],
                      "pointing_game_ci": a["pointing_game_ci"], "attention_in_lesion": a["attention_in_lesion"],
                      "gradcam_pointing_game": res["gradcam"]["pointing_game"]}))


if __name__ == "__main__":
    main()
