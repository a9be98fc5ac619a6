"""The FL server Django project."""

from fl_server.celery import app as celery_app

__all__ = ["celery_app"]
