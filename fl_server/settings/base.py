"""Settings shared by every profile. Values come from the environment where they vary."""

from pathlib import Path

import dj_database_url

from fl_server.settings.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(env_str("FL_DATA_DIR", str(BASE_DIR / "var")))

SECRET_KEY = env_str("SECRET_KEY")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "fl_server_core",
    "fl_server_ai",
    "fl_server_api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "fl_server_api.middleware.UploadSizeLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fl_server.urls"
SESSION_ENGINE = "fl_server_api.sessions"
WSGI_APPLICATION = "fl_server.wsgi.application"
AUTH_USER_MODEL = "fl_server_core.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Concurrent uploads: writers queue for the lock (IMMEDIATE + busy timeout) instead of failing at once
    # when a read transaction upgrades to a write; WAL lets readers go on while one writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 30, "init_command": "PRAGMA journal_mode=WAL;"}
    )

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "fl_server_api.authentication.TokenAuthentication",
        "fl_server_api.authentication.BasicOrTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "fl_server_api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "fl_server_api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "FL server API",
    "DESCRIPTION": "Federated learning server: users, models, trainings and inference.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets are served by the server itself (no CDN).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Celery: the broker is Redis or RabbitMQ in production; tasks run in process when eager.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "") or None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# Model store: where weights live (never in database rows).
FL_MODEL_STORE = {
    "BACKEND": env_str("FL_MODEL_STORE", "filesystem"),
    "OPTIONS": {
        "root": env_str("FL_MODEL_STORE_PATH", str(DATA_DIR / "model-store")),
        "bucket_name": env_str("FL_S3_BUCKET", ""),
        "endpoint_url": env_str("FL_S3_ENDPOINT_URL", "") or None,
        "region_name": env_str("FL_S3_REGION", "") or None,
        "access_key": env_str("AWS_ACCESS_KEY_ID", "") or None,
        "secret_key": env_str("AWS_SECRET_ACCESS_KEY", "") or None,
        "location": env_str("FL_S3_PREFIX", ""),
    },
}

# Largest accepted request body (uploads); larger requests get 413.
FL_MAX_UPLOAD_BYTES = env_int("FL_MAX_UPLOAD_BYTES", 2 * 1024**3)
# Uploaded files above this size are spooled to disk instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024**2
DATA_UPLOAD_MAX_MEMORY_SIZE = None  # bounded by FL_MAX_UPLOAD_BYTES instead
DATA_UPLOAD_MAX_NUMBER_FIELDS = 100_000
# Anonymous `POST /api/users/` allowed (otherwise staff only).
FL_OPEN_REGISTRATION = env_bool("FL_OPEN_REGISTRATION", False)
# Trusted deployments only: accept pickled torch.nn.Module global models.
FL_ALLOW_PICKLED_MODELS = env_bool("FL_ALLOW_PICKLED_MODELS", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# Training orchestration.
# Notifications: signed with this secret (give it to clients that verify X-FL-Signature).
FL_NOTIFICATION_SECRET = env_str("FL_NOTIFICATION_SECRET", "")
FL_NOTIFICATION_TIMEOUT_SECONDS = float(env_str("FL_NOTIFICATION_TIMEOUT_SECONDS", "10"))
FL_NOTIFICATION_MAX_ATTEMPTS = env_int("FL_NOTIFICATION_MAX_ATTEMPTS", 8)
FL_NOTIFICATION_BACKOFF_SECONDS = float(env_str("FL_NOTIFICATION_BACKOFF_SECONDS", "1"))
# Period of the check that closes overdue rounds and retries deliveries (Celery beat, or in process).
FL_TICK_SECONDS = float(env_str("FL_TICK_SECONDS", "2"))
# A round left CLOSING this long (its worker died) is aggregated again.
FL_CLOSING_RETRY_SECONDS = float(env_str("FL_CLOSING_RETRY_SECONDS", "30"))
# Global weight versions kept per model (0: all).
FL_WEIGHT_VERSIONS_KEEP = env_int("FL_WEIGHT_VERSIONS_KEEP", 0)
# Embedded profile: run tasks on a background thread (not in the request) and the periodic check in process.
FL_INPROCESS_TASKS_ASYNC = env_bool("FL_INPROCESS_TASKS_ASYNC", False)
FL_INPROCESS_SCHEDULER = env_bool("FL_INPROCESS_SCHEDULER", False)

# Orphaned model-store objects (left by crashed processes) older than this are deleted hourly.
FL_SWEEP_GRACE_SECONDS = env_int("FL_SWEEP_GRACE_SECONDS", 6 * 3600)

CELERY_BEAT_SCHEDULE = {
    "fl-tick": {"task": "fl_server_ai.tasks.tick", "schedule": FL_TICK_SECONDS},
    "fl-sweep-model-store": {"task": "fl_server_ai.tasks.sweep_model_store", "schedule": 3600.0},
}
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)}

# Inference: largest accepted input (number of values); inputs above the worker threshold run on a worker.
FL_INFERENCE_MAX_ELEMENTS = env_int("FL_INFERENCE_MAX_ELEMENTS", 10_000_000)
FL_INFERENCE_WORKER_THRESHOLD = env_int("FL_INFERENCE_WORKER_THRESHOLD", 1_000_000)
FL_INFERENCE_TIMEOUT_SECONDS = env_int("FL_INFERENCE_TIMEOUT_SECONDS", 300)
