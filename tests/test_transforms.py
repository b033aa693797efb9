"""Tests for medetect.data.transforms, every one in 2D and 3D.

Geometric consistency is checked by RASTERISING each box into its own image channel (voxel ``i`` is inside a box when
its centre ``i + 0.5`` is in ``[lo, hi)``), transforming the image, and recomputing the bounding box of each channel:
it must equal the transformed box (exactly for flips, rot90, crop and pad; exactly for nearest and integer-factor
resampling; within one voxel for linear resampling at arbitrary ratios).
"""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F

from medetect.data import transforms as T

SHAPES = {2: (13, 17), 3: (9, 11, 13)}  # non-square so that axis mix-ups show
ANISO = {2: (2.5, 0.7), 3: (2.5, 0.7, 0.7)}


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def d(request) -> int:
    return request.param


# --------------------------------------------------------------------------------------------------------------------
# helpers (vectorised over boxes)
# --------------------------------------------------------------------------------------------------------------------


def rasterize(boxes: torch.Tensor, shape) -> torch.Tensor:
    """``[N, *shape]`` masks: voxel in box iff its centre lies in [lo, hi)."""
    d = len(shape)
    mask = torch.ones((boxes.shape[0],) + (1,) * d)
    for a, n in enumerate(shape):
        c = torch.arange(n, dtype=torch.float64) + 0.5
        inside = (c >= boxes[:, a, None].double()) & (c < boxes[:, a + d, None].double())  # [N, n]
        view = [boxes.shape[0]] + [1] * d
        view[a + 1] = n
        mask = mask * inside.view(view).float()
    return mask


def mask_bbox(mask: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    """Bounding boxes ``[N, 2d]`` (edge units) of ``mask >= thr`` per channel (channels must be non-empty)."""
    d = mask.dim() - 1
    on = mask >= thr
    lo, hi = [], []
    for a in range(d):
        other = [i + 1 for i in range(d) if i != a]
        proj = on.any(dim=other) if other else on  # [N, n_a]
        n = proj.shape[1]
        lo.append(proj.float().argmax(1))
        hi.append(n - proj.flip(1).float().argmax(1))
    return torch.stack(lo + hi, dim=1).float()


def random_boxes(shape, n: int, seed: int, min_size: int = 1, align: int = 1, max_size: int = 10**6) -> torch.Tensor:
    """Integer boxes inside ``shape`` with min_size <= extent (<= max_size), corners multiples of ``align``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([s // align for s in shape])  # number of aligned cells per axis
    m = min_size // align + (min_size % align > 0)
    lo = (torch.rand(n, len(shape), generator=g) * (grid - m + 1)).floor().long()
    top = torch.clamp(grid - lo, max=max(max_size // align, m))
    ext = m + (torch.rand(n, len(shape), generator=g) * (top - m + 1)).floor().long()
    return (torch.cat([lo, lo + ext], 1) * align).float()


def make_sample(d: int, n: int = 5, seed: int = 0, shape=None, spacing=None, **kw) -> dict:
    shape = shape or SHAPES[d]
    boxes = random_boxes(shape, n, seed, **kw)
    g = torch.Generator().manual_seed(seed + 1000)
    image = torch.cat([torch.rand((1,) + tuple(shape), generator=g), rasterize(boxes, shape)])
    return {
        "image": image,
        "boxes": boxes,
        "labels": torch.arange(n) % 3 + 1,
        "spacing": tuple(spacing) if spacing is not None else (1.0,) * d,
        "meta": {"id": "case-1"},
    }


def assert_masks_match(out: dict, exact: bool = True, tol: float = 1.0, thr: float = 0.5) -> None:
    """The bounding box of each box's mask channel equals (or is within tol of) the transformed box."""
    masks = out["image"][1:]
    if "box_ids" in out:
        masks = masks[out["box_ids"]]
    if out["boxes"].shape[0] == 0:
        return
    got = mask_bbox(masks, thr)
    if exact:
        torch.testing.assert_close(got, out["boxes"].float(), atol=0, rtol=0)
    else:
        assert (got - out["boxes"]).abs().max() <= tol, (got, out["boxes"])


def centre_bbox(boxes: torch.Tensor) -> torch.Tensor:
    """Bounding box of the centre-rule rasterisation of (possibly fractional) boxes."""
    return torch.ceil(boxes.double() - 0.5).float()


def same(a: dict, b: dict) -> None:
    assert a["image"].shape == b["image"].shape
    torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=0, rtol=0)
    assert torch.equal(a["labels"], b["labels"])


# --------------------------------------------------------------------------------------------------------------------
# flips and rot90
# --------------------------------------------------------------------------------------------------------------------


def all_axis_subsets(d):
    return [c for r in range(d + 1) for c in itertools.combinations(range(d), r)]


def test_flip_twice_is_identity_and_consistent(d):
    s = make_sample(d)
    for axes in all_axis_subsets(d) + [(-1,)]:
        f = T.flip(s, axes)
        assert_masks_match(f)
        same(T.flip(f, axes), s)
        assert f["meta"] is s["meta"] and f["spacing"] == s["spacing"]


def test_flip_formula(d):
    s = make_sample(d, n=3)
    n = torch.tensor(SHAPES[d], dtype=torch.float32)
    f = T.flip(s, tuple(range(d)))
    torch.testing.assert_close(f["boxes"][:, :d], n - s["boxes"][:, d:])
    torch.testing.assert_close(f["boxes"][:, d:], n - s["boxes"][:, :d])


def test_rot90_identities_and_consistency(d):
    s = make_sample(d, spacing=ANISO[d])
    for axes in itertools.permutations(range(d), 2):
        for k in range(-1, 5):
            r = T.rot90(s, k, axes)
            assert_masks_match(r)
            assert r["image"].shape == torch.rot90(s["image"], k, [a + 1 for a in axes]).shape
            sp = list(s["spacing"])
            if k % 2:
                sp[axes[0]], sp[axes[1]] = sp[axes[1]], sp[axes[0]]
            assert r["spacing"] == tuple(sp)
            same(T.rot90(r, -k, axes), s)  # rot then -rot
            same(T.rot90(r, k, axes[::-1]), s)  # reversing the plane undoes the rotation
        four = s
        for _ in range(4):
            four = T.rot90(four, 1, axes)
        same(four, s)
        assert four["spacing"] == s["spacing"]


def test_rot90_matches_numpy_semantics(d):
    # one quarter turn in (a, b): point (p_a, p_b) -> (n_b - p_b, p_a)
    s = make_sample(d, n=3)
    a, b = d - 2, d - 1
    r = T.rot90(s, 1, (a, b))
    n_b = SHAPES[d][b]
    torch.testing.assert_close(r["boxes"][:, a], n_b - s["boxes"][:, b + d])
    torch.testing.assert_close(r["boxes"][:, b + d], s["boxes"][:, a + d])


# --------------------------------------------------------------------------------------------------------------------
# crop, pad and the visibility rule
# --------------------------------------------------------------------------------------------------------------------


def test_crop_consistent_with_masks(d):
    s = make_sample(d, n=8)
    shape = SHAPES[d]
    for lo, size in [((0,) * d, shape), ((2,) * d, (5,) * d), ((-3,) * d, (8,) * d),
                     (tuple(n - 4 for n in shape), (7,) * d), ((-2,) + (3,) * (d - 1), (20,) * d)]:
        c = T.crop(s, lo, size, min_visibility=0.0, min_size=0.0, pad_value=-7.0)
        assert tuple(c["image"].shape[1:]) == tuple(size)
        assert_masks_match(c)
        # exactly the boxes with at least one voxel in the window survive
        visible = T.crop(s, lo, size, min_visibility=0.0, min_size=0.0)["image"][1:].flatten(1).amax(1) > 0
        assert torch.equal(torch.sort(c["box_ids"]).values, torch.nonzero(visible).flatten())
        assert set(c["box_ids"].tolist()) | set(c["dropped_box_ids"].tolist()) == set(range(8))
        assert torch.equal(c["labels"], s["labels"][c["box_ids"]])
        # padding value where the window leaves the image
        if min(lo) < 0:
            assert c["image"][(slice(None),) + (0,) * d].eq(-7.0).all()


def test_pad_and_pad_to(d):
    s = make_sample(d)
    before, after = tuple(range(1, d + 1)), tuple(range(2, d + 2))
    p = T.pad(s, before, after, value=-1.0)
    assert tuple(p["image"].shape[1:]) == tuple(n + b + a for n, b, a in zip(SHAPES[d], before, after))
    assert_masks_match(p)
    assert "dropped_box_ids" not in p
    same(T.crop(p, before, SHAPES[d], min_visibility=1.0), s)
    q = T.pad_to(s, 12)
    assert tuple(q["image"].shape[1:]) == tuple(max(n, 12) for n in SHAPES[d])
    assert_masks_match(q)
    e = T.pad_to(s, 20, center=False, value="min")
    assert torch.equal(e["boxes"], s["boxes"])
    assert e["image"].amin() == s["image"].amin()


def test_crop_or_pad(d):
    s = make_sample(d, n=6)
    out = T.CropOrPad(size=10, min_visibility=0.0, min_size=0.0)(s)
    assert tuple(out["image"].shape[1:]) == (10,) * d
    assert_masks_match(out)
    # origin is (n - size) // 2 per axis
    lo = [(n - 10) // 2 for n in SHAPES[d]]
    same(out, T.crop(s, lo, 10, min_visibility=0.0, min_size=0.0))


def _one_box_sample(d, box, shape=(20,)):
    shape = tuple(shape) * d if len(shape) == 1 else shape
    boxes = torch.tensor([box], dtype=torch.float32)
    return {"image": torch.cat([torch.zeros((1,) + shape), rasterize(boxes, shape)]), "boxes": boxes,
            "labels": torch.tensor([1]), "box_ids": torch.tensor([42])}


def test_visibility_rule_half_outside(d):
    # box [3, 7) on axis 0 (inside elsewhere); crop from 5 on axis 0 keeps exactly half of it
    box = [3.0] + [2.0] * (d - 1) + [7.0] + [6.0] * (d - 1)
    s = _one_box_sample(d, box)
    lo, size = (5,) + (0,) * (d - 1), (10,) * d
    kept = T.crop(s, lo, size, min_visibility=0.5)
    assert kept["boxes"].shape == (1, 2 * d) and kept["box_ids"].tolist() == [42]
    assert kept["boxes"][0].tolist() == [0.0] + [2.0] * (d - 1) + [2.0] + [6.0] * (d - 1)
    assert kept["dropped_box_ids"].numel() == 0
    dropped = T.crop(s, lo, size, min_visibility=0.6)
    assert dropped["boxes"].shape == (0, 2 * d) and dropped["labels"].shape == (0,)
    assert dropped["dropped_box_ids"].tolist() == [42]
    # default threshold is 0.5
    assert T.crop(s, lo, size)["box_ids"].tolist() == [42]


def test_visibility_min_size(d):
    # a sliver of 0.5 voxel left in the window: dropped by min_size=1 even with min_visibility=0
    box = [4.5] + [2.0] * (d - 1) + [10.0] + [6.0] * (d - 1)
    s = _one_box_sample(d, box)
    lo, size = (0,) * d, (5,) + (10,) * (d - 1)
    assert T.crop(s, lo, size, min_visibility=0.0, min_size=1.0)["boxes"].shape[0] == 0
    assert T.crop(s, lo, size, min_visibility=0.0, min_size=0.5)["boxes"].shape[0] == 1
    # a fully visible box thinner than min_size is never dropped by min_size
    thin = _one_box_sample(d, [4.0] + [2.0] * (d - 1) + [4.5] + [6.0] * (d - 1))
    assert T.crop(thin, lo, size, min_size=1.0)["boxes"].shape[0] == 1
    # a box entirely outside is dropped even with min_visibility=0
    far = _one_box_sample(d, [12.0] * d + [14.0] * d)
    assert T.crop(far, lo, size, min_visibility=0.0, min_size=0.0)["dropped_box_ids"].tolist() == [42]


def test_dropped_ids_accumulate_and_created(d):
    s = make_sample(d, n=6)
    c1 = T.crop(s, (0,) * d, (6,) * d)
    assert "box_ids" not in s  # input not modified
    assert set(c1["box_ids"].tolist()) | set(c1["dropped_box_ids"].tolist()) == set(range(6))
    c2 = T.crop(c1, (3,) * d, (3,) * d)
    assert set(c2["box_ids"].tolist()) | set(c2["dropped_box_ids"].tolist()) == set(range(6))
    assert set(c1["dropped_box_ids"].tolist()) <= set(c2["dropped_box_ids"].tolist())


# --------------------------------------------------------------------------------------------------------------------
# positive-aware random crop
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_prob", [0.0, 0.3, 0.7])
def test_positive_crop_probability(d, pos_prob):
    shape = {2: (64, 64), 3: (32, 36, 40)}[d]
    box = torch.tensor([[15.0] * d + [17.0] * d])
    s = {"image": torch.zeros((1,) + shape), "boxes": box, "labels": torch.tensor([1])}
    t = T.RandomCrop(size=6, pos_prob=pos_prob)
    g = torch.Generator().manual_seed(7)
    draws = 400
    hits = sum(int(t(s, g)["boxes"].shape[0] > 0) for _ in range(draws))
    # uniform crops hit the box with probability ~ (7 / (n - 5)) ** d (< 6 %), positive crops always
    assert pos_prob - 0.08 <= hits / draws <= pos_prob + 0.08 + 0.06 * (1 - pos_prob)


def test_positive_crop_contains_whole_box_or_centre(d):
    s = make_sample(d, n=4, shape=(24,) * d, min_size=2, max_size=8)
    g = torch.Generator().manual_seed(3)
    t = T.RandomCrop(size=8, pos_prob=1.0)
    for _ in range(30):
        out = t(s, g)
        assert tuple(out["image"].shape[1:]) == (8,) * d and out["boxes"].shape[0] >= 1
        assert_masks_match(out)
        # at least one box is whole (visibility 1): its extent is unchanged
        ext = out["boxes"][:, d:] - out["boxes"][:, :d]
        orig = s["boxes"][out["box_ids"]]
        assert (ext == orig[:, d:] - orig[:, :d]).all(1).any()
    # a box larger than the patch: its centre is always inside the window
    big = {"image": torch.zeros((1,) + (30,) * d), "boxes": torch.tensor([[2.0] * d + [23.0] * d])}
    for _ in range(30):
        lo = torch.tensor(t.sample_origin(big, g))
        assert ((lo <= 12.5) & (12.5 < lo + 8)).all() and (lo >= 0).all() and (lo <= 22).all()


def test_random_crop_uniform_and_small_image(d):
    s = make_sample(d, n=3)
    g = torch.Generator().manual_seed(0)
    t = T.RandomCrop(size=20, pos_prob=0.0)  # larger than the image: padded, nothing dropped
    for _ in range(5):
        out = t(s, g)
        assert tuple(out["image"].shape[1:]) == (20,) * d
        assert out["boxes"].shape[0] == 3 and out["dropped_box_ids"].numel() == 0
        assert_masks_match(out)
    u = T.RandomCrop(size=5, pos_prob=0.0)
    origins = torch.tensor([u.sample_origin(s, g) for _ in range(200)])
    assert (origins >= 0).all() and (origins <= torch.tensor(SHAPES[d]) - 5).all()
    assert (origins.amin(0) == 0).all()  # the whole range is reachable


# --------------------------------------------------------------------------------------------------------------------
# resampling and zoom
# --------------------------------------------------------------------------------------------------------------------


def test_resample_nearest_exact(d):
    for old, new in [(1.0, 0.7), (1.0, 1.6), (0.7, 1.0), (2.5, 1.0)]:
        s = make_sample(d, n=6, spacing=(old,) * d, min_size=3)
        r = T.resample(s, new, mode="nearest")
        assert r["spacing"] == (new,) * d
        shape = tuple(max(1, int(n * old / new + 0.5)) for n in SHAPES[d])
        assert tuple(r["image"].shape[1:]) == shape
        upper = torch.tensor(shape * 2, dtype=torch.float32)
        torch.testing.assert_close(r["boxes"], torch.minimum(s["boxes"] * (old / new), upper))
        # boxes that touch the image end are excluded: when the rounded grid reaches past the input, the last
        # output voxel replicates the border voxel (interpolate's clamping), so the mask may gain that voxel
        interior = (s["boxes"][:, d:] < torch.tensor(SHAPES[d])).all(1)
        got = mask_bbox(r["image"][1:][interior])
        torch.testing.assert_close(got, centre_bbox(r["boxes"][interior]), atol=0, rtol=0)


def test_resample_linear_within_one_voxel(d):
    for old, new in [(1.0, 0.7), (1.0, 1.3), (0.8, 0.5)]:
        s = make_sample(d, n=6, spacing=(old,) * d, min_size=3)
        r = T.resample(s, new, mode="linear")
        assert_masks_match(r, exact=False, tol=1.0)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resample_integer_factors_exact(d, mode):
    for old, new, align in [(1.0, 0.5, 1), (3.0, 1.0, 1), (1.0, 2.0, 2), (1.0, 3.0, 3)]:
        # extent >= 2: with linear upsampling a 1-voxel extent peaks at 0.75 on its axis, and the product of such
        # weights over several axes can fall below the 0.5 threshold at a corner
        s = make_sample(d, n=6, spacing=(old,) * d, shape=(12, 15, 18)[:d], min_size=max(align, 2), align=align)
        r = T.resample(s, new, mode=mode)
        torch.testing.assert_close(r["boxes"], s["boxes"] * (old / new), atol=0, rtol=0)
        assert_masks_match(r, exact=True)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resample_matches_interpolate_align_corners_false(d, mode):
    x = torch.rand((2,) + SHAPES[d], generator=torch.Generator().manual_seed(1))
    torch_mode = "nearest-exact" if mode == "nearest" else {1: "linear", 2: "bilinear", 3: "trilinear"}[d]
    for z in [2.0, 0.5, 1.25, 0.75]:
        out = T.scale({"image": x}, z, mode=mode)["image"]
        ref = F.interpolate(x[None], scale_factor=z, mode=torch_mode, recompute_scale_factor=False,
                            **({} if mode == "nearest" else {"align_corners": False}))[0]
        common = (slice(None),) + tuple(slice(0, m) for m in ref.shape[1:])
        torch.testing.assert_close(out[common], ref, atol=1e-5, rtol=1e-5)


def test_resample_anisotropic(d):
    s = make_sample(d, n=5, spacing=ANISO[d], min_size=2)
    r = T.Resample(target_spacing=1.0)(s)
    assert r["spacing"] == (1.0,) * d
    shape = tuple(int(n * sp + 0.5) for n, sp in zip(SHAPES[d], ANISO[d]))
    assert tuple(r["image"].shape[1:]) == shape
    f = torch.tensor(ANISO[d] * 2)
    upper = torch.tensor(shape * 2, dtype=torch.float32)
    torch.testing.assert_close(r["boxes"], torch.minimum(s["boxes"] * f, upper))
    assert_masks_match(r, exact=False, tol=1.0)
    # physical (mm) box sizes are preserved
    mm_before = (s["boxes"][:, d:] - s["boxes"][:, :d]) * torch.tensor(ANISO[d])
    mm_after = (r["boxes"][:, d:] - r["boxes"][:, :d]) * torch.tensor(r["spacing"])
    interior = (s["boxes"][:, d:] * torch.tensor(ANISO[d]) <= torch.tensor(shape)).all(1)
    torch.testing.assert_close(mm_after[interior], mm_before[interior])
    # per-axis target spacing and a non-integer image via nearest
    r2 = T.resample({"image": torch.ones((1,) + SHAPES[d], dtype=torch.int64), "spacing": ANISO[d]},
                    ANISO[d][::-1], mode="nearest")
    assert r2["spacing"] == tuple(ANISO[d][::-1]) and r2["image"].dtype == torch.int64


def test_scale_and_random_scale(d):
    s = make_sample(d, n=4, min_size=2, spacing=(2.0,) * d)
    z = T.scale(s, 2.0, mode="nearest")
    torch.testing.assert_close(z["boxes"], s["boxes"] * 2)
    assert z["spacing"] == (1.0,) * d
    assert_masks_match(z)
    g = torch.Generator().manual_seed(0)
    out = T.RandomScale(range=(0.8, 1.3), isotropic=False)(s, g)
    assert_masks_match(out, exact=False)
    ratio = torch.tensor(out["image"].shape[1:]) / torch.tensor(SHAPES[d])
    assert ((ratio > 0.7) & (ratio < 1.4)).all()


# --------------------------------------------------------------------------------------------------------------------
# intensity
# --------------------------------------------------------------------------------------------------------------------


def test_intensity_transforms(d):
    hu = torch.tensor([-2000.0, -1000.0, -300.0, 400.0, 3000.0]).view((1, 5) + (1,) * (d - 1))
    s = {"image": hu, "boxes": torch.zeros(0, 2 * d), "labels": torch.zeros(0, dtype=torch.long)}
    w = T.HUWindow.lung()(s)["image"].flatten()
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    r = T.ScaleIntensityRange(a_min=-1000, a_max=400, b_min=-1, b_max=1, clip=False)(s)["image"].flatten()
    torch.testing.assert_close(r[1:4], torch.tensor([-1.0, 0.0, 1.0]))
    assert r[0] < -1 and r[-1] > 1
    x = make_sample(d)
    n = T.Normalize()(x)["image"]
    torch.testing.assert_close(n.flatten(1).mean(1), torch.zeros(n.shape[0]), atol=1e-5, rtol=0)
    m = T.Normalize(mean=0.5, std=2.0)(x)["image"]
    torch.testing.assert_close(m, (x["image"] - 0.5) / 2)
    g = torch.Generator().manual_seed(0)
    a = T.RandomIntensity(scale=(0.5, 2.0), shift=(-1, 1), noise_std=0.1, gamma=(0.5, 2.0))(x, g)
    assert not torch.equal(a["image"], x["image"]) and a["image"].shape == x["image"].shape
    assert a["boxes"] is x["boxes"] and a["labels"] is x["labels"]
    assert T.ToFloat()({"image": torch.ones((1,) + SHAPES[d], dtype=torch.int16)})["image"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# empty boxes, reproducibility, pickling, bad arguments
# --------------------------------------------------------------------------------------------------------------------


def all_transforms(d):
    return [
        T.ToFloat(), T.Resample(target_spacing=0.8), T.Resample(target_spacing=1.3, mode="nearest"),
        T.HUWindow(lo=-1000, hi=400), T.Normalize(), T.ScaleIntensityRange(a_min=0, a_max=1),
        T.CropOrPad(size=7), T.RandomCrop(size=6, pos_prob=1.0), T.RandomCrop(size=30, pos_prob=0.0),
        T.RandomFlip(p=1.0), T.RandomRot90(p=1.0), T.RandomScale(range=(0.7, 1.4)),
        T.RandomIntensity(noise_std=0.1, gamma=(0.8, 1.2)),
        lambda s, g=None: T.flip(s, tuple(range(d))), lambda s, g=None: T.rot90(s, 3, (0, 1)),
        lambda s, g=None: T.crop(s, -2, 5), lambda s, g=None: T.pad(s, 2), lambda s, g=None: T.pad_to(s, 16),
        lambda s, g=None: T.scale(s, 1.5), lambda s, g=None: T.resample(s, 0.5),
    ]


def test_empty_boxes_pass_through_everything(d):
    s = {"image": torch.rand((1,) + SHAPES[d]), "boxes": torch.zeros(0, 2 * d),
         "labels": torch.zeros(0, dtype=torch.long), "spacing": (1.0,) * d, "extra": "kept"}
    g = torch.Generator().manual_seed(0)
    for t in all_transforms(d):
        out = t(s, g)
        assert out["boxes"].shape == (0, 2 * d) and out["labels"].shape == (0,), t
        assert out["extra"] == "kept"
    # also a plain empty list for boxes and an image-only sample
    assert T.flip({"image": s["image"], "boxes": []}, 0)["boxes"].shape == (0, 2 * d)
    assert T.RandomCrop(size=4)({"image": s["image"]}, g)["image"].shape[1:] == (4,) * d


def pipeline():
    return T.Compose([
        T.RandomFlip(p=0.5), T.RandomRot90(p=0.7), T.RandomScale(range=(0.8, 1.25)),
        T.RandomCrop(size=8, pos_prob=0.5, min_visibility=0.3),
        T.RandomIntensity(noise_std=(0.0, 0.1), gamma=(0.7, 1.5)),
    ])


def test_seeded_reproducibility(d):
    s = make_sample(d, n=6, min_size=2)
    t = pipeline()
    runs = [t(s, torch.Generator().manual_seed(seed)) for seed in (11, 11, 12)]
    same(runs[0], runs[1])
    assert torch.equal(runs[0]["box_ids"], runs[1]["box_ids"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])
    torch.manual_seed(5)
    a = t(s)
    torch.manual_seed(5)
    same(a, t(s))
    # workers: transforms pickle and still give the same result
    t2 = pickle.loads(pickle.dumps(t))
    same(t2(s, torch.Generator().manual_seed(11)), runs[0])
    assert "RandomCrop(" in repr(t)


def test_random_transforms_keep_boxes_on_voxels(d):
    s = make_sample(d, n=6, min_size=2)
    g = torch.Generator().manual_seed(2)
    t = T.Compose([T.RandomFlip(p=0.5), T.RandomRot90(axes=(0, -1), p=0.8),
                   T.RandomCrop(size=7, pos_prob=0.5, min_visibility=0.0, min_size=0.0)])
    for _ in range(10):
        assert_masks_match(t(s, g))


BAD = [
    ("target_spacing", lambda s, d: T.Resample(target_spacing=-1.0)),
    ("target_spacing", lambda s, d: T.resample(s, (1.0,) * (d + 1))),
    ("mode", lambda s, d: T.Resample(target_spacing=1.0, mode="cubic")),
    ("spacing", lambda s, d: T.resample({"image": s["image"]}, 1.0)),
    ("spacing", lambda s, d: T.flip({**s, "spacing": (1.0,) * (d + 1)}, 0)),
    ("lo", lambda s, d: T.crop(s, (0.5,) * d, 4)),
    ("size", lambda s, d: T.crop(s, 0, 0)),
    ("min_visibility", lambda s, d: T.crop(s, 0, 4, min_visibility=1.5)),
    ("min_size", lambda s, d: T.crop(s, 0, 4, min_size=-1)),
    ("pad_value", lambda s, d: T.crop(s, 0, 4, pad_value="max")),
    ("before", lambda s, d: T.pad(s, -1)),
    ("factor", lambda s, d: T.scale(s, 0.0)),
    ("axes", lambda s, d: T.flip(s, d)),
    ("axes", lambda s, d: T.flip(s, (0, -d))),
    ("axes", lambda s, d: T.rot90(s, 1, (0, 0))),
    ("axes", lambda s, d: T.rot90(s, 1, (0,))),
    ("k", lambda s, d: T.rot90(s, 1.5)),
    ("size", lambda s, d: T.RandomCrop(size=0)),
    ("size", lambda s, d: T.CropOrPad(size=(4, -1))),
    ("size", lambda s, d: T.RandomCrop(size=(4,) * (d + 1))(s)),
    ("pos_prob", lambda s, d: T.RandomCrop(size=4, pos_prob=2)),
    ("p", lambda s, d: T.RandomFlip(p=-0.1)),
    ("axes", lambda s, d: T.RandomFlip(axes=(0, 0))),
    ("axes", lambda s, d: T.RandomRot90(axes=(0, 1, 2))),
    ("axes", lambda s, d: T.RandomFlip(axes=(d,))(s)),
    ("range", lambda s, d: T.RandomScale(range=(2.0, 1.0))),
    ("range", lambda s, d: T.RandomScale(range=(0.0, 1.0))),
    ("noise_std", lambda s, d: T.RandomIntensity(noise_std=-1.0)),
    ("gamma", lambda s, d: T.RandomIntensity(gamma=(0.0, 1.0))),
    ("hi", lambda s, d: T.HUWindow(lo=400, hi=-1000)),
    ("a_max", lambda s, d: T.ScaleIntensityRange(a_min=1, a_max=0)),
    ("mean and std", lambda s, d: T.Normalize(mean=0.0)),
    ("std", lambda s, d: T.Normalize(mean=0.0, std=0.0)),
    ("boxes", lambda s, d: T.flip({**s, "boxes": torch.zeros(3, 2 * d + 1)}, 0)),
    ("labels", lambda s, d: T.flip({**s, "labels": torch.zeros(2, dtype=torch.long)}, 0)),
    ("image", lambda s, d: T.flip({"boxes": s["boxes"]}, 0)),
    ("transforms", lambda s, d: T.Compose("flip")),
    ("image", lambda s, d: T.resample({**s, "image": s["image"].long()}, 0.5)),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument(d, name, call):
    s = make_sample(d, n=5)
    with pytest.raises(ValueError, match=name):
        call(s, d)
