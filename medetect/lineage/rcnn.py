"""Lineage step 4: R-CNN (Girshick et al., CVPR 2014) on selective-search proposals.

Training, as the paper (Sec. 2.3 and Appendix B, C), at CPU scale:

(a) selective-search proposals of every training image (:func:`medetect.lineage.proposals.proposals_for`, cached);
(b) fine-tune the CNN (:class:`medetect.models.rcnn.RCNN`, trained from scratch here: no ImageNet weights can be
    downloaded) as a K + 1 softmax classifier on warped regions: proposals with IoU >= ``fg_iou`` to a ground-truth box
    (and the ground-truth boxes) take its class, the rest are background; each step takes ``rois_per_image`` regions
    from each of ``batch_images`` images, a quarter of them positive (the paper: 32 positives + 96 background per
    128);
(c) fc7 and pool5 features of the ground-truth boxes and at most ``max_features_per_image`` proposals per training
    image, cached on disk (one ``.npz`` per image under ``runs/rcnn/features``, written atomically, reused when the
    fine-tuned weights are the same);
(d) per class, a linear SVM (scikit-learn ``LinearSVC``) with ground-truth boxes as positives and proposals of IoU
    < ``svm_neg_iou`` with every box of the class as negatives, trained with hard negative mining (start from random
    negatives, then add the negatives scoring above -1, for ``hard_negative_rounds`` rounds); per class a ridge
    regressor (scikit-learn ``Ridge``, the paper's lambda = 1000) of the box targets from pool5 features of the
    proposals with IoU >= ``reg_iou``. A class without training positives gets no SVM (a warning; ``has_svm`` False,
    recorded in the train record) and is never detected;
(e) ``out_dir/rcnn.safetensors`` (kind ``rcnn``) and the train record ``out_dir/rcnn.json``.

Inference (:func:`load_rcnn`): selective search -> warps in batches -> CNN -> SVM margins -> regressed boxes ->
per-class NMS (0.3) -> the best ``detections_per_img``. An image without proposals gives no detections.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..boxes import BoxCoder, box_iou
from ..files import write_text_atomically
from ..engine.trainer import TrainConfig, Trainer
from ..matching import NEGATIVE, sample_balanced
from ..models.io import Preprocess, load_model, save_model
from ..models.rcnn import RCNN, RCNNConfig, build_rcnn
from ..schema import check, option
from .data import MAX_VALUE, MEAN, STD, LineageSet, normalise
from .proposals import ProposalConfig, proposals_for, propose

__all__ = ["RCNNStepConfig", "RCNNMethod", "train_rcnn", "load_rcnn", "train_svm", "train_box_regressor",
           "FEATURE_NORM"]

FEATURE_NORM = 20.0  # the paper scales features to a mean L2 norm of 20 before the SVMs (rcnn's feature_stats)


@dataclass
class RCNNStepConfig:
    warp_size: int = option(64, doc="pixels per axis of a warped region (paper 227; 224 takes ~20 s per image on 2 "
                            "CPU cores, 64 about 1 s)", ge=32)
    context_padding: float = option(4.5, doc="context pixels around a box at the warp size (paper: 16 of 227, the "
                                    "same fraction as 4.5 of 64)", ge=0)
    base_width: int = option(32, doc="channels of the ResNet-18 trunk's first stage", ge=1)
    hidden: int = option(512, doc="width of fc6 / fc7 (paper: 4096)", ge=1)
    epochs: int = option(6, doc="fine-tuning epochs over the training images", ge=1)
    lr: float = option(1e-3, doc="fine-tuning peak learning rate (AdamW)", gt=0)
    batch_images: int = option(4, doc="images per fine-tuning step", ge=1)
    rois_per_image: int = option(32, doc="regions per image per step (4 x 32 = the paper's 128)", ge=1)
    positive_fraction: float = option(0.25, doc="share of positives in a step's regions (paper: 32 of 128)", ge=0,
                                      le=1)
    fg_iou: float = option(0.5, doc="fine-tuning: a proposal with IoU >= this to a box takes its class (paper 0.5)",
                           ge=0, le=1)
    max_features_per_image: int = option(128, doc="proposals per training image whose features are cached for the "
                                         "SVMs and regressors (besides the ground-truth boxes)", ge=1)
    svm_c: float = option(1e-3, doc="LinearSVC C (the paper's rcnn code: 1e-3 at feature norm 20)", gt=0)
    svm_positive_weight: float = option(2.0, doc="weight of positive examples in the SVM loss (rcnn code: 2)", gt=0)
    svm_neg_iou: float = option(0.3, doc="SVM negatives: proposals with IoU below this to every box of the class "
                                "(paper 0.3; positives are the ground-truth boxes)", ge=0, le=1)
    initial_negatives: int = option(4000, doc="random negatives of the first SVM round", ge=1)
    hard_negative_rounds: int = option(3, doc="rounds adding the negatives scoring above -1 (hard negative mining)",
                                       ge=0)
    hard_negatives_per_round: int = option(4000, doc="most negatives added per mining round (highest margin first)",
                                           ge=1)
    ridge_alpha: float = option(1000.0, doc="ridge regularisation of the box regressors (paper: lambda 1000)", ge=0)
    reg_iou: float = option(0.6, doc="box regressors learn from proposals with IoU >= this (paper 0.6)", ge=0, le=1)
    min_reg_examples: int = option(10, doc="a class with fewer regression examples keeps its boxes unregressed",
                                   ge=1)
    nms_thresh: float = option(0.3, doc="per-class NMS IoU at inference (paper 0.3)", ge=0, le=1)
    score_thresh: float = option(-1.0, doc="SVM margin below which a region is not a detection", ge=-1e6)
    detections_per_img: int = option(100, doc="detections kept per image", ge=1)
    seed: int = option(0, doc="seed of weights, region sampling and SVM negatives", ge=0)

    def validate(self, prefix: str = "rcnn") -> None:
        check(self, prefix)
        if 2 * self.context_padding >= self.warp_size:
            raise ValueError(f"{prefix}.context_padding must be < warp_size / 2 = {self.warp_size / 2}, got "
                             f"{self.context_padding}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- fine-tuning


class _RegionSet(torch.utils.data.Dataset):
    """One item per training image: its normalised image and a fresh sample of labelled regions (every epoch)."""

    def __init__(self, data: LineageSet, proposals: list[torch.Tensor], cfg: RCNNStepConfig):
        self.data, self.cfg, self.epoch = data, cfg, 0
        self.candidates, self.matches, self.labels = [], [], []
        for gt, gl, props in zip(data.boxes, data.labels, proposals):  # loop over images (once)
            cand = torch.cat([gt, props.float()])  # [G + N, 4]
            if len(gt):
                iou, j = box_iou(cand, gt).max(1)
                pos = iou >= cfg.fg_iou
                match = torch.where(pos, j, torch.full_like(j, NEGATIVE))
                lab = torch.where(pos, gl[j] + 1, torch.zeros_like(j))
            else:
                match = torch.full((len(cand),), NEGATIVE, dtype=torch.long)
                lab = torch.zeros(len(cand), dtype=torch.long)
            self.candidates.append(cand)
            self.matches.append(match)
            self.labels.append(lab)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed((self.cfg.seed * 1000003 + self.epoch) * 100003 + i)
        pos, neg = sample_balanced(self.matches[i], batch_size_per_image=self.cfg.rois_per_image,
                                   positive_fraction=self.cfg.positive_fraction, generator=g)
        sel = pos | neg
        return {"image": normalise(self.data.images[i]), "rois": self.candidates[i][sel],
                "roi_labels": self.labels[i][sel]}


# ---------------------------------------------------------------------------------------------- feature cache


def _weights_tag(model: RCNN, cfg: RCNNStepConfig) -> str:
    h = hashlib.sha1(json.dumps({"model": model.config.to_dict(), "max": cfg.max_features_per_image,
                                 "reg_iou": cfg.reg_iou, "seed": cfg.seed}, sort_keys=True).encode())
    for p in (model.fc7.weight, model.cls.weight):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _write_npz(file: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_features(model: RCNN, data: LineageSet, proposals: list[torch.Tensor], cfg: RCNNStepConfig,
                     folder: Path, device: torch.device, progress: bool) -> tuple[list[dict], int]:
    """Per training image ``{"boxes" [N, 4], "is_gt" [N], "fc7" [N, F], "pool5" [M, P], "pool5_rows" [M]}``:
    the ground-truth boxes, then at most ``max_features_per_image`` proposals (all of IoU >= ``reg_iou`` first, up
    to half the cap, then random others); pool5 is kept for the rows of IoU >= ``reg_iou`` only (the regressors'
    examples). Returns the records and how many images were read from the cache."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = _weights_tag(model, cfg)
    model.eval()
    out, hits = [], 0
    for i, (image, gt, props) in enumerate(zip(data.images, data.boxes, proposals)):  # loop over images
        file = folder / f"{Path(data.ids[i]).stem or f'image{i}'}.{tag}.npz"
        if file.is_file():
            try:
                with np.load(file) as z:
                    out.append({k: z[k] for k in ("boxes", "is_gt", "fc7", "pool5", "pool5_rows")})
                hits += 1
                continue
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
                pass
        g = torch.Generator().manual_seed(cfg.seed * 100003 + i)
        props = props.float()
        near = torch.zeros(len(props), dtype=torch.bool)
        if len(gt) and len(props):
            near = box_iou(props, gt).max(1).values >= cfg.reg_iou
        cap = cfg.max_features_per_image
        near_idx = near.nonzero().squeeze(1)
        near_idx = near_idx[torch.randperm(len(near_idx), generator=g)[: cap // 2]]
        far_idx = (~near).nonzero().squeeze(1)
        far_idx = far_idx[torch.randperm(len(far_idx), generator=g)[: cap - len(near_idx)]]
        boxes = torch.cat([gt, props[near_idx.sort().values], props[far_idx.sort().values]])  # [N, 4]
        fc7, pool5 = model.features(normalise(image).to(device), boxes.to(device))
        rows = torch.zeros(len(boxes), dtype=torch.bool)
        if len(gt):
            rows = box_iou(boxes, gt).max(1).values >= cfg.reg_iou
        rec = {"boxes": boxes.numpy().astype(np.float32), "is_gt": (torch.arange(len(boxes)) < len(gt)).numpy(),
               "fc7": fc7.cpu().numpy().astype(np.float16), "pool5": pool5[rows.to(device)].cpu().numpy().astype(np.float16),
               "pool5_rows": rows.nonzero().squeeze(1).numpy()}
        _write_npz(file, **rec)
        out.append(rec)
        if progress and (i + 1) % 25 == 0:
            print(f"R-CNN features: {i + 1}/{len(data)} images", flush=True)
    return out, hits


# ---------------------------------------------------------------------------------------------- SVMs and ridge


def train_svm(pos: np.ndarray, neg: np.ndarray, cfg: RCNNStepConfig, seed: int = 0) -> tuple[np.ndarray, float, dict]:
    """One class's linear SVM (``LinearSVC``) on already scaled features ``pos [P, F]``, ``neg [N, F]`` with hard
    negative mining: fit on ``initial_negatives`` random negatives, then up to ``hard_negative_rounds`` times add the
    negatives (highest margin first, at most ``hard_negatives_per_round``) that score above -1 and refit; stops
    early when none is left. Returns ``(weight [F], bias, info)``."""
    from sklearn.svm import LinearSVC

    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"an SVM needs positives and negatives, got {len(pos)} and {len(neg)}")
    rng = np.random.default_rng(seed)
    active = np.zeros(len(neg), bool)
    active[rng.permutation(len(neg))[: cfg.initial_negatives]] = True
    info = {"positives": int(len(pos)), "negatives_available": int(len(neg)), "rounds": 0}

    def fit() -> LinearSVC:
        x = np.concatenate([pos, neg[active]])
        y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(int(active.sum()), np.int64)])
        svc = LinearSVC(C=cfg.svm_c, class_weight={1: cfg.svm_positive_weight, 0: 1.0}, intercept_scaling=10.0,
                        max_iter=5000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear's convergence note: the mining rounds refit anyway
            svc.fit(x, y)
        return svc

    svc = fit()
    for _ in range(cfg.hard_negative_rounds):
        margin = neg @ svc.coef_[0] + svc.intercept_[0]  # [N] every negative, at once
        hard = np.nonzero((margin > -1.0) & ~active)[0]
        if len(hard) == 0:
            break
        active[hard[np.argsort(-margin[hard], kind="stable")[: cfg.hard_negatives_per_round]]] = True
        svc = fit()
        info["rounds"] += 1
    margin_pos = pos @ svc.coef_[0] + svc.intercept_[0]
    margin_neg = neg @ svc.coef_[0] + svc.intercept_[0]
    info.update(negatives_used=int(active.sum()), train_pos_acc=float((margin_pos > 0).mean()),
                train_neg_acc=float((margin_neg < 0).mean()))
    return svc.coef_[0].astype(np.float32), float(svc.intercept_[0]), info


def train_box_regressor(x: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of box targets ``[M, 2d]`` from features ``x [M, P]``: ``(weight [2d, P], bias [2d])``."""
    from sklearn.linear_model import Ridge

    r = Ridge(alpha=alpha).fit(x, targets)
    return r.coef_.astype(np.float32).reshape(targets.shape[1], -1), np.asarray(r.intercept_, np.float32).reshape(-1)


def _norm_scale(x: np.ndarray) -> float:
    n = float(np.linalg.norm(x.astype(np.float32), axis=1).mean()) if len(x) else 0.0
    return FEATURE_NORM / n if n > 0 else 1.0


def _fit_classifiers(model: RCNN, data: LineageSet, feats: list[dict], cfg: RCNNStepConfig,
                     progress: bool) -> dict:
    """Train the per-class SVMs and ridge regressors on the cached features and store them in ``model``'s buffers
    (feature scales folded into the weights). Returns the per-class record."""
    k_all = len(data.class_names)
    fc7 = np.concatenate([f["fc7"] for f in feats]).astype(np.float32)  # [N, F]
    is_gt = np.concatenate([f["is_gt"] for f in feats])
    # per row: its best IoU with the boxes of each class [N, K], and its best-matching box + that box's class
    iou_k, match_box, match_iou, match_cls, p5, p5_owner = [], [], [], [], [], []
    for f, gt, gl in zip(feats, data.boxes, data.labels):  # loop over images
        b = torch.from_numpy(f["boxes"])
        per = torch.zeros(len(b), k_all)
        if len(gt):
            iou = box_iou(b, gt)  # [N_i, G]
            per = torch.stack([torch.where(gl[None] == k, iou, torch.zeros_like(iou)).max(1).values
                               for k in range(k_all)], 1)  # loop over the K classes
            mi, mj = iou.max(1)
            rows = torch.from_numpy(f["pool5_rows"]).long()
            match_box.append(gt[mj[rows]])
            match_iou.append(mi[rows])
            match_cls.append(gl[mj[rows]])
            p5.append(f["pool5"].astype(np.float32))
            p5_owner.append(b[rows])
        iou_k.append(per)
    iou_k = torch.cat(iou_k).numpy()  # [N, K]
    s_fc7 = _norm_scale(fc7)
    x = fc7 * s_fc7
    record = {"fc7_scale": s_fc7, "classes": {}}
    with torch.no_grad():
        model.svm_weight.zero_()
        model.svm_bias.zero_()
        model.reg_weight.zero_()
        model.reg_bias.zero_()
        model.has_svm.zero_()
    labels_all = np.concatenate([lab.numpy() for lab in data.labels]) if data.labels else np.zeros(0, np.int64)
    gt_rows = np.nonzero(is_gt)[0]
    pos_cls = labels_all  # the ground-truth rows come in the same order as data.labels (per image, first)
    if len(gt_rows) != len(pos_cls):
        raise RuntimeError("internal: feature rows of the ground-truth boxes do not match the labels")
    if p5:
        P5 = np.concatenate(p5)
        s_p5 = _norm_scale(P5)
        P5 = P5 * s_p5
        owner = torch.cat(p5_owner)
        targets = BoxCoder().encode(torch.cat(match_box).float(), owner.float()).numpy()
        mcls = torch.cat(match_cls).numpy()
        miou = torch.cat(match_iou).numpy()
    else:
        P5, s_p5, targets, mcls, miou = np.zeros((0, model.pool5_dim), np.float32), 1.0, np.zeros((0, 4)), \
            np.zeros(0, np.int64), np.zeros(0)
    record["pool5_scale"] = s_p5
    for k, name in enumerate(data.class_names):  # loop over the K classes
        t0 = time.perf_counter()
        rec: dict = {"positives": int((pos_cls == k).sum())}
        pos = x[gt_rows[pos_cls == k]]
        neg = x[iou_k[:, k] < cfg.svm_neg_iou]
        if len(pos) == 0:
            msg = f"R-CNN: class {name!r} has no training positives: no SVM, it will never be detected"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            rec.update(has_svm=False, note="no training positives: no SVM")
        elif len(neg) == 0:
            msg = f"R-CNN: class {name!r} has no negatives (IoU < {cfg.svm_neg_iou}): no SVM"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            rec.update(has_svm=False, note="no negatives: no SVM")
        else:
            w, b, info = train_svm(pos, neg, cfg, seed=cfg.seed + k)
            with torch.no_grad():
                model.svm_weight[k] = torch.from_numpy(w * s_fc7)
                model.svm_bias[k] = b
                model.has_svm[k] = True
            rec.update(has_svm=True, **info)
        sel = (mcls == k) & (miou >= cfg.reg_iou)
        rec["regression_examples"] = int(sel.sum())
        if sel.sum() >= cfg.min_reg_examples:
            rw, rb = train_box_regressor(P5[sel], targets[sel], cfg.ridge_alpha)
            with torch.no_grad():
                model.reg_weight[k] = torch.from_numpy(rw * s_p5)
                model.reg_bias[k] = torch.from_numpy(rb)
            rec["regressor"] = True
        else:
            rec["regressor"] = False
            if rec["positives"]:
                warnings.warn(f"R-CNN: class {name!r} has {int(sel.sum())} regression examples (< "
                              f"{cfg.min_reg_examples}): its boxes are not regressed", RuntimeWarning, stacklevel=2)
        rec["seconds"] = time.perf_counter() - t0
        record["classes"][name] = rec
        if progress:
            print(f"R-CNN class {name}: {json.dumps(rec)}", flush=True)
    return record


# ---------------------------------------------------------------------------------------------- the step


def lineage_preprocess(data: LineageSet) -> Preprocess:
    """The lineage's input rule as a stored :class:`Preprocess` (scale of the data, ``(x / 255 - 0.5) / 0.25``)."""
    c = int(data.images[0].shape[0]) if len(data) else 3
    return Preprocess(ndim=2, channels=c, scale=float(data.scale), max_value=MAX_VALUE, mean=[MEAN], std=[STD],
                      bit_depth=8, value_range=[0.0, 255.0])


def train_rcnn(train: LineageSet, val: LineageSet | None, cfg: RCNNStepConfig | None = None,
               out_dir: str | os.PathLike = "lineage-out", *, proposals: ProposalConfig | None = None,
               resume: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """Train R-CNN on ``train`` (steps (a)-(e) of the module doc) with the selective-search settings ``proposals``
    (default :class:`ProposalConfig`); ``val`` is not used in training (the lineage evaluates every row on it
    afterwards). Returns ``{"weights", "train_seconds", "record"}``."""
    cfg = cfg or RCNNStepConfig()
    proposals = proposals or ProposalConfig()
    cfg.validate("rcnn")
    if len(train) == 0:
        raise ValueError("R-CNN: the training set is empty")
    out = Path(out_dir)
    run = out / "runs" / "rcnn"
    t_start = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    # (a) proposals
    t0 = time.perf_counter()
    props = proposals_for(train, proposals, out / "cache" / "ss", progress=progress)
    t_ss = time.perf_counter() - t0
    empty = sum(len(p) == 0 for p in props)
    if empty:
        warnings.warn(f"R-CNN: selective search found no region in {empty} of {len(train)} training images (their "
                      "ground-truth boxes are still used)", RuntimeWarning, stacklevel=2)
    # (b) fine-tuning
    model = build_rcnn(RCNNConfig(in_channels=int(train.images[0].shape[0]), num_classes=len(train.class_names),
                                  class_names=list(train.class_names), base_width=cfg.base_width,
                                  warp_size=cfg.warp_size, context_padding=cfg.context_padding, hidden=cfg.hidden,
                                  score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                                  detections_per_img=cfg.detections_per_img))
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_images, lr=cfg.lr, optimizer="adamw",
                       warmup_iters=50, schedule="cosine", num_workers=0, val_every=0, seed=cfg.seed, log_every=10,
                       amp="auto")
    t0 = time.perf_counter()
    trainer = Trainer(model=model, train_data=_RegionSet(train, props, cfg), config=tcfg, run_dir=run,
                      run_config={"rcnn": cfg.to_dict(), "data": train.spec}, device=dev, progress=progress,
                      best_metric=None)
    if resume:
        trainer.resume()
    trainer.fit()
    t_ft = time.perf_counter() - t0
    model = trainer.model.eval()
    # (c) features
    t0 = time.perf_counter()
    feats, hits = _cached_features(model, train, props, cfg, run / "features", dev, progress)
    t_feat = time.perf_counter() - t0
    # (d) SVMs and regressors
    t0 = time.perf_counter()
    classes = _fit_classifiers(model, train, feats, cfg, progress)
    t_svm = time.perf_counter() - t0
    # (e) the model file and the record
    train_seconds = time.perf_counter() - t_start
    weights = save_model(model.cpu(), out / "rcnn.safetensors", kind="rcnn", preprocess=lineage_preprocess(train),
                         classes=list(train.class_names),
                         extra={"step": "rcnn", "data": train.spec, "epochs": cfg.epochs,
                                "has_svm": [bool(v) for v in model.has_svm.tolist()]})
    record = {
        "step": "rcnn", "train_seconds": train_seconds,
        "seconds": {"selective_search": t_ss, "fine_tune": t_ft, "features": t_feat, "svm_ridge": t_svm},
        "config": cfg.to_dict(), "model_config": model.config.to_dict(), "proposals": proposals.to_dict(),
        "data": train.spec, "scale": train.scale, "train_images": len(train), "train_objects": train.num_objects,
        "images_without_proposals": int(empty), "feature_rows": int(sum(len(f["boxes"]) for f in feats)),
        "feature_cache_hits": hits, "svm_ridge": classes, "fine_tune_history": trainer.history,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(dev), "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomically(out / "rcnn.json", json.dumps(record, indent=1, default=float))
    return {"weights": weights, "train_seconds": train_seconds, "record": record}


class RCNNMethod:
    """A loaded R-CNN as a lineage row: ``detect(image)`` on one raw ``[C, H, W]`` image at the lineage's scale."""

    name = "R-CNN"

    def __init__(self, model: RCNN, proposals: ProposalConfig | None = None, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.proposals = proposals or ProposalConfig()
        self.device = torch.device(device)

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        props = propose(image, self.proposals)
        t_prop = time.perf_counter() - t0
        det = self.model.detect(normalise(image).to(self.device), props.to(self.device))
        out = {k: det[k].cpu() for k in ("boxes", "scores", "labels")}
        out.update(num_proposals=int(len(props)), proposal_seconds=t_prop)
        return out


def load_rcnn(path: str | os.PathLike, proposals: ProposalConfig | None = None,
              device: str | torch.device = "cpu") -> RCNNMethod:
    """``rcnn.safetensors`` -> a ready :class:`RCNNMethod` (``name = "R-CNN"``) using ``proposals`` (default: the
    lineage's :class:`ProposalConfig`)."""
    loaded = load_model(path, device=device)
    if loaded.kind != "rcnn":
        raise ValueError(f"{path}: a {loaded.kind!r} model file, not an R-CNN (kind 'rcnn')")
    return RCNNMethod(loaded.model, proposals, device)
