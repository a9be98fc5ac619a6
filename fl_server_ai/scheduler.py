"""The periodic check in process, for the embedded profile (production uses Celery beat)."""

import logging
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse

log = logging.getLogger(__name__)
_started = threading.Event()
_lock = threading.Lock()


def _loop() -> None:
    from fl_server_ai.tasks import tick

    while True:
        try:
            tick()
        except Exception:
            log.exception("periodic check failed")
        finally:
            close_old_connections()
        threading.Event().wait(settings.FL_TICK_SECONDS)


def start_scheduler() -> bool:
    """Start the background check once per process; False if it was already running."""
    with _lock:
        if _started.is_set():
            return False
        threading.Thread(target=_loop, name="fl-scheduler", daemon=True).start()
        _started.set()
        return True


class InProcessSchedulerMiddleware:
    """Starts the in-process check with the first request when `FL_INPROCESS_SCHEDULER` is on."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Make sure the check runs, then handle the request."""
        if settings.FL_INPROCESS_SCHEDULER and not _started.is_set():
            start_scheduler()
        return self.get_response(request)
