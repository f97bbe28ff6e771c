# The two set-up commands of the README, and the pieces of the gate.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test install lint typecheck pytest migrations-check bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, so that nothing below can pull a CUDA build of torch.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/statehub serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy service/core clients/statehub

migrations-check: $(STAMP)
	rm -f $(VENV)/alembic-check.db
	STATEHUB_DATABASE_URL=sqlite:///$(abspath $(VENV))/alembic-check.db $(VENV)/bin/alembic upgrade head
	STATEHUB_DATABASE_URL=sqlite:///$(abspath $(VENV))/alembic-check.db $(VENV)/bin/alembic check

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck migrations-check pytest

bench: $(STAMP)
	$(PY) -m benchmarks.run
