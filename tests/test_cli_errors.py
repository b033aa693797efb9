"""Every user mistake on the command line is one sentence on stderr and exit code 2 (never a traceback); --debug
shows the traceback. Regression tests for the trials of issue 14 (items 7 and 8)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medetect.cli import main
from medetect.cli.errors import run_guarded

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "medetect" / "weights"


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) >= 1
    return err


def _one_sentence(capsys, *needles: str) -> str:
    err = _err(capsys)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("usage:") and not ln.startswith(" ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("exc, needle", [
    (ValueError("cfg.yaml: data.scale must be > 0, got -1"), "data.scale"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.csv"), "x.csv"),
    (OSError(errno.ENOSPC, "No space left on device", "run/epoch_0002"), "no space left"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), "pipe"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "smaller batch"),
])
def test_user_errors_are_one_sentence_exit_2(exc, needle, capsys):
    def boom():
        raise exc

    stdout = os.dup(1)  # the BrokenPipe path points stdout at /dev/null: restore it afterwards
    try:
        assert run_guarded(boom, "medetect test") == 2
    finally:
        os.dup2(stdout, 1)
        os.close(stdout)
    line = _one_sentence(capsys, needle)
    assert line.startswith("medetect test: error: ")


def test_bug_is_one_line_exit_1_and_debug_shows_traceback(capsys):
    def bug():
        raise TypeError("unsupported operand")

    assert run_guarded(bug, "medetect test") == 1
    assert "internal error: TypeError" in _one_sentence(capsys, "--debug")
    with pytest.raises(TypeError):
        run_guarded(bug, "medetect test", debug=True)


def test_debug_flag_anywhere_reraises(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["predict", "--weights", str(tmp_path / "none.safetensors"), str(tmp_path), "--out", str(tmp_path / "o"),
              "--debug"])


@pytest.mark.parametrize("argv, needle", [
    (["phantoms", "OUT", "--scans", "-1"], "--scans"),
    (["phantoms", "OUT", "--shape", "0", "64", "64"], "--shape"),
    (["froc", "a.csv", "b.csv", "--bootstrap", "-5"], "--bootstrap"),
    (["predict", "--weights", "w.safetensors", "img.png", "--out", "o", "--tile", "0", "0"], "--tile"),
    (["predict", "--weights", "w.safetensors", "img.png", "--out", "o", "--overlap", "1.5"], "--overlap"),
    (["luna", "lung-pet-ct", "--weights", "w.safetensors"], "--root"),
    (["train", "cfg.yaml", "--threads", "0"], "--threads"),
])
def test_bad_argument_values_name_the_argument(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = _err(capsys)
    assert needle in err.strip().splitlines()[-1]


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    w = SHIPPED / "bccd_faster_rcnn.safetensors"
    assert main(["predict", "--weights", str(w), str(tmp_path), "--out", str(f)]) == 2
    _one_sentence(capsys, "--out", "file.txt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_on_cpu_build_is_one_sentence(tmp_path, capsys):
    w = SHIPPED / "bccd_faster_rcnn.safetensors"
    assert main(["predict", "--weights", str(w), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    _one_sentence(capsys, "--device cuda")
    assert main(["predict", "--weights", str(w), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "gpu0"]) == 2
    _one_sentence(capsys, "--device")


def test_missing_weights_and_missing_inputs(tmp_path, capsys):
    assert main(["predict", "--weights", str(tmp_path / "nope.safetensors"), str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    _one_sentence(capsys, "nope.safetensors")
    assert main(["froc", str(tmp_path / "ann.csv"), str(tmp_path / "pred.csv"), "--bootstrap", "0"]) == 2
    _one_sentence(capsys, "ann.csv")


def test_luna_predict_on_a_folder_without_subsets_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    w = SHIPPED / "nodule_phantom_det3d.safetensors"
    assert main(["luna", "predict", str(tmp_path / "empty"), "--weights", str(w), "--out", str(tmp_path / "s.csv")]) == 2
    _one_sentence(capsys, "no scans")
    assert not (tmp_path / "s.csv").exists()


def test_luna_predict_with_a_2d_model_names_the_kind(tmp_path, capsys):
    (tmp_path / "subset0").mkdir()
    w = SHIPPED / "bccd_faster_rcnn.safetensors"
    assert main(["luna", "predict", str(tmp_path), "--weights", str(w), "--out", str(tmp_path / "s.csv")]) == 2
    _one_sentence(capsys, "bccd_faster_rcnn.safetensors")


def test_phantoms_refuse_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    assert main(["phantoms", str(tmp_path / "d"), "--scans", "1"]) == 2
    _one_sentence(capsys, "not empty")
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_froc_into_a_closed_pipe_has_no_traceback(tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(f"S{i},0,0,0,10\n" for i in range(400)))
    pred = tmp_path / "p.csv"
    pred.write_text("seriesuid,coordX,coordY,coordZ,probability\n" + "".join(f"S{i},0,0,0,0.5\n" for i in range(400)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = (f"{sys.executable} -m medetect froc {ann} {pred} --bootstrap 0 --json --curve | "
           f"{sys.executable} -c 'import sys; sys.stdin.read(5)'")
    proc = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, env=env,
                          timeout=120)
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2)


def test_outputs_are_never_replaced_silently(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    img = tmp_path / "im.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    w = str(SHIPPED / "bccd_faster_rcnn.safetensors")
    out = tmp_path / "o"
    assert main(["predict", "--weights", w, str(img), "--out", str(out)]) == 0
    capsys.readouterr()
    before = (out / "im.csv").read_bytes()
    assert main(["predict", "--weights", w, str(img), "--out", str(out)]) == 2
    _one_sentence(capsys, "--force")
    assert (out / "im.csv").read_bytes() == before
    assert main(["predict", "--weights", w, str(img), "--out", str(out), "--force"]) == 0
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert main(["luna", "predict", str(img), "--weights", str(SHIPPED / "nodule_phantom_det3d.safetensors"),
                 "--out", str(keep)]) == 2
    _one_sentence(capsys, "--force")
    assert keep.read_text() == "mine"
    ann = tmp_path / "a.csv"
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nS,0,0,0,10\n")
    pred = tmp_path / "p.csv"
    pred.write_text("seriesuid,coordX,coordY,coordZ,probability\nS,0,0,0,0.5\n")
    assert main(["froc", str(ann), str(pred), "--bootstrap", "0", "--plot", str(tmp_path / "plot")]) == 2
    _one_sentence(capsys, ".png")
    assert main(["froc", str(ann), str(pred), "--bootstrap", "0", "--plot", str(keep)]) == 2
    assert keep.read_text() == "mine"


def test_tiles_below_the_models_smallest_input_are_refused(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    img = tmp_path / "im.png"
    Image.fromarray(np.zeros((200, 240, 3), np.uint8)).save(img)
    w = str(SHIPPED / "bccd_faster_rcnn.safetensors")
    assert main(["predict", "--weights", w, str(img), "--out", str(tmp_path / "o"), "--tile", "8"]) == 2
    _one_sentence(capsys, "--tile 8", "--tile 128")  # the model halves images: 64 model pixels = 128 input


def test_grey_image_for_a_colour_model_warns_in_one_line(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    img = tmp_path / "g.png"
    Image.fromarray((np.arange(64 * 64) % 256).reshape(64, 64).astype(np.uint8)).save(img)
    w = str(SHIPPED / "bccd_faster_rcnn.safetensors")
    with pytest.warns(UserWarning, match="one-channel image, repeated across the model's 3 channels"):
        assert main(["predict", "--weights", w, str(img), "--out", str(tmp_path / "o")]) == 0
    from medetect.cli import _format_warning

    assert _format_warning("x: y", UserWarning, "f.py", 1) == "medetect: warning: x: y\n"


def test_a_truncated_model_file_is_one_sentence_naming_it(tmp_path, capsys):
    blob = (SHIPPED / "bccd_faster_rcnn.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 24)).save(img)
    assert main(["predict", "--weights", str(cut), str(img), "--out", str(tmp_path / "out")]) == 2
    _one_sentence(capsys, f"medetect predict: error: {cut} is truncated or damaged")
