"""The CT section of the demo report: two fresh phantoms -> shipped nodule pipeline -> FROC + slice montage."""


import numpy as np
import pytest

from medetect.luna import demo


def test_ct_section_skips_without_weights(tmp_path):
    html, summary = demo.ct_section(tmp_path, fpr_weights=tmp_path / "missing.safetensors")
    assert html == "" and "missing" in summary["skipped"]
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.skipif(not demo.FPR_WEIGHTS.is_file(), reason="shipped nodule weights not present")
def test_ct_section_report(tmp_path):
    html, s = demo.ct_section(tmp_path)  # (its time is a benchmark matter, not asserted in a unit test)
    for key in ("froc_png", "slices_png"):
        png = tmp_path / {"froc_png": "ct_froc.png", "slices_png": "ct_slices.png"}[key]
        assert s[key] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html and "CPM" in html
    assert 0.0 <= s["cpm"] <= 1.0 and len(s["sensitivities"]) == 7 and s["n_scans"] == 2 and s["n_nodules"] >= 4
    assert np.all(np.diff(s["sensitivities"]) >= 0)
    assert s["detector"] in (None, demo.DET_WEIGHTS.name)
    marks = s["top_marks"]
    assert marks and all(set(m) >= {"x", "y", "z", "probability", "hit"} for m in marks)
    assert any(m["hit"] for m in marks)  # the shipped pipeline finds nodules on these easy phantoms


def test_hits_use_the_official_strict_rule():
    from medetect.data.annotations import WorldPoints

    nodules = WorldPoints.from_arrays(["a", "a"], [[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]], diameters=[10.0, -1.0],
                                    allow_unknown_diameter=True)
    marks = [[3.0, 4.0, 0.0], [2.9, 4.0, 0.0], [20.0, 0.0, 0.0], [50.0, 0.0, 0.0]]
    # on the sphere: no hit; a nodule without a size (-1) is never hit; no marks -> empty
    assert demo._hits(nodules, marks).tolist() == [False, True, False, False]
    assert demo._hits(nodules, np.zeros((0, 3))).shape == (0,)
    assert demo._hits(nodules[:0], marks).tolist() == [False] * 4
