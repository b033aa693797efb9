"""The run folder before training starts: never mix two runs, never delete one, never resume silently with another config.

Every training entry point calls :func:`prepare_run_dir` once, before building its trainer:

* an empty or new folder: the config is written (``config.json``, atomically) and training starts;
* a folder that already holds anything, without ``resume``: refused (one sentence saying what is there and which
  option continues or moves it aside);
* ``overwrite``: the folder is renamed to ``RUN.old-<UTC time>`` (nothing is deleted) and a fresh one is made;
* ``resume`` with a config that differs from the run's: refused, naming the first differing keys as dotted paths
  (``train.lr: 0.01 -> 0.02``), unless ``allow_config_change``, which appends the change to
  ``RUN/config_changes.jsonl`` (time, resumed epoch, the diff) and then replaces the config file;
* ``resume`` of a folder without a checkpoint starts at epoch 0 and says so; one whose checkpoints are all damaged is
  refused before anything changes (:func:`~medetect.engine.checkpoint.latest_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from ..files import read_json, write_text_atomically
from .checkpoint import CheckpointWarning, latest_checkpoint

__all__ = ["prepare_run_dir", "config_diff", "describe_diff"]

logger = logging.getLogger(__name__)

_ABSENT = "<absent>"  # how a key missing on one side of a config diff is shown


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and scalars are leaves (an empty dict is a leaf too)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(old: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """The differing leaves of two JSON-like configs as ``(dotted.key, old, new)``, in the order of ``old``'s keys
    then ``new``'s; a key present on one side only shows ``"<absent>"`` on the other. With ``defaults`` (the config
    schema's default values), a key the old run's config lacks -- one a later medetect added -- is no change when its
    new value is that default."""
    a, b = _flatten(_as_json(old)), _flatten(_as_json(new))
    d = _flatten(_as_json(defaults)) if defaults else {}
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)
            and not (k not in a and k in d and d[k] == b[k])]


def describe_diff(diff: list[tuple[str, Any, Any]], most: int = 5) -> str:
    """The first ``most`` changes of :func:`config_diff` as ``key: old -> new``, for a one-sentence refusal."""
    shown = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diff[:most])
    return shown + (f" and {len(diff) - most} more" if len(diff) > most else "")


def _as_json(config: dict) -> dict:
    """The config as it reads back from its JSON file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(config))


def _describe(run_dir: Path, config_name: str) -> str:
    """What a non-empty run folder holds, for the refusal message."""
    parts = []
    if (run_dir / config_name).is_file():
        parts.append(config_name)
    try:
        ptr = json.loads((run_dir / "last.json").read_text())
        parts.append(f"last checkpoint epoch {int(ptr['epoch'])}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if parts:
        return f"a training run ({', '.join(parts)})"
    names = sorted(p.name for p in run_dir.iterdir())
    return f"{len(names)} other file(s) (e.g. {names[0]})"


def _move_aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():  # two overwrites within one second
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    os.replace(run_dir, dest)
    return dest


def prepare_run_dir(
    run_dir: str | Path,
    config: dict,
    *,
    resume: bool,
    overwrite: bool = False,
    allow_config_change: bool = False,
    config_name: str = "config.json",
    defaults: dict | None = None,
) -> Path | None:
    """Make ``run_dir`` ready for a training run with ``config`` (a JSON-serialisable dict) and write it to
    ``run_dir/config_name``; see the module docstring for the rules. Returns the folder an existing run was moved to
    (``overwrite``), else None.

    Under torchrun only rank 0 (``RANK``) acts; the other ranks return None at once.

    Raises ``ValueError`` (one sentence naming the folder and the option to pass) when the folder already holds
    something and neither ``resume`` nor ``overwrite`` is given, when both are given, or when a resumed run's config
    differs and ``allow_config_change`` is not given.
    """
    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # under torchrun only rank 0 checks and writes the folder (the other ranks never write to it)
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pass --resume to continue a run or --overwrite to "
                         "start afresh, not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder: pass another --run-dir")
    moved = None
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not resume:
        if not overwrite:
            raise ValueError(
                f"{run_dir} already holds {_describe(run_dir, config_name)}: pass --resume to continue it or "
                f"--overwrite to move it aside"
            )
        moved = _move_aside(run_dir)
        logger.warning("moved the existing run folder %s to %s; starting a fresh run", run_dir, moved)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=1)
    cfg_path = run_dir / config_name
    if resume:
        with warnings.catch_warnings():  # the trainer's resume warns about damaged checkpoints; once is enough
            warnings.simplefilter("ignore", CheckpointWarning)
            ckpt = latest_checkpoint(run_dir)  # a run without any intact checkpoint fails here, before any change
        epoch = int(json.loads((ckpt / "state.json").read_text())["epoch"]) if ckpt is not None else 0
        if ckpt is None:
            logger.warning("%s holds no checkpoint yet: --resume starts this run at epoch 0", run_dir)
        if cfg_path.is_file():
            old = read_json(cfg_path, "fix or remove it to resume this run")
            diff = config_diff(old, config, defaults)
            if diff and not allow_config_change:
                raise ValueError(
                    f"the config differs from the one {run_dir} was trained with ({describe_diff(diff)}): resume "
                    f"with the same config, or pass --allow-config-change to record the change and continue"
                )
            if diff:
                record = {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "resumed_epoch": epoch,
                    "changes": [{"key": k, "old": a, "new": b} for k, a, b in diff],
                }
                with open(run_dir / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                logger.warning("%s: resuming at epoch %d with a changed config (%d keys; recorded in config_changes.jsonl)",
                               run_dir, epoch, len(diff))
            else:
                return moved  # same config: the file stays as it is
    write_text_atomically(cfg_path, text)
    return moved
