"""The one task registry: :data:`TASKS`, ``{name: Task}`` (:class:`medetect.engine.tasks.Task`), the only list of
what ``medetect train`` (the config's ``task:``), ``predict`` and ``evaluate`` (the model file's task) dispatch to.
A new task is a package below :mod:`medetect.apps` that exports a ``Task``, and one entry here."""

from __future__ import annotations

from .. import attention, detection, lineage, luna, mammo, organs
from ..engine.tasks import Task

__all__ = ["TASKS", "task_of_model", "task_named"]

TASKS: dict[str, Task] = {t.name: t for t in (detection.TASK, mammo.TASK, attention.TASK, organs.TASK, *luna.TASKS,
                                              lineage.TASK)}


def task_named(name: str, where: str = "task") -> Task:
    """The task called ``name``; an unknown name is one sentence listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"{where} must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name]


def task_of_model(loaded, source) -> Task:
    """The task that serves the model ``loaded`` (its file's recorded task), checked against its kind."""
    task = task_named(loaded.task, f"{source}: the model's task")
    if loaded.kind not in task.model_kinds:
        raise ValueError(f"{source}: a {loaded.kind!r} model cannot belong to task {task.name!r} (it holds "
                         f"{', '.join(task.model_kinds)} models)")
    return task
