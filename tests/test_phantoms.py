"""Synthetic LUNA16 phantoms: geometry, nodule HU and placement, partial volume, determinism and the CSV files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medetect.cli import main
from medetect.convert import Geometry, world_to_voxel
from medetect.data.phantoms import (
    ANNOTATIONS_HEADER,
    CANDIDATES_HEADER,
    LUNA_UID_PREFIX,
    make_phantom,
    write_luna16_dataset,
)

SHAPE = (40, 128, 128)
SPACING = (2.0, 1.2, 1.2)
ORIGIN = (-80.5, -60.25, -310.0)
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
UID_RE = re.compile(r"^" + re.escape(LUNA_UID_PREFIX) + r"[1-9]\d{29}$")
NOISE = 20.0


def _sphere_dist(geom: Geometry, shape, center_world) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of every voxel centre to a world point, and the voxel centre of that point (edge coords)."""
    c = np.asarray(world_to_voxel(np.asarray(center_world, dtype=np.float64), geom))
    sp = np.asarray(geom.spacing)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) for n in shape], indexing="ij")
    d = np.sqrt(((zz - c[0]) * sp[0]) ** 2 + ((yy - c[1]) * sp[1]) ** 2 + ((xx - c[2]) * sp[2]) ** 2)
    return d, c


@pytest.fixture(scope="module")
def solid():
    return make_phantom(SHAPE, SPACING, ORIGIN, None, n_nodules=4, nodule_diameters_mm=(6.0, 16.0), seed=11,
                        noise_std_hu=NOISE, subsolid_fraction=0.0, return_info=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("luna")
    m = write_luna16_dataset(out, n_scans=3, seed=5, subsets=2, shape=(32, 112, 112), spacing=(2.5, 1.4, 1.4),
                             nodules_per_scan=[3, 0, 2], nodule_diameters_mm=(4.0, 14.0), n_excluded=2,
                             origin=(-70.0, -90.5, -200.0), direction=FLIP_X)
    return out, m


# ----------------------------------------------------------------------------------------------- make_phantom


def test_volume_geometry_and_anatomy(solid):
    vol, geom, nodules, info = solid
    assert vol.dtype == np.int16 and vol.shape == SHAPE
    assert geom.spacing == SPACING and geom.origin == ORIGIN and geom.direction == tuple(np.eye(3).reshape(-1))
    assert len(nodules) == 4
    assert np.median(vol[0, :3, :3]) < -950  # air in the corner
    lung = info["lung_mask"]
    assert 0.05 < lung.mean() < 0.5
    assert -880 < np.median(vol[lung]) < -820  # parenchyma ~ -850
    assert vol.max() > 400  # bone (spine, ribs)
    body = (vol > -300) & ~lung
    assert -60 < np.median(vol[body]) < 120  # soft tissue ~ 40


def test_nodule_centres_and_hu(solid):
    vol, geom, nodules, info = solid
    for n in nodules:
        assert n["type"] == "solid" and 0 <= n["hu"] <= 100
        assert 6.0 - 1e-9 <= n["diameter_mm"] <= 16.0 + 1e-9
        d, c = _sphere_dist(geom, vol.shape, n["center_xyz_world"])
        np.testing.assert_allclose(c, n["center_voxel"], atol=1e-6)
        # the voxel that contains the centre is nodule, up to noise
        iz, iy, ix = np.floor(c).astype(int)
        assert abs(vol[iz, iy, ix] - n["hu"]) < 5 * NOISE
        # the sphere's interior (away from the partial-volume shell) has the nodule's mean HU
        r = n["diameter_mm"] / 2
        core = d < r - np.linalg.norm(SPACING)
        assert core.sum() >= 1
        assert abs(vol[core].mean() - n["hu"]) < 4 * NOISE / np.sqrt(core.sum()) + 10
        # and the sphere lies in the lung, its surroundings are lung
        assert info["lung_mask"][d <= r].all()
        shell = (d > r + 2.5) & (d < r + 5) & info["lung_mask"]
        assert np.median(vol[shell]) < -600


def test_nodules_do_not_overlap(solid):
    _, _, nodules, _ = solid
    c = np.asarray([n["center_xyz_world"] for n in nodules])
    r = np.asarray([n["diameter_mm"] / 2 for n in nodules])
    i, j = np.triu_indices(len(nodules), 1)
    assert np.all(np.linalg.norm(c[i] - c[j], axis=1) >= r[i] + r[j])


def test_partial_volume_and_sphere_volume():
    """Edge voxels hold intermediate HU and the summed fraction is the sphere's volume (anisotropic spacing)."""
    spacing = (2.5, 0.8, 0.8)
    vol, geom, nodules, info = make_phantom((36, 160, 160), spacing, None, None, n_nodules=2,
                                            nodule_diameters_mm=(8.0, 12.0), seed=4, noise_std_hu=0.0,
                                            subsolid_fraction=0.0, n_vessel_branches=0, return_info=True)
    assert len(nodules) == 2
    for n in nodules:
        d, _ = _sphere_dist(geom, vol.shape, n["center_xyz_world"])
        r = n["diameter_mm"] / 2
        near = d < r + np.linalg.norm(spacing) / 2 + 0.2  # the partial-volume ramp ends within half a voxel
        bg = np.median(vol[(d > r + 3.0) & (d < r + 6.0)])
        assert bg < -800
        f = np.clip((vol[near].astype(np.float64) - bg) / (n["hu"] - bg), 0, 1)
        assert ((f > 0.1) & (f < 0.9)).sum() > 20  # a shell of mixed voxels, not a binary sphere
        est = f.sum() * np.prod(spacing)
        assert est == pytest.approx(4 / 3 * np.pi * r**3, rel=0.02)
        # mixed voxels sit on the surface
        mixed = near & (vol > bg + 0.1 * (n["hu"] - bg)) & (vol < bg + 0.9 * (n["hu"] - bg))
        assert np.all(np.abs(d[mixed] - r) < np.linalg.norm(spacing) / 2 + 0.01)


def test_non_identity_direction_world_coordinates():
    rot = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y swapped and flipped (still orthonormal)
    for direction in (FLIP_X, rot):
        vol, geom, nodules = make_phantom(SHAPE, SPACING, ORIGIN, direction, n_nodules=3,
                                          nodule_diameters_mm=(6.0, 12.0), seed=2, noise_std_hu=NOISE,
                                          subsolid_fraction=0.0)
        assert geom.direction == direction
        img = sitk.GetImageFromArray(vol)
        geom.apply_to_sitk(img)
        for n in nodules:
            c = np.asarray(world_to_voxel(np.asarray(n["center_xyz_world"]), geom))
            np.testing.assert_allclose(c, n["center_voxel"], atol=1e-6)
            # independent check through SimpleITK: continuous index (ITK order, centres at integers)
            idx = np.asarray(img.TransformPhysicalPointToContinuousIndex(n["center_xyz_world"]))
            np.testing.assert_allclose(idx[::-1] + 0.5, c, atol=1e-6)
            iz, iy, ix = np.floor(c).astype(int)
            assert abs(vol[iz, iy, ix] - n["hu"]) < 5 * NOISE


def test_determinism_and_seed():
    kw = dict(shape=(24, 80, 80), spacing=(2.5, 1.5, 1.5), n_nodules=(1, 3), nodule_diameters_mm=(4.0, 10.0))
    a = make_phantom(seed=7, **kw)
    b = make_phantom(seed=7, **kw)
    c = make_phantom(seed=8, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_subsolid_nodules():
    vol, geom, nodules = make_phantom(SHAPE, SPACING, ORIGIN, None, n_nodules=4, nodule_diameters_mm=(16.0, 20.0),
                                      seed=3, noise_std_hu=0.0, subsolid_fraction=1.0, n_vessel_branches=0)
    assert {n["type"] for n in nodules} == {"ground-glass", "part-solid"}
    for n in nodules:
        assert n["diameter_mm"] >= 16.0 - 1e-9
        d, c = _sphere_dist(geom, vol.shape, n["center_xyz_world"])
        r = n["diameter_mm"] / 2
        if n["type"] == "ground-glass":
            assert -700 < vol[d < r - 2].mean() < -400
        else:  # solid core (at most 0.6 r), ground-glass halo
            assert -700 < np.median(vol[(d > 0.75 * r) & (d < r - 1.5)]) < -400
            iz, iy, ix = np.floor(c).astype(int)
            assert vol[iz, iy, ix] > -150


def test_zero_nodules_and_options():
    vol, geom, nodules, info = make_phantom((24, 96, 96), (2.5, 1.5, 1.5), n_nodules=0, seed=1, n_excluded=2,
                                            outside_fov_hu=-3024, return_info=True)
    assert nodules == []
    assert vol[0, 0, 0] == -3024 and vol[0, 48, 48] > -3024
    assert len(info["excluded"]) >= 1
    for e in info["excluded"]:
        assert e["diameter_mm"] == -1.0 or 0 < e["diameter_mm"] < 3.0
    with pytest.raises(ValueError):
        make_phantom((24, 96, 96), direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))


def test_too_big_nodules_warn_not_hang():
    with pytest.warns(RuntimeWarning, match="no room"):
        _, _, nodules = make_phantom((16, 48, 48), (2.5, 1.5, 1.5), n_nodules=3, nodule_diameters_mm=(40.0, 40.0),
                                     seed=0, n_vessel_branches=20)
    assert len(nodules) < 3


# ----------------------------------------------------------------------------------------------- LUNA16 dataset


def _read_csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def test_dataset_layout_and_geometry(dataset):
    out, m = dataset
    assert m["n_scans"] == 3 and m["synthetic"] and m["n_nodules"] == 5
    assert sorted(p.name for p in out.iterdir()) == [
        "README.txt", "annotations.csv", "annotations_excluded.csv", "candidates.csv", "seriesuids.csv",
        "subset0", "subset1"]
    assert len(list((out / "subset0").glob("*.mhd"))) == 2 and len(list((out / "subset1").glob("*.mhd"))) == 1
    for s in m["scans"]:
        path = out / s["subset"] / f"{s['seriesuid']}.mhd"
        assert path.is_file() and path.with_suffix(".raw").is_file()
        assert UID_RE.match(s["seriesuid"])
        img = sitk.ReadImage(str(path))
        assert img.GetPixelID() == sitk.sitkInt16
        assert img.GetSize() == (112, 112, 32)
        np.testing.assert_allclose(img.GetSpacing(), (1.4, 1.4, 2.5))
        np.testing.assert_allclose(img.GetOrigin(), (-70.0, -90.5, -200.0))
        np.testing.assert_allclose(img.GetDirection(), FLIP_X)
        assert "ElementType = MET_SHORT" in path.read_text()
    # the files are the phantoms: regenerate one scan from the manifest
    s = m["scans"][2]
    vol, geom, nodules = make_phantom(s["shape"], s["spacing"], s["origin"], s["direction"], n_nodules=2,
                                      nodule_diameters_mm=(4.0, 14.0), seed=s["phantom_seed"], n_excluded=2)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(s["path"]))
    np.testing.assert_array_equal(arr, vol)


def test_csv_formats(dataset):
    out, m = dataset
    uids = [s["seriesuid"] for s in m["scans"]]
    assert (out / "seriesuids.csv").read_text().splitlines() == uids  # no header, as in the evaluation script
    ann = _read_csv(out / "annotations.csv")
    exc = _read_csv(out / "annotations_excluded.csv")
    cand = _read_csv(out / "candidates.csv")
    assert ann[0] == list(ANNOTATIONS_HEADER) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert exc[0] == list(ANNOTATIONS_HEADER)
    assert cand[0] == list(CANDIDATES_HEADER) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    for rows in (ann, exc, cand):
        for row in rows[1:]:
            assert len(row) == 5 and row[0] in uids
            [float(v) for v in row[1:]]
            assert not any(" " in v or "e" in v.lower() for v in row[1:])
    assert {row[4] for row in cand[1:]} == {"0", "1"}
    assert sum(r[4] == "1" for r in cand[1:]) == m["n_positive_candidates"]
    per_uid = {u: sum(r[0] == u for r in ann[1:]) for u in uids}
    assert per_uid == {uids[0]: 3, uids[1]: 0, uids[2]: 2}  # a scan without nodules
    assert all(sum(r[0] == u for r in cand[1:]) > 10 for u in uids)
    for row in exc[1:]:
        d = float(row[4])
        assert d == -1 or 0 < d < 3


def test_annotations_match_volumes_and_candidates(dataset):
    out, m = dataset
    ann = _read_csv(out / "annotations.csv")[1:]
    cand = _read_csv(out / "candidates.csv")[1:]
    paths = {s["seriesuid"]: s["path"] for s in m["scans"]}
    n_vessel_like = n_neg = 0
    for uid, path in paths.items():
        img = sitk.ReadImage(path)
        vol = sitk.GetArrayFromImage(img)
        geom = Geometry.from_sitk(img)
        nod = [(np.array([float(v) for v in r[1:4]]), float(r[4])) for r in ann if r[0] == uid]
        pos = np.array([[float(v) for v in r[1:4]] for r in cand if r[0] == uid and r[4] == "1"]).reshape(-1, 3)
        neg = np.array([[float(v) for v in r[1:4]] for r in cand if r[0] == uid and r[4] == "0"]).reshape(-1, 3)
        for c, dia in nod:
            assert 4.0 - 1e-6 <= dia <= 14.0 + 1e-6
            v = np.floor(world_to_voxel(c, geom)).astype(int)
            assert np.all(v >= 0) and np.all(v < vol.shape)
            assert vol[tuple(v)] > -400  # nodule-like (solid or ground glass), not lung
            # a class-1 candidate within the radius, and no class-0 candidate inside the nodule
            assert np.min(np.linalg.norm(pos - c, axis=1)) <= dia / 2
            assert np.all(np.linalg.norm(neg - c, axis=1) > dia / 2)
        vox = np.floor(world_to_voxel(neg, geom)).astype(int)
        assert np.all(vox >= 0) and np.all(vox < vol.shape)
        hu = vol[tuple(vox.T)]
        n_vessel_like += int((hu > -500).sum())
        n_neg += len(hu)
    assert n_vessel_like > 0.3 * n_neg  # many negatives sit on vessels: the hard ones


def test_dataset_determinism(tmp_path):
    kw = dict(shape=(20, 64, 64), nodules_per_scan=[1, 2], nodule_diameters_mm=(4.0, 8.0), n_vessel_branches=80)
    write_luna16_dataset(tmp_path / "a", n_scans=2, seed=9, **kw)
    write_luna16_dataset(tmp_path / "b", n_scans=2, seed=9, **kw)
    for name in ("annotations.csv", "candidates.csv", "annotations_excluded.csv", "seriesuids.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    raws = sorted((tmp_path / "a" / "subset0").glob("*.raw"))
    assert len(raws) == 2
    for p in raws:
        assert p.read_bytes() == (tmp_path / "b" / "subset0" / p.name).read_bytes()


def test_cli(tmp_path, capsys):
    assert main(["phantoms", str(tmp_path / "d"), "--scans", "1", "--seed", "3", "--shape", "20", "64", "64",
                 "--nodules", "1", "1", "--diameters", "4", "8"]) == 0
    assert '"n_nodules": 1' in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "subset0").glob("*.mhd"))) == 1
    assert len((tmp_path / "d" / "annotations.csv").read_text().splitlines()) == 2
