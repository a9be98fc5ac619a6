# Image of the FL server: the web process and the Celery workers run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DJANGO_SETTINGS_MODULE=fl_server.settings.production
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY . .
RUN SECRET_KEY=build ALLOWED_HOSTS=build DATABASE_URL=sqlite:////tmp/build.sqlite3 CELERY_BROKER_URL=redis://build \
    python manage.py collectstatic --noinput
RUN useradd --create-home fl && chown -R fl /app
USER fl

EXPOSE 8000
CMD ["gunicorn", "fl_server.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3", "--timeout", "600"]
