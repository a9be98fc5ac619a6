"""Embedded default: no services needed (SQLite, filesystem model store, in-process tasks)."""

from fl_server.settings.base import *  # noqa: F403
from fl_server.settings.base import DATA_DIR
from fl_server.settings.env import env_bool, env_list, env_str

DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env_str("SECRET_KEY", "embedded-development-key-not-for-production")
DEBUG = env_bool("DEBUG", True)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", True)
FL_OPEN_REGISTRATION = env_bool("FL_OPEN_REGISTRATION", True)
FL_INPROCESS_TASKS_ASYNC = env_bool("FL_INPROCESS_TASKS_ASYNC", True)
FL_INPROCESS_SCHEDULER = env_bool("FL_INPROCESS_SCHEDULER", True)

from fl_server.settings.base import MIDDLEWARE  # noqa: E402

MIDDLEWARE = [*MIDDLEWARE, "fl_server_ai.scheduler.InProcessSchedulerMiddleware"]
