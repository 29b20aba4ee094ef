"""The tasks by name (layer L4, runs): ``cfg.task`` -> its module. Adding a task: a module implementing
``fincast.runs.task.Task`` and one line here."""

from __future__ import annotations

from types import ModuleType

from fincast.config import FincastError
from fincast.runs import forecast, options

TASKS: dict[str, ModuleType] = {"forecast": forecast, "options": options}


def task(name: str) -> ModuleType:
    """The task module called ``name`` (a config's ``task``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise FincastError(f"task = {name!r}: no such task; tasks: {', '.join(TASKS)}") from None
