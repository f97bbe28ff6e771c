# The two set-up commands of the README, and the pieces of the gate.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# litgpt's real model classes, for the recipe tests (tests/client/test_litgpt.py): a venv of
# their own, as litgpt pins a huggingface_hub (<1.4) that transformers 5 refuses.
LITGPT_VENV ?= .venv-litgpt
LITGPT_STAMP := $(LITGPT_VENV)/.installed

.PHONY: serve test test-fast install litgpt-env lint typecheck pytest migrations-check deploy-check constraints bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, so that nothing below can pull a CUDA build of torch.
	$(PY) -m pip install -q "torch==2.13.0"
	# The constraint keeps libraries that depend on torch (transformers) on the wheel above.
	echo "torch==2.13.0" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -e ".[dev]" -c $(VENV)/torch-constraint.txt
	touch $(STAMP)

install: $(STAMP)

$(LITGPT_STAMP):
	test -x $(LITGPT_VENV)/bin/python || python3 -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/python -m pip install -q "torch==2.13.0"
	echo "torch==2.13.0" > $(LITGPT_VENV)/torch-constraint.txt
	$(LITGPT_VENV)/bin/python -m pip install -q "litgpt==0.5.13" -c $(LITGPT_VENV)/torch-constraint.txt
	touch $(LITGPT_STAMP)

litgpt-env: $(LITGPT_STAMP)

serve: $(STAMP)
	$(VENV)/bin/statehub serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy service clients/statehub

migrations-check: $(STAMP)
	rm -f $(VENV)/alembic-check.db
	STATEHUB_DATABASE_URL=sqlite:///$(abspath $(VENV))/alembic-check.db $(VENV)/bin/alembic upgrade head
	STATEHUB_DATABASE_URL=sqlite:///$(abspath $(VENV))/alembic-check.db $(VENV)/bin/alembic check

# The image, compose file and manifests, statically (no container engine needed; offline:
# kubernetes-validate ships its schemas). `docker compose config` where compose exists.
deploy-check: $(STAMP)
	$(VENV)/bin/hadolint deploy/Dockerfile
	$(VENV)/bin/yamllint --strict docker-compose.yml deploy/k8s .yamllint.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml
	if docker compose version >/dev/null 2>&1; then \
		STATEHUB_BOOTSTRAP_TOKEN=check docker compose -f docker-compose.yml config --quiet; fi

# Pins for the image: the server's dependencies at the versions installed here.
constraints: $(STAMP)
	$(PY) deploy/constraints.py > deploy/constraints.txt

pytest: $(STAMP) $(LITGPT_STAMP)
	STATEHUB_TEST_LITGPT_PYTHON=$(abspath $(LITGPT_VENV))/bin/python $(VENV)/bin/pytest -q

test: lint typecheck migrations-check deploy-check pytest

# The inner loop: core, storage, client tables and in-process API tests, no server processes,
# browsers or large checkpoints (markers `server` and `slow`); `make test` runs everything.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not slow and not server"

bench: $(STAMP)
	$(PY) -m benchmarks.run
