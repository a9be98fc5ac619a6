"""Production: everything from the environment, DEBUG off, nothing secret in the repository."""

import os

from django.core.exceptions import ImproperlyConfigured

from fl_server.settings.base import *  # noqa: F403
from fl_server.settings.base import ALLOWED_HOSTS, CELERY_BROKER_URL, MIDDLEWARE, SECRET_KEY
from fl_server.settings.env import env_bool

DEBUG = False
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set in production.")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set in production.")
if not os.environ.get("DATABASE_URL"):
    raise ImproperlyConfigured("DATABASE_URL must point to PostgreSQL in production.")
if CELERY_BROKER_URL.startswith("memory://"):
    raise ImproperlyConfigured("CELERY_BROKER_URL must name a Redis or RabbitMQ broker in production.")

# Static assets (admin, Swagger UI) served by the application server itself.
MIDDLEWARE = [MIDDLEWARE[0], "whitenoise.middleware.WhiteNoiseMiddleware", *MIDDLEWARE[1:]]

SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
