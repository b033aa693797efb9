"""LIDC-IDRI XML: every reader mark, its boxes, and the clustering into nodules, checked row by row against the
shared lidc-idri-slabs CSVs (reads.csv, nodules.csv, rois_per_slice.csv); bad XML on small hand-written files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medetect.data.annotations import AnnotationError
from medetect.data.annotations.lidc import LidcGeometry, cluster_lidc_marks, read_lidc_xml

PATIENTS = {"LIDC-IDRI-0001": "LIDC-IDRI-0001_69.xml", "LIDC-IDRI-0002": "LIDC-IDRI-0002_71.xml"}


@pytest.fixture(scope="module")
def lidc(shared_data):
    root = shared_data / "lidc-idri-slabs"
    if not root.is_dir():
        pytest.skip("lidc-idri-slabs not present")
    vol = json.loads((root / "volumes.json").read_text())
    out = {}
    for pid, xml in PATIENTS.items():
        v = vol[pid]
        g = LidcGeometry(tuple(v["origin_xyz"][:2]), tuple(v["spacing_zyx"][1:]), tuple(v["z_positions"]))
        marks, report, info = read_lidc_xml(root / "xml" / xml)
        out[pid] = (g, marks, report, info, cluster_lidc_marks(marks, g, prefix=f"{pid}_N"))
    rows = {name: list(csv.DictReader(open(root / f"{name}.csv"))) for name in ("reads", "nodules", "rois_per_slice")}
    return out, rows


def test_every_reader_mark_matches_reads_csv(lidc):
    data, rows = lidc
    for pid, (g, marks, report, info, nodules) in data.items():
        expect = [r for r in rows["reads"] if r["patient_id"] == pid]
        assert len(marks) == len(expect)
        assert report.sessions == 4 and report.sessions_without_marks == 0
        cluster_of = {id(m): n.cluster_id for n in nodules for m in n.marks}
        for m, r in zip(marks, expect):  # same order: session by session, nodules then non-nodules
            assert (str(m.session), m.reader_id, m.kind, m.mark_id) == (r["session"], r["reader_id"], r["mark_type"], r["mark_id"])
            assert m.box_px == tuple(int(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            assert m.z_range_mm == (float(r["z_min_mm"]), float(r["z_max_mm"]))
            assert m.n_slices == int(r["n_slices_full"])
            box = g.box_mm(m.box_px, m.z_range_mm)
            np.testing.assert_allclose((box[:3] + box[3:]) / 2, [float(r[k]) for k in ("cx_mm", "cy_mm", "cz_mm")],
                                       atol=1e-3)
            assert cluster_of.get(id(m), "") == r["cluster_id"]
            if m.kind == "nodule>=3mm":
                assert m.characteristics["malignancy"] == int(r["malignancy"])


def test_clusters_match_nodules_csv(lidc):
    data, rows = lidc
    got = [n for _, (_, _, _, _, nods) in data.items() for n in nods]
    assert [n.cluster_id for n in got] == [r["cluster_id"] for r in rows["nodules"]]
    for (pid, (g, *_)), n, r in zip([(p, data[p]) for p in data for _ in data[p][4]], got, rows["nodules"]):
        assert (n.n_readers, len(n.marks)) == (int(r["n_readers"]), int(r["n_marks"]))
        assert n.union_box_px == tuple(int(r[f"{k}_union"]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert n.union_z_mm == (float(r["z_min_mm_union"]), float(r["z_max_mm_union"]))
        assert n.median_box_px == tuple(float(r[f"{k}_median"]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert n.median_z_mm == (float(r["z_min_mm_median"]), float(r["z_max_mm_median"]))
        np.testing.assert_allclose(n.centre_mm, [float(r[k]) for k in ("cx_mm", "cy_mm", "cz_mm")], atol=1e-3)
        assert n.malignancy == float(r["malignancy_median"])
        box, truncated = n.slab_box(g)
        assert box.tolist() == [float(r[f"slab_{k}"]) for k in ("z0", "y0", "x0", "z1", "y1", "x1")]
        assert truncated == bool(int(r["truncated_by_slab"]))


def test_per_slice_contours_match_rois_csv(lidc):
    data, rows = lidc
    got = []
    for pid, (g, marks, *_rest) in data.items():
        for m in marks:
            if m.kind != "nodule>=3mm":
                continue
            for roi in m.rois:
                lo, hi = roi.points.min(0), roi.points.max(0)
                got.append((pid, m.mark_id, roi.z_mm, roi.sop_uid, roi.inclusion, len(roi.points),
                            int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]), g.slice_index(roi.z_mm)))
    expect = [(r["patient_id"], r["mark_id"], float(r["z_mm"]), r["sop_uid"], r["inclusion"] == "TRUE",
               int(r["n_points"]), int(r["x_min"]), int(r["y_min"]), int(r["x_max"]), int(r["y_max"]),
               int(r["k"]) if r["k"] else None) for r in rows["rois_per_slice"]]
    assert sorted(got, key=str) == sorted(expect, key=str)


HEAD = '<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><SeriesInstanceUid>1.2</SeriesInstanceUid></ResponseHeader>'


def _roi(z, sop, pts, inclusion="TRUE"):
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
    return f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID><inclusion>{inclusion}</inclusion>{edges}</roi>"


def test_bad_and_odd_xml_is_counted_or_named(tmp_path):
    sq = [(10, 10), (14, 10), (14, 14), (10, 14)]
    xml = (HEAD + "<readingSession><servicingRadiologistID>r1</servicingRadiologistID></readingSession>"
           "<readingSession><servicingRadiologistID>r2</servicingRadiologistID><unblindedReadNodule><noduleID>n1"
           "</noduleID><characteristics><malignancy>4</malignancy></characteristics>"
           + _roi(-10, "a", sq) + _roi(-10, "a", sq) + _roi(-12.5, "zz", sq) + "</unblindedReadNodule>"
           "</readingSession></LidcReadMessage>")
    f = tmp_path / "odd.xml"
    f.write_text(xml)
    marks, report, info = read_lidc_xml(f, series_sop_uids=["a", "b"])
    assert info["series_uid"] == "1.2"
    assert report.sessions == 2 and report.sessions_without_marks == 1  # a session without nodules: counted
    assert report.duplicate_rois == 1 and report.rois_outside_series == 1  # the same contour twice; image zz
    assert len(marks) == 1 and marks[0].kind == "nodule>=3mm" and marks[0].n_slices == 2
    assert len(report.events) == 3
    g = LidcGeometry((0.0, 0.0), (1.0, 1.0), (-12.5, -10.0))
    (n,) = cluster_lidc_marks(marks, g)
    box, truncated = n.slab_box(g)
    assert box.tolist() == [0, 10, 10, 2, 15, 15] and not truncated
    bad = tmp_path / "bad.xml"
    bad.write_text(HEAD + "<readingSession><unblindedReadNodule><noduleID>x</noduleID>"
                   "<roi><imageZposition>abc</imageZposition><edgeMap><xCoord>1</xCoord><yCoord>1</yCoord></edgeMap>"
                   "</roi></unblindedReadNodule></readingSession></LidcReadMessage>")
    with pytest.raises(AnnotationError, match="bad.xml.*nodule 'x'.*imageZposition"):
        read_lidc_xml(bad)
    (tmp_path / "broken.xml").write_text("<LidcReadMessage>")
    with pytest.raises(AnnotationError, match="broken.xml.*not valid XML"):
        read_lidc_xml(tmp_path / "broken.xml")


def test_two_readers_far_apart_are_two_nodules_and_close_centres_join(tmp_path):
    a = [(10, 10), (13, 13)]
    b = [(100, 100), (103, 103)]
    c = [(18, 10), (21, 13)]  # no box overlap with a, centres 8 px = 4 mm apart at 0.5 mm pixels
    def sess(r, pts):
        return (f"<readingSession><servicingRadiologistID>{r}</servicingRadiologistID><unblindedReadNodule><noduleID>{r}"
                f"</noduleID><characteristics><malignancy>3</malignancy></characteristics>{_roi(0, 's', pts)}"
                "</unblindedReadNodule></readingSession>")
    f = tmp_path / "x.xml"
    f.write_text(HEAD + sess("r1", a) + sess("r2", b) + sess("r3", c) + "</LidcReadMessage>")
    marks, _, _ = read_lidc_xml(f)
    nods = cluster_lidc_marks(marks, LidcGeometry((0.0, 0.0), (0.5, 0.5)))
    assert [sorted(m.reader_id for m in n.marks) for n in nods] == [["r1", "r3"], ["r2"]]
    assert [n.n_readers for n in nods] == [2, 1]
