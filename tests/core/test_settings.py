"""Settings profiles and migrations."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "fl_server.settings.production",
    "SECRET_KEY": "test-secret",
    "ALLOWED_HOSTS": "fl.example.org",
    "DATABASE_URL": "postgres://fl:pw@db.invalid:5432/fl",
    "CELERY_BROKER_URL": "redis://redis.invalid:6379/0",
    "FL_MODEL_STORE": "s3",
    "FL_S3_BUCKET": "models",
}
PRINT_SETTINGS = (
    "import django; from django.conf import settings; django.setup(); "
    "print(settings.DEBUG, settings.DATABASES['default']['ENGINE'], settings.CELERY_BROKER_URL, "
    "settings.FL_OPEN_REGISTRATION, settings.FL_MODEL_STORE['BACKEND'], settings.ALLOWED_HOSTS)"
)


def run_profile(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Load the settings in a fresh interpreter with exactly this environment (plus PATH)."""
    clean = {"PATH": os.environ["PATH"], **env}
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def test_production_reads_everything_from_the_environment():
    result = run_profile(PRODUCTION_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:5] == [
        "False",
        "django.db.backends.postgresql",
        "redis://redis.invalid:6379/0",
        "False",
        "s3",
    ]
    assert "fl.example.org" in result.stdout


@pytest.mark.parametrize("missing", ["SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL"])
def test_production_refuses_to_start_without_required_variables(missing):
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != missing}
    result = run_profile(env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and missing in result.stderr


def test_embedded_profile_needs_no_services(tmp_path):
    result = run_profile({"DJANGO_SETTINGS_MODULE": "fl_server.settings.embedded", "FL_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:5] == ["True", "django.db.backends.sqlite3", "memory://", "True", "filesystem"]


@pytest.mark.django_db
def test_migrations_match_the_models():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
