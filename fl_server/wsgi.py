"""WSGI entry point."""

import os

from django.core.wsgi import get_wsgi_application

from fl_server_api.middleware import CompleteBodyMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fl_server.settings.embedded")
application = CompleteBodyMiddleware(get_wsgi_application())
