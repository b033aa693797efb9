"""Benchmark whole medetect detectors (training throughput, inference time) against the reference implementations.

Prints one JSON line per figure, each with ``bench``, ``device``, ``device_name``, ``threads``, ``amp``, ``impl``,
``ref_impl``, ``median_ms`` / ``ref_median_ms`` (per training step or per inference call), ``per_s`` /
``ref_per_s`` (images, patches or volumes per second), ``ratio`` (= ref_median_ms / median_ms: our speed-up, > 1
means medetect is faster; for training it is ours/theirs throughput), ``ours_over_ref`` (its inverse, the time
ratio), the losses of the last timed step on both sides (a sanity check that both ran a full forward + backward with
losses), and the issue's GPU reference and target. Reference fields are null when the reference is not importable.

Figures (both sides get the same synthetic images and targets, are timed in the same run, interleaved step by step
so that background load hits both alike):

* ``detector_2d_train`` / ``detector_2d_latency``: medetect Faster R-CNN ResNet-50-FPN vs torchvision
  ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=480, max_size=640)`` on
  480x640 RGB images with 10 random boxes each: SGD training steps (batch 8 on GPU, 2 on CPU; bf16 autocast on GPU)
  and batch-1 fp32 inference latency. ``min_size=480, max_size=640`` keeps torchvision's internal resize at scale 1,
  so both models see 480x640 (torchvision's default would upscale to 800 on the short side).
* ``detector_3d_train`` / ``detector_3d_volume``: medetect 3D RetinaNet ResNet-50 vs MONAI's RetinaNet in its LUNA16
  tutorial configuration (3D ResNet-50, conv1 stride (2,2,1), returned_layers [1,2], anchor shapes
  ((6,8,4),(8,6,5),(10,10,6)) x (1,2,4), ATSS matcher, hard-negative sampler, score 0.05, NMS 0.22, 100
  detections): SGD training steps on 192x192x80 patches (batch 4 on GPU, bf16 autocast) and whole-scan inference of a
  512x512x256 volume with 512x512x208 windows at 25% overlap (MONAI: its sliding-window inferer, stitching on the
  CPU as the tutorial does; medetect: ``Predictor`` with the same windows). MONAI sizes are x,y,z; medetect's
  array order is z,y,x, so every shape and box is reversed between the two.

``--small`` shrinks the 3D figures for a CPU run (patch 96x96x40, batch 1, volume 128x128x64 with 128x128x48
windows); ``--only 2d|3d`` runs half of them. Targets in the issue (GPU, H200): torchvision 96.5 train img/s (bf16,
batch 8) and 10.6 ms latency (fp32); MONAI 20.4 train patches/s and 1.17 s per volume (bf16); medetect should reach
>= 1.5x MONAI's training patches/s and <= 0.5 s per volume.

    python benchmarks/bench_detector.py [--device cpu|cuda] [--small] [--only 2d|3d] [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _timing
sys.path.insert(1, str(HERE.parent))  # medetect from this checkout when it is not installed

from _timing import default_device, synchronize, time_call  # noqa: E402

from medetect.convert import reverse_axes  # noqa: E402
from medetect.engine.predictor import Predictor  # noqa: E402
from medetect.models.detector import DetectorConfig, build_detector  # noqa: E402

# The issue's reference figures (one H200, see the module docstring).
ISSUE = {
    "detector_2d_train": {"ref_per_s": 96.5, "unit": "images/s", "hardware": "H200, bf16, batch 8"},
    "detector_2d_latency": {"ref_median_ms": 10.6, "hardware": "H200, fp32, batch 1"},
    "detector_3d_train": {"ref_per_s": 20.4, "unit": "patches/s", "hardware": "H200, bf16, batch 4", "target_ratio_min": 1.5},
    "detector_3d_volume": {"ref_median_ms": 1170.0, "hardware": "H200, bf16", "target_ms_max": 500.0},
}

# MONAI's LUNA16 tutorial (config_train_luna16_16g.json + luna16_training.py), in MONAI's x,y,z order.
LUNA_BASE_ANCHORS_XYZ = ((6, 8, 4), (8, 6, 5), (10, 10, 6))
LUNA_SCALES = (1, 2, 4)


# ----------------------------------------------------------------------------------------------------------- helpers
def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _interleaved(fns: dict, *, device, rounds: int, warmup: int) -> dict:
    """Median ms of each callable, timed alternately ``rounds`` times (after ``warmup`` untimed calls of each).

    Alternating keeps a changing background load (other processes on a shared CPU) from favouring one side. Returns
    ``{name: (median_ms, last_output)}``.
    """
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(max(0, warmup)):
        for k, fn in fns.items():
            outs[k] = fn()
    synchronize(device)
    for _ in range(rounds):
        for k, fn in fns.items():
            ms, outs[k] = time_call(fn, device=device, repeats=1, warmup=0)
            times[k].append(ms)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _record(bench, device, amp, *, impl, ms, per_item, ref_impl=None, ref_ms=None, losses=None, ref_losses=None, **extra):
    rec = {
        "bench": bench,
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "amp": "bf16" if amp else None,
        "impl": impl,
        "median_ms": round(ms, 2),
        "per_s": round(per_item * 1e3 / ms, 4),
        "ref_impl": ref_impl,
        "ref_median_ms": None if ref_ms is None else round(ref_ms, 2),
        "ref_per_s": None if ref_ms is None else round(per_item * 1e3 / ref_ms, 4),
        "ratio": None if ref_ms is None else round(ref_ms / ms, 4),
        "ours_over_ref": None if ref_ms is None else round(ms / ref_ms, 4),
    }
    rec.update(extra)
    if losses is not None:
        rec["losses"] = {k: round(float(v), 5) for k, v in losses.items()}
    if ref_losses is not None:
        rec["ref_losses"] = {k: round(float(v), 5) for k, v in ref_losses.items()}
    issue = ISSUE.get(bench, {})
    rec["issue"] = issue
    if device.type == "cuda":
        if "target_ratio_min" in issue and rec["ratio"] is not None:
            rec["target_met"] = rec["ratio"] >= issue["target_ratio_min"]
        if "target_ms_max" in issue:
            rec["target_met"] = ms <= issue["target_ms_max"]
    return rec


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- synthetic data
def random_boxes(n: int, shape, lo, hi, gen) -> torch.Tensor:
    """``n`` boxes ``[n, 2d]`` (array order) inside ``shape``, extents uniform in ``[lo, hi)`` per axis."""
    shape_t = torch.tensor(shape, dtype=torch.float32)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    size = lo_t + torch.rand(n, len(shape), generator=gen) * (hi_t - lo_t)
    start = torch.rand(n, len(shape), generator=gen) * (shape_t - size)
    return torch.cat([start, start + size], dim=-1)


# ---------------------------------------------------------------------------------------------------- 2D: torchvision
def config_2d(norm: str) -> DetectorConfig:
    return DetectorConfig(
        arch="faster_rcnn", ndim=2, in_channels=3, num_classes=3, backbone="resnet50", base_width=64, norm=norm,
        stem_stride=2, fpn_channels=256, levels=[2, 3, 4, 5], anchor_sizes=[[32], [64], [128], [256]],
        aspect_ratios=[0.5, 1.0, 2.0],
        # torchvision's defaults, which these already are in medetect: RPN 2000/2000 train, 1000/1000 test, NMS 0.7,
        # 256 anchors and 512 RoIs per image, 7x7 RoIAlign, 1024-wide box head, score 0.05, NMS 0.5, 100 detections.
    )


def bench_2d(device, *, amp, batch, steps, warmup, latency_repeats, norm, lr=1e-3):
    h, w, n_boxes, k = 480, 640, 10, 3
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, h, w, generator=gen).to(device)
    targets = [
        {"boxes": random_boxes(n_boxes, (h, w), (16, 16), (128, 128), gen).to(device),
         "labels": torch.randint(0, k, (n_boxes,), generator=gen).to(device)}
        for _ in range(batch)
    ]
    torch.manual_seed(0)
    ours = build_detector(config_2d(norm)).to(device).train()
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9)

    def ours_step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            losses = ours(images, targets)["losses"]
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        return {k_: v.detach() for k_, v in losses.items()}

    fns = {"ours": ours_step}
    ref = ref_impl = None
    try:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        ref = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=k + 1, min_size=h, max_size=w)
        ref = ref.to(device).train()
        ref_impl = "torchvision.models.detection.fasterrcnn_resnet50_fpn(min_size=480, max_size=640)"
        ref_norm = type(ref.backbone.body.bn1).__name__
    except ImportError:
        ref_norm = None
    if ref is not None:
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
        ref_images = list(images.unbind(0))
        # torchvision: boxes (x0, y0, x1, y1), labels 1..K (0 is background).
        ref_targets = [{"boxes": reverse_axes(t["boxes"]), "labels": t["labels"] + 1} for t in targets]

        def ref_step():
            ref_opt.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                losses = ref(ref_images, ref_targets)
                loss = sum(losses.values())
            loss.backward()
            ref_opt.step()
            return {k_: v.detach() for k_, v in losses.items()}

        fns["ref"] = ref_step
    res = _interleaved(fns, device=device, rounds=steps, warmup=warmup)
    common = {"image_shape": [h, w], "batch": batch, "boxes_per_image": n_boxes, "norm": norm, "ref_norm": ref_norm,
              "steps": steps}
    out = [_record(
        "detector_2d_train", device, amp, impl=f"medetect faster_rcnn resnet50-fpn (norm={norm})", ms=res["ours"][0],
        per_item=batch, ref_impl=ref_impl, ref_ms=res["ref"][0] if ref is not None else None,
        losses=res["ours"][1], ref_losses=res["ref"][1] if ref is not None else None, **common,
    )]

    # batch-1 fp32 inference latency, eval mode, the model's own pre/post-processing included on both sides.
    one = images[:1]
    ours.eval()
    fns = {"ours": lambda: ours(one)["detections"]}
    if ref is not None:
        ref.eval()
        fns["ref"] = lambda: ref([one[0]])
    with torch.no_grad():
        res = _interleaved(fns, device=device, rounds=latency_repeats, warmup=max(1, warmup))
    out.append(_record(
        "detector_2d_latency", device, False, impl=f"medetect faster_rcnn resnet50-fpn (norm={norm})",
        ms=res["ours"][0], per_item=1, ref_impl=ref_impl, ref_ms=res["ref"][0] if ref is not None else None,
        image_shape=[h, w], batch=1, repeats=latency_repeats, norm=norm, ref_norm=ref_norm,
        detections=int(res["ours"][1][0]["boxes"].shape[0]),
        ref_detections=int(res["ref"][1][0]["boxes"].shape[0]) if ref is not None else None,
    ))
    ours = ref = opt = fns = res = None  # free the models before the next benchmark
    _free(device)
    return out


# ----------------------------------------------------------------------------------------------------------- 3D: MONAI
def config_3d(norm: str) -> DetectorConfig:
    # MONAI's levels: layer1 (stride x,y,z 4,4,2), layer2 (8,8,4) and a max-pooled P4 (16,16,8); medetect's pyramid
    # has no pooled extra level, so its third level is c4, at the same stride. Anchors: MONAI's x,y,z shapes reversed.
    shapes = [[[s * c for c in reversed(b)] for b in LUNA_BASE_ANCHORS_XYZ] for s in LUNA_SCALES]
    return DetectorConfig(
        arch="retinanet", ndim=3, in_channels=1, num_classes=1, backbone="resnet50", base_width=64, norm=norm,
        stem_stride=[1, 2, 2], fpn_channels=256, levels=[2, 3, 4], anchor_shapes=shapes,
        score_thresh=0.05, nms_thresh=0.22, detections_per_img=100,
    )


def build_monai_retinanet(spatial_dims: int = 3):
    """MONAI's RetinaNetDetector as in the LUNA16 tutorial (network not TorchScript-compiled: see ``--monai-jit``)."""
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    returned_layers = [1, 2]
    conv1_t_stride = (2, 2, 1)
    anchor_generator = AnchorGeneratorWithAnchorShape(feature_map_scales=LUNA_SCALES, base_anchor_shapes=LUNA_BASE_ANCHORS_XYZ)
    backbone = resnet.resnet50(spatial_dims=spatial_dims, n_input_channels=1, conv1_t_stride=conv1_t_stride,
                               conv1_t_size=[max(7, 2 * s + 1) for s in conv1_t_stride])
    feature_extractor = resnet_fpn_feature_extractor(
        backbone=backbone, spatial_dims=spatial_dims, pretrained_backbone=False, trainable_backbone_layers=None,
        returned_layers=returned_layers,
    )
    size_divisible = [s * 2 * 2 ** max(returned_layers) for s in feature_extractor.body.conv1.stride]
    net = RetinaNet(spatial_dims=spatial_dims, num_classes=1, num_anchors=anchor_generator.num_anchors_per_location()[0],
                    feature_extractor=feature_extractor, size_divisible=size_divisible)
    return net, anchor_generator


def monai_detector(net, anchor_generator, val_patch_xyz):
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    det = RetinaNetDetector(network=net, anchor_generator=anchor_generator, debug=False)
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    det.set_box_selector_parameters(score_thresh=0.05, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=100)
    det.set_sliding_window_inferer(roi_size=val_patch_xyz, overlap=0.25, sw_batch_size=1, mode="constant", device="cpu")
    return det


def _to_xyz(vol: torch.Tensor) -> torch.Tensor:
    """``[..., C, Z, Y, X] -> [..., C, X, Y, Z]`` (medetect array order to MONAI's)."""
    n = vol.ndim
    return vol.permute(*range(n - 3), n - 1, n - 2, n - 3)


def bench_3d(device, *, amp, batch, patch_zyx, volume_zyx, tile_zyx, steps, warmup, volume_repeats, volume_warmup, norm,
             monai_jit=False, volume_score_thresh=None, lr=1e-3):
    gen = torch.Generator().manual_seed(1)
    n_boxes = 3
    patches = torch.rand(batch, 1, *patch_zyx, generator=gen).to(device)
    # nodule-like boxes: 6-30 voxels in x, y (0.7 mm), 4-16 in z (1.25 mm)
    targets = [
        {"boxes": random_boxes(n_boxes, patch_zyx, (4, 6, 6), (16, 30, 30), gen).to(device),
         "labels": torch.zeros(n_boxes, dtype=torch.long).to(device)}
        for _ in range(batch)
    ]
    torch.manual_seed(0)
    ours = build_detector(config_3d(norm)).to(device).train()
    opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9)

    def ours_step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            losses = ours(patches, targets)["losses"]
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        return {k: v.detach() for k, v in losses.items()}

    fns = {"ours": ours_step}
    ref = ref_impl = None
    val_patch_xyz = tuple(reversed(tile_zyx))
    try:
        net, anchor_generator = build_monai_retinanet()
        if monai_jit:
            net = torch.jit.script(net)
        ref = monai_detector(net, anchor_generator, val_patch_xyz).to(device).train()
        ref_impl = "monai.apps.detection RetinaNetDetector (LUNA16 tutorial config" + (", jit" if monai_jit else "") + ")"
    except ImportError:
        pass
    if ref is not None:
        ref_opt = torch.optim.SGD(ref.network.parameters(), lr=lr, momentum=0.9)
        ref_patches = list(_to_xyz(patches).unbind(0))
        ref_targets = [{"boxes": reverse_axes(t["boxes"]), "labels": t["labels"]} for t in targets]

        def ref_step():
            ref_opt.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                losses = ref(ref_patches, ref_targets)
                loss = losses[ref.cls_key] + losses[ref.box_reg_key]
            loss.backward()
            ref_opt.step()
            return {k: v.detach() for k, v in losses.items()}

        fns["ref"] = ref_step
    res = _interleaved(fns, device=device, rounds=steps, warmup=warmup)
    common = {"patch_zyx": list(patch_zyx), "ref_patch_xyz": list(reversed(patch_zyx)), "batch": batch,
              "boxes_per_patch": n_boxes, "norm": norm, "steps": steps}
    out = [_record(
        "detector_3d_train", device, amp, impl=f"medetect retinanet resnet50-fpn 3D (norm={norm})", ms=res["ours"][0],
        per_item=batch, ref_impl=ref_impl, ref_ms=res["ref"][0] if ref is not None else None,
        losses=res["ours"][1], ref_losses=res["ref"][1] if ref is not None else None, **common,
    )]
    res = fns = opt = patches = targets = None  # free the training state before the inference benchmark
    _free(device)

    # whole-scan inference: one volume, the same windows on both sides
    volume = torch.rand(1, *volume_zyx, generator=gen)
    if volume_score_thresh is not None:  # e.g. to give both sides the same post-processing load
        ours.heads.score_thresh = volume_score_thresh
        if ref is not None:
            ref.box_selector.score_thresh = volume_score_thresh
    pred = Predictor(ours, device=device, tile_size=tile_zyx, overlap=0.25, batch_size=1, nms_thresh=0.22,
                     size_divisor=16, autocast=amp)
    fns = {"ours": lambda: pred.predict(volume)}
    if ref is not None:
        ref.eval()
        ref_volume = _to_xyz(volume).to(device)

        def ref_infer():
            with _autocast(device, amp):
                return ref([ref_volume], use_inferer=True)

        fns["ref"] = ref_infer
    with torch.no_grad():
        res = _interleaved(fns, device=device, rounds=volume_repeats, warmup=volume_warmup)
    out.append(_record(
        "detector_3d_volume", device, amp, impl=f"medetect retinanet resnet50-fpn 3D + Predictor (norm={norm})",
        ms=res["ours"][0], per_item=1, ref_impl=None if ref is None else ref_impl + " + SlidingWindowInferer",
        ref_ms=res["ref"][0] if ref is not None else None,
        volume_zyx=list(volume_zyx), ref_volume_xyz=list(reversed(volume_zyx)), window_zyx=list(tile_zyx),
        ref_window_xyz=list(val_patch_xyz), overlap=0.25, repeats=volume_repeats, warmup=volume_warmup, norm=norm,
        score_thresh=0.05 if volume_score_thresh is None else volume_score_thresh,
        detections=int(res["ours"][1]["boxes"].shape[0]),
        ref_detections=int(res["ref"][1][0][ref.target_box_key].shape[0]) if ref is not None else None,
    ))
    ours = ref = pred = fns = res = None  # free the models before the next benchmark
    _free(device)
    return out


# --------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--only", choices=["2d", "3d", "all"], default="all")
    ap.add_argument("--small", action="store_true", help="small 3D sizes for a CPU run (see the module docstring)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast for training and 3D inference (auto: on for cuda, off for cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per side (default 20 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls per side before timing (default 3 GPU, 1 CPU; the CPU 3D volume figure: 0)")
    ap.add_argument("--repeats", type=int, default=None, help="timed inference calls per side (default 20 GPU, 5 CPU)")
    ap.add_argument("--batch-2d", type=int, default=None, help="training batch, 2D (default 8 GPU, 2 CPU)")
    ap.add_argument("--batch-3d", type=int, default=None, help="training batch, 3D (default 4; 1 with --small)")
    ap.add_argument("--norm-2d", default="batch", help="medetect norm, 2D (torchvision's untrained R50 uses BatchNorm)")
    ap.add_argument("--norm-3d", default="batch", help="medetect norm, 3D (MONAI: BatchNorm backbone, GroupNorm heads)")
    ap.add_argument("--volume-score-thresh", type=float, default=None,
                    help="score threshold of both sides for the 3D volume figure (default: the tutorial's 0.05)")
    ap.add_argument("--monai-jit", action="store_true", help="TorchScript MONAI's network as the tutorial does")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (both sides)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    amp = gpu if args.amp == "auto" else args.amp == "on"
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    repeats = args.repeats or (20 if gpu else 5)
    if args.only in ("2d", "all"):
        for rec in bench_2d(device, amp=amp, batch=args.batch_2d or (8 if gpu else 2), steps=steps, warmup=warmup,
                            latency_repeats=repeats, norm=args.norm_2d):
            print(json.dumps(rec), flush=True)
    if args.only in ("3d", "all"):
        if args.small:  # MONAI x,y,z: patch 96x96x40, volume 128x128x64, windows 128x128x48
            sizes = dict(patch_zyx=(40, 96, 96), volume_zyx=(64, 128, 128), tile_zyx=(48, 128, 128))
        else:  # the tutorial: patch 192x192x80, volume 512x512x256, windows (val_patch_size) 512x512x208
            sizes = dict(patch_zyx=(80, 192, 192), volume_zyx=(256, 512, 512), tile_zyx=(208, 512, 512))
        for rec in bench_3d(device, amp=amp, batch=args.batch_3d or (1 if args.small else 4), steps=steps,
                            warmup=warmup, volume_repeats=max(1, repeats // (1 if gpu else 5)),
                            volume_warmup=warmup if gpu else 0, norm=args.norm_3d,
                            volume_score_thresh=args.volume_score_thresh,
                            monai_jit=args.monai_jit, **sizes):
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
