"""Synthetic sequence tasks. A new task is one module here (a :class:`Task` subclass under
``@register``), one import below, a schema in ``lstmlab.runner.config`` and ``conf/task/<name>.yaml``."""

from lstmlab.runner.tasks import adding, copying, hmm_tagging, reber, temporal_order  # noqa: F401  (registers them)
from lstmlab.runner.tasks.base import TASKS, Task, derive_seed, make_task, register

from . import charlm, digits, forecast, mnist1d  # noqa: F401  (data sets: pip install lstmlab[data])

__all__ = ["TASKS", "Task", "derive_seed", "make_task", "register"]
