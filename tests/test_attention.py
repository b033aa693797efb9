"""Attention classifier (issue 9): model any d, losses, Grad-CAM, metrics, the lesion folder, train/evaluate/predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medetect.evaluation.attention import attention_metrics, froc_curve, image_localisation, local_maxima
from medetect.models.attention import AttentionClassifier, AttentionConfig, grad_cam, pool_heatmap

TINY = dict(base_width=4, depth=18, feature_level=3, dropout=0.0)


def _model(d=2, **kw) -> AttentionClassifier:
    torch.manual_seed(0)
    return AttentionClassifier(AttentionConfig(ndim=d, **{**TINY, **kw}))


def _targets(b, grid, has):
    out = []
    for i in range(b):
        h = torch.zeros(grid)
        if has[i]:
            h[(1,) * len(grid)] = 1.0
        out.append({"labels": torch.tensor([1.0, 0.0]), "heatmap": h, "has_heatmap": torch.tensor(has[i])})
    return out


@pytest.mark.parametrize("d,attention", [(2, "softmax"), (2, "sigmoid"), (3, "softmax"), (2, "none")])
def test_forward_shapes_and_attention_is_a_distribution(d, attention):
    m = _model(d, attention=attention, attention_weight=0.0 if attention == "none" else 1.0)
    x = torch.randn(2, 1, *(16,) * d)
    out = m(x, _targets(2, (16,) * d, [True, False]) if attention != "none" else [
        {"labels": torch.tensor([1.0, 0.0])}] * 2)
    assert out["logits"].shape == (2, 2)
    assert out["attention"].shape == (2, *(2,) * d)  # c3: stride 8
    assert torch.allclose(out["attention"].flatten(1).sum(1), torch.ones(2), atol=1e-5)
    assert set(out["losses"]) == ({"cls_bce"} if attention == "none" else {"cls_bce", "attention"})


def test_images_without_heatmap_contribute_only_the_classification_loss():
    m = _model(2)
    x = torch.randn(2, 1, 32, 32)
    # attention loss of a batch whose second image has no heatmap == that of the first image alone
    both = m(x, _targets(2, (32, 32), [True, False]))["losses"]["attention"]
    first = m(x[:1], _targets(1, (32, 32), [True]))["losses"]["attention"]
    assert float(both.detach()) == pytest.approx(float(first.detach()), rel=1e-5)
    none = m(x, _targets(2, (32, 32), [False, False]))["losses"]
    assert float(none["attention"].detach()) == 0.0
    none["attention"].backward()  # keeps the graph, zero gradient
    # lambda = 0: no attention term at all
    assert "attention" not in _model(2, attention_weight=0.0)(x, _targets(2, (32, 32), [True, True]))["losses"]


@pytest.mark.parametrize("loss", ["kl", "bce"])
def test_supervision_pulls_the_attention_onto_the_heatmap(loss):
    m = _model(2, attention_loss=loss, attention_weight=5.0)
    x = torch.randn(4, 1, 16, 16)
    t = _targets(4, (2, 2), [True] * 4)  # heatmap on the feature grid: voxel (1, 1)
    feats = m.features(x).detach()  # the head alone learns (fast); the attention starts uniform
    assert torch.allclose(m.head(feats)["attention"], torch.full((4, 2, 2), 0.25))
    opt = torch.optim.Adam([*m.attn.parameters(), *m.fc.parameters()], 5e-2)
    for _ in range(150):
        opt.zero_grad()
        sum(m.losses(m.head(feats), t).values()).backward()
        opt.step()
    a = m.head(feats)["attention"]
    assert (a.flatten(1).argmax(1) == 1 * 2 + 1).all()


def test_heatmap_shape_must_match_the_feature_map():
    assert pool_heatmap(torch.ones(1, 8, 8), (4, 4)).shape == (1, 4, 4)
    with pytest.raises(ValueError, match=r"heatmap shape \[6, 6\] does not match the feature map \[4, 4\]"):
        pool_heatmap(torch.ones(1, 6, 6), (4, 4))
    m = _model(2)
    with pytest.raises(ValueError, match="does not match the feature map"):
        m(torch.randn(1, 1, 32, 32), [{"labels": torch.tensor([1.0, 0]), "heatmap": torch.ones(5, 5)}])


def test_config_errors():
    from medetect.config import config_from_dict

    with pytest.raises(ValueError, match="model.ndim must be 2 and model.in_channels 1 for a mini-MIAS-layout folder"):
        config_from_dict({"task": "attention", "model": {"ndim": 3}})
    with pytest.raises(ValueError, match="model.attention must be one of"):
        config_from_dict({"task": "attention", "model": {"attention": "max"}})
    with pytest.raises(ValueError, match="attention_weight must be 0 when model.attention is none"):
        AttentionConfig(attention="none", attention_weight=1.0).validate()
    with pytest.raises(ValueError, match="pos_weight must have 2 values"):
        AttentionConfig(pos_weight=[1.0]).validate()


@pytest.mark.parametrize("d", [2, 3])
def test_grad_cam_is_a_distribution_on_the_feature_grid(d):
    m = _model(d, attention="none", attention_weight=0.0).eval()
    out = grad_cam(m, torch.randn(2, 1, *(16,) * d))
    assert out["saliency"].shape == (2, *(2,) * d)
    assert torch.allclose(out["saliency"].flatten(1).sum(1), torch.ones(2), atol=1e-5)
    assert (out["saliency"] >= 0).all()


def test_localisation_by_hand():
    s = np.zeros((10, 10))
    s[2, 2], s[7, 7] = 1.0, 0.5  # arg-max at voxel (2, 2), centre (2.5, 2.5)
    loc = image_localisation(s, [[2.5, 2.5]], [1.0])
    assert loc["pointing"] is True and loc["mass"] == pytest.approx(1 / 1.5)
    assert loc["mark_tp"].tolist() == [True, False] and loc["mark_fp"].tolist() == [False, True]
    miss = image_localisation(s, [[7.5, 7.5]], [1.0])
    assert miss["pointing"] is False and miss["mass"] == pytest.approx(0.5 / 1.5)
    normal = image_localisation(s, np.zeros((0, 2)), [])
    assert normal["pointing"] is None and normal["mark_fp"].all()
    # two images, 2 lesions: at 0.5 FP/image only the first mark (TP) counts; at 1 FP/image both TPs
    sens = froc_curve([loc, miss], fp_rates=(0.5, 1.0))
    assert sens.tolist() == [0.5, 1.0]
    pts, vals = local_maxima(torch.tensor(s), max_marks=1)
    assert pts.tolist() == [[2.5, 2.5]] and vals.tolist() == [1.0]


def test_attention_metrics_keys_and_patient_bootstrap():
    rng = np.random.default_rng(0)
    n = 12
    sal = [rng.random((8, 8)) for _ in range(n)]
    labels = np.stack([np.arange(n) % 2, np.arange(n) % 4 == 1], 1).astype(float)
    centres = [np.array([[4.0, 4.0]]) if labels[i, 0] else np.zeros((0, 2)) for i in range(n)]
    radii = [np.array([2.0]) if labels[i, 0] else np.zeros(0) for i in range(n)]
    scores = labels * 0.8 + 0.1
    res = attention_metrics(scores, labels, sal, centres, radii, [f"p{i // 2}" for i in range(n)], n_boot=50)
    for k in ("image_auc_abnormal", "image_auc_malignant", "pointing_game", "attention_in_lesion",
              "attention_froc_mean"):
        assert k in res and f"{k}_ci" in res
    assert res["image_auc_abnormal"] == 1.0 and res["n_patients"] == 6
    lo, hi = res["attention_in_lesion_ci"]
    assert lo <= res["attention_in_lesion"] <= hi


def test_bootstrap_auc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from medetect.evaluation.attention import _rank_auc

    rng = np.random.default_rng(1)
    y = rng.random(40) < 0.4
    s = np.round(rng.random(40), 1)  # ties
    assert _rank_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# ------------------------------------------------------------------------------------------------ lesion folder + CLI


def _folder(tmp_path, n_pat=6, size=64, radius="6"):
    from PIL import Image

    root = tmp_path / "mias"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, ann = [], []
    k = 0
    for p in range(n_pat):
        for side in ("R", "L"):
            k += 1
            iid = f"mdb{k:03d}"
            img = (rng.random((size, size)) * 60).astype(np.uint8)
            label = "normal" if k % 2 else ("malignant" if k % 4 == 0 else "benign")
            if label != "normal":
                cy, cx = 16 + (k * 7) % 32, 20 + (k * 5) % 24
                yy, xx = np.mgrid[:size, :size]
                img[(yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < 36] = 220
                ann.append(f"{iid},train,F,CIRC,{'M' if label == 'malignant' else 'B'},{cx},{size - 1 - cy},{radius},1,"
                           f"{cx},{cy},{cx - 6},{cy - 6},{cx + 6},{cy + 6},")
            Image.fromarray(img).save(root / "images" / f"{iid}.png")
            split = "val" if p >= n_pat - 2 else "train"
            rows.append(f"{iid},images/{iid}.png,{split},p{p:03d},{side},{size},{size},F,{label},"
                        f"{int(label != 'normal')},{int(label != 'normal')},x")
    (root / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label,"
                                     "n_abnormalities,n_boxes,source_pgm_sha256\n" + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("image_id,split,tissue,abnormality,severity,x_mias,y_mias,radius,"
                                          "has_location,cx,cy,xmin,ymin,xmax,ymax,note\n" + "\n".join(ann) + "\n")
    return root


def test_lesion_folder_reader_and_bad_rows(tmp_path):
    from medetect.attention.data import LesionImages
    from medetect.data.lesion_folder import read_lesion_folder
    from medetect.models.io import Preprocess

    root = _folder(tmp_path)
    recs = read_lesion_folder(root, "train")
    assert len(recs) == 8 and sum(len(r.radii) for r in recs) == 4
    assert recs[1].labels.tolist() == [1.0, 0.0]
    ds = LesionImages(recs, Preprocess(scale=0.5, mean=[0.25], std=[0.25]))
    s = ds[1]
    assert s["image"].shape == (1, 32, 32) and s["heatmap"].shape == (32, 32) and bool(s["has_heatmap"])
    c = recs[1].centres[0] * 0.5  # peak of the heatmap at the halved centre
    peak = np.unravel_index(int(s["heatmap"].argmax()), (32, 32))
    assert np.abs(np.asarray(peak) + 0.5 - c).max() <= 0.5
    assert not bool(ds[0]["has_heatmap"]) and float(ds[0]["heatmap"].sum()) == 0
    # an abnormal image whose finding has no location: labels kept, no heatmap (classification loss only)
    csv_i, csv_a = root / "images.csv", root / "annotations.csv"
    csv_i.write_text(csv_i.read_text().replace("mdb001,images/mdb001.png,train,p000,R,64,64,F,normal",
                                               "mdb001,images/mdb001.png,train,p000,R,64,64,F,malignant"))
    csv_a.write_text(csv_a.read_text() + "mdb001,train,F,CALC,M,,,,0,,,,,,,NOTE 3\n")
    un = LesionImages(read_lesion_folder(root, "train"), Preprocess(scale=0.5))[0]
    assert un["labels"].tolist() == [1.0, 1.0] and not bool(un["has_heatmap"])
    with pytest.raises(ValueError, match="split 'test' lists no images"):
        read_lesion_folder(root, "test")
    bad = _folder(tmp_path / "b", radius="0")
    with pytest.raises(ValueError, match=r"annotations.csv line 2: radius must be > 0"):
        read_lesion_folder(bad, "train")


def test_train_evaluate_predict_through_the_cli(tmp_path, capsys):
    from medetect.cli import main

    root = _folder(tmp_path)
    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"task: attention\ndata: {{root: {root}, scale: 0.5}}\n"
                   "model: {base_width: 4, feature_level: 3}\n"
                   "train: {epochs: 1, batch_size: 4, num_workers: 0, warmup_iters: 0}\n")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "val_pointing_game" in summary and (run / "model.safetensors").is_file()
    for w in (run / "model.safetensors", run):  # the model file and the run folder load alike
        assert main(["evaluate", "--weights", str(w), "--data", f"{root}:val", "--json", "--n-boot", "20"]) == 0
        res = json.loads(capsys.readouterr().out)
        for k in ("image_auc_abnormal", "image_auc_malignant", "pointing_game", "attention_in_lesion",
                  "attention_froc_mean"):
            assert k in res and f"{k}_ci" in res
    assert main(["evaluate", "--weights", str(run), "--data", f"{root}:val", "--saliency", "gradcam",
                 "--n-boot", "20"]) == 0
    assert "pointing_game" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(run / "model.safetensors"), str(root / "images" / "mdb002.png"),
                 "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "mdb002_attention.png").size == (64, 64)
    pred = json.loads((out / "predictions.json").read_text())
    (rec,) = pred.values()
    assert set(rec["scores"]) == {"abnormal", "malignant"}
    assert (out / "scores.csv").read_text().splitlines()[0] == "input,abnormal,malignant"


def test_overlay_of_a_volume_shows_three_mid_slices():
    from medetect.attention.predict import _panels, overlay_rgb

    rgb = overlay_rgb(np.zeros((6, 8)), np.ones((6, 8)))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    vol = np.random.default_rng(0).random((4, 6, 8))
    out = _panels(vol, vol)
    assert out.shape == (6, 8 + 2 + 8 + 2 + 6 + 2, 3)  # axial [6, 8], coronal [4, 8], sagittal [4, 6], 2-px gaps


def test_shipped_mias_model_loads_and_points_at_val_lesions(shared_data):
    from pathlib import Path

    from medetect.apps import load_model
    from medetect.attention.data import LesionImages
    from medetect.data.lesion_folder import read_lesion_folder
    from medetect.attention.train import score_dataset
    from medetect.models.io import check_safetensors_file

    w = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "mammo_mias_attention.safetensors"
    check_safetensors_file(w)
    loaded = load_model(w)
    assert loaded.kind == "attention" and loaded.classes == ["abnormal", "malignant"]
    recs = [r for r in read_lesion_folder(shared_data / "mini-mias", "val") if len(r.radii)]
    r = score_dataset(loaded.model, LesionImages(recs, loaded.preprocess), method="attention")
    hits = [image_localisation(s, c, rad, spacing=r["spacings"][0])["pointing"]
            for s, c, rad in zip(r["saliencies"], r["centres"], r["radii"])]
    assert len(recs) == 16 and sum(hits) == 10  # the model card's val pointing game, 10 / 16 = 0.625


@pytest.mark.parametrize("d", [2, 3])
def test_attention_on_an_efficientnet_backbone(d):
    """The attention classifier runs on EfficientNet-Lite0 in 2D and 3D (its map at the chosen level's stride), and a
    random start never freezes its BatchNorm."""
    from medetect.models.attention import AttentionConfig, build_attention

    cfg = AttentionConfig(ndim=d, in_channels=1, backbone="efficientnet_lite0", base_width=8, norm="batch",
                          feature_level=4)
    m = build_attention(cfg)
    x = torch.randn(2, 1, *([32] * d))
    out = m(x)
    assert out["logits"].shape == (2, 2) and tuple(out["attention"].shape) == (2, *([2] * d))
    assert torch.allclose(out["attention"].flatten(1).sum(1), torch.ones(2))
    assert all(p.requires_grad for p in m.backbone.parameters())
    with pytest.raises(ValueError, match="freeze_bn"):
        AttentionConfig(backbone="efficientnet_lite0", norm="batch", freeze_bn=True).validate()
