"""Checkpoints as safetensors + JSON, written atomically; never unpickled.

A checkpoint is a folder ``epoch_NNNN/`` holding ``model.safetensors``, ``optimizer.safetensors`` (the optimizer's
tensors, keyed ``state.<param>.<name>``) and ``state.json`` (epoch, step, optimizer scalars and param groups,
scheduler state, RNG states, metrics, config). It is written as ``epoch_NNNN.tmp/`` and renamed into place (atomic on
POSIX), then ``last.json`` is replaced atomically to point at it. A run killed at any moment leaves the previous
checkpoint intact and loadable; at most the current epoch is lost. A write that fails (e.g. a full disk) removes its
temporary folder and raises one ``OSError`` sentence saying that the previous checkpoint is intact.

Damage done later (a truncated copy, a full disk under another program) is caught when reading:
:func:`latest_checkpoint` validates each candidate (:func:`checkpoint_problem`: ``state.json`` parses, each
safetensors header agrees with its file's size), warns naming each damaged file and returns the newest intact one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..files import write_atomically, write_text_atomically
from ..models.io import check_safetensors_file, load_state, read_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_problem", "save_weights",
           "CheckpointWarning"]


class CheckpointWarning(UserWarning):
    """A damaged checkpoint (or pointer) was skipped in favour of an older intact one."""


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Model weights to one safetensors file (atomically). ``dtype`` (e.g. float16 for shipped models) converts the
    floating-point tensors; loading copies them back into the model's own dtype."""
    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    write_atomically(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


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
    current = _pointer_target(run_dir)
    try:
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
        os.chmod(tmp / "optimizer.safetensors", 0o644)
        write_text_atomically(tmp / "state.json", json.dumps(state, indent=1, default=float))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # free what the partial checkpoint took
        kept = f"the previous checkpoint {current} is intact" if current else "there is no previous checkpoint"
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{e.strerror or e}"
        err = OSError(f"could not write checkpoint epoch {epoch} to {run_dir} ({what}); {kept}")
        err.errno = e.errno  # callers may still test for ENOSPC; str(err) stays one sentence
        raise err from e
    if final.exists() and final.name == current:
        # Re-saving the epoch that last.json points at: write beside it so that a crash now still leaves it loadable.
        final = run_dir / f"{final.name}_{step:08d}"
    if final.exists():
        shutil.rmtree(final)  # a stale folder nothing points at (e.g. from a crash before last.json moved)
    os.replace(tmp, final)
    write_text_atomically(run_dir / "last.json", json.dumps({"checkpoint": final.name, "epoch": epoch, "step": step}))
    # Damaged folders (e.g. the truncated checkpoint a resume skipped) are pruned before intact ones, oldest first.
    old = sorted((p for p in _checkpoint_dirs(run_dir) if p != final), key=lambda p: (checkpoint_problem(p) is None, p.name))
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _pointer_target(run_dir: Path) -> str | None:
    try:
        name = json.loads((Path(run_dir) / "last.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name and "/" not in name and name not in (".", "..") else None


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (missing, header unreadable, size disagreeing with the
    header's data offsets), or None. Reads only the header, so it is cheap for large files."""
    if not path.is_file():
        return "is missing"
    try:
        check_safetensors_file(path)
    except ValueError:
        return "is truncated or corrupt"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, as ``"<file> is truncated or corrupt"``, or None
    when it is intact: ``state.json`` parses and names its epoch and step, and both safetensors files are complete."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["epoch"]), int(state["step"])
    except FileNotFoundError:
        return f"{path / 'state.json'} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / 'state.json'} is truncated or corrupt"
    for name in ("model.safetensors", "optimizer.safetensors"):
        why = _safetensors_problem(path / name)
        if why:
            return f"{path / name} {why}"
    return None


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (``epoch_0004_00000020`` is a re-save after ``epoch_0004``)."""
    return sorted((p for p in run_dir.glob("epoch_[0-9][0-9][0-9][0-9]*") if p.is_dir() and not p.name.endswith(".tmp")),
                  key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest INTACT checkpoint folder of ``run_dir`` (see :func:`checkpoint_problem`), or None when the run has
    none yet (no ``last.json`` and no checkpoint folder).

    The folder ``last.json`` points at comes first; when it (or the pointer) is damaged, e.g. a truncated
    ``model.safetensors``, a warning names the bad file and the next older intact folder is used. With checkpoints
    but none intact: ``ValueError`` naming the run folder.
    """
    run_dir = Path(run_dir)
    ptr = run_dir / "last.json"
    folders = _checkpoint_dirs(run_dir)
    if not ptr.is_file() and not folders:
        return None
    problems = []
    target = _pointer_target(run_dir)
    if ptr.is_file() and target is None:
        problems.append(f"{ptr} is corrupt")
    candidates = folders
    if target is not None:
        first = run_dir / target
        # only folders older than the pointed-at one: a newer one nothing points at is a save interrupted before last.json moved
        candidates = [first] + [p for p in folders if p.name < target]
    elif not ptr.is_file():
        problems.append(f"{ptr} is missing")
    for cand in candidates:
        why = checkpoint_problem(cand) if cand.is_dir() else f"{cand} is missing"
        if why is None:
            for p in problems:
                warnings.warn(f"{p}; using the newest intact checkpoint, {cand.name}", CheckpointWarning, stacklevel=2)
            return cand
        problems.append(why)
    raise ValueError(f"{run_dir} holds no intact checkpoint ({'; '.join(problems)}): start the run afresh with --overwrite")


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state (epoch, step, metrics, config)."""
    path = Path(path)
    load_state(model, path / "model.safetensors")
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path / 'state.json'} is truncated or corrupt ({e})") from e
    tensors, _ = read_tensors(path / "optimizer.safetensors")
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
