# One command each: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# The virtual environment is created on first use; VENV can point at a cached one.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
RUN ?= runs/demo
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PYTHONUNBUFFERED := 1

STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup weights demo demo-single test test-all test-gpu bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)
	@# always point the environment at this checkout (cheap; the dependencies are already there)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

weights: setup
	$(PY) -m histodiff.weights fetch

# the full story on phantom tiles: 3 unlabeled sites (own stains) pre-train the LAE and the DM in
# Flower's simulation runtime; a 4th, labeled site unseen in pre-training runs the augmentation pipeline
demo: weights
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m server.demo --out $(RUN) --lae-rounds 3 --dm-rounds 4 --local-steps 40

# the same science at one site, no federation: LAE -> latent statistics -> DM -> sample grid
demo-single: weights
	$(PY) -m histodiff.demo --out $(RUN)-single

test: setup
	@$(PY) -m histodiff.weights fetch || echo "warning: pretrained weights unavailable; tests that need them will skip"
	$(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m gpu -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.train_step --steps 20

clean:
	rm -rf runs .pytest_cache
