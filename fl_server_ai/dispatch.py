"""Starting tasks after the transaction that asked for them commits.

With a broker, tasks go to Celery workers. In the embedded profile (eager tasks) they run on a
background thread of the web process, or inline when `FL_INPROCESS_TASKS_ASYNC` is off (tests).
A dispatch that fails (broker down) is logged: the periodic check re-drives whatever it left
undone, so nothing is lost.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

from celery import Task
from django.conf import settings
from django.db import close_old_connections, transaction

log = logging.getLogger(__name__)


# In process, tasks that mostly wait on the network get a wider pool of their own: pushing a round's
# notifications then never waits behind an aggregation, nor one endpoint behind another.
NETWORK_TASKS = frozenset({"fl_server_ai.tasks.deliver_notifications"})


@cache
def _executor(network: bool = False) -> ThreadPoolExecutor:
    if network:
        return ThreadPoolExecutor(max_workers=8, thread_name_prefix="fl-push")
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="fl-task")


def _run_in_thread(task: Task, args: tuple[Any, ...]) -> None:
    try:
        task.apply(args=args, throw=True)
    except Exception:
        log.exception("in-process task %s%r failed", task.name, args)
    finally:
        close_old_connections()


def dispatch_now(task: Task, *args: Any) -> None:
    """Start the task now (a worker, a background thread, or inline)."""
    try:
        if settings.CELERY_TASK_ALWAYS_EAGER and settings.FL_INPROCESS_TASKS_ASYNC:
            _executor(task.name in NETWORK_TASKS).submit(_run_in_thread, task, args)
        elif settings.CELERY_TASK_ALWAYS_EAGER:
            task.apply(args=args, throw=True)
        else:
            task.apply_async(args=args)
    except Exception:
        log.exception("could not start task %s%r; the periodic check will retry", task.name, args)


def dispatch(task: Task, *args: Any) -> None:
    """Start the task once the current transaction commits."""
    transaction.on_commit(lambda: dispatch_now(task, *args))
