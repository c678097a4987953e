"""Synthetic sequence tasks. A new task is one module here (a :class:`Task` subclass under
``@register``), one import below, a schema in ``lstmlab.config`` and ``conf/task/<name>.yaml``."""

from lstmlab.tasks import adding, copying  # noqa: F401  (importing registers the tasks)
from lstmlab.tasks.base import TASKS, Task, derive_seed, make_task, register

__all__ = ["TASKS", "Task", "derive_seed", "make_task", "register"]
