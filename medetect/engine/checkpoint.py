"""Checkpoints as safetensors + JSON, written atomically; never unpickled.

A checkpoint is a folder ``epoch_NNNN/`` holding ``model.safetensors``, ``optimizer.safetensors`` (the optimizer's
tensors, keyed ``state.<param>.<name>``) and ``state.json`` (epoch, step, optimizer scalars and param groups,
scheduler state, RNG states, metrics, config). It is written as ``epoch_NNNN.tmp/`` and renamed into place (atomic on
POSIX), then ``last.json`` is replaced atomically to point at it. A run killed at any moment leaves the previous
checkpoint intact and loadable; at most the current epoch is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_weights", "save_weights", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Model weights to one safetensors file (atomically). ``dtype`` (e.g. float16 for shipped models) converts the
    floating-point tensors; loading copies them back into the model's own dtype."""
    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> dict[str, str]:
    """Load safetensors weights into ``model``; returns the file's metadata. Shape mismatches name the tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights must be a .safetensors file (pickled checkpoints are never loaded)")
    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; does the config match the weights?")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return meta


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    js = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, js


def save_checkpoint(run_dir: Path, *, epoch: int, step: int, model, optimizer=None, scheduler=None, metrics=None, config=None, keep: int = 2) -> Path:
    """Write ``run_dir/epoch_{epoch:04d}/`` atomically and point ``run_dir/last.json`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"epoch_{epoch:04d}"
    tmp = run_dir / f"epoch_{epoch:04d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    state: dict[str, Any] = {"epoch": epoch, "step": step, "metrics": metrics or {}, "config": config or {}}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        osd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in osd["state"].items():
            for name, val in st.items():
                if isinstance(val, torch.Tensor):
                    opt_tensors[f"state.{pid}.{name}"] = val.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[name] = val
        state["optimizer"] = {"param_groups": osd["param_groups"], "scalars": scalars}
    if scheduler is not None:
        state["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if not callable(v) and k != "lr_lambdas"}
    rng_t, rng_js = _rng_state()
    opt_tensors.update(rng_t)
    state["rng"] = rng_js
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1, default=float))
    current = _pointer_target(run_dir)
    if final.exists() and final.name == current:
        # Re-saving the epoch that last.json points at: write beside it so that a crash now still leaves it loadable.
        final = run_dir / f"{final.name}_{step:08d}"
    if final.exists():
        shutil.rmtree(final)  # a stale folder nothing points at (e.g. from a crash before last.json moved)
    os.replace(tmp, final)
    atomic_write_text(run_dir / "last.json", json.dumps({"checkpoint": final.name, "epoch": epoch, "step": step}))
    old = sorted(p for p in run_dir.glob("epoch_[0-9][0-9][0-9][0-9]*") if p.is_dir() and p != final and not p.name.endswith(".tmp"))
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _pointer_target(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "last.json").read_text())["checkpoint"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``last.json`` points at, or None when the run has no complete checkpoint."""
    ptr = Path(run_dir) / "last.json"
    if not ptr.is_file():
        return None
    try:
        name = json.loads(ptr.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{ptr}: corrupt checkpoint pointer ({e}); delete it to start over") from e
    path = Path(run_dir) / name
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{ptr} points at {path}, which has no state.json")
    return path


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state (epoch, step, metrics, config)."""
    path = Path(path)
    load_weights(model, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    if optimizer is not None and "optimizer" in state:
        opt_state: dict[int, dict[str, Any]] = {}
        for key, val in tensors.items():
            if key.startswith("state."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = val
        for pid, sc in state["optimizer"]["scalars"].items():
            opt_state.setdefault(int(pid), {}).update(sc)
        # JSON turns tuples (Adam's betas) into lists: give them back the types the optimizer's own groups have.
        groups = [
            {k: tuple(v) if isinstance(v, list) and isinstance(own.get(k), tuple) else v for k, v in saved.items()}
            for saved, own in zip(state["optimizer"]["param_groups"], optimizer.param_groups)
        ]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None and "scheduler" in state:
        sd = scheduler.state_dict()
        sd.update(state["scheduler"])
        scheduler.load_state_dict(sd)
    if restore_rng:
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        npst = state["rng"]["numpy"]
        np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    return state
