# Everything runs from a local virtual environment that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: venv demo run worker test lint format migrate superuser clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

migrate: venv
	$(BIN)/python manage.py migrate --noinput

demo: venv  ## a real federated training: server + 5 participants on scikit-learn's digits (embedded profile)
	$(BIN)/python -m fl_client.demo

run: migrate  ## the server on the embedded default (SQLite, filesystem model store, in-process tasks)
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

worker: venv  ## a Celery worker with the periodic check (needs CELERY_BROKER_URL; run one with --beat per deployment)
	$(BIN)/celery -A fl_server worker --beat --loglevel=INFO

superuser: migrate
	$(BIN)/python manage.py createsuperuser

test: venv  ## the whole suite (SQLite, or PostgreSQL when DATABASE_URL is set)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
