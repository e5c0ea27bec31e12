# One-command entry points. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= experiments/mnist5k_vit.py
WORKDIR ?= workdir/default
ARGS ?=
PYTEST_ARGS ?=
# Test files run in this many processes (each file's tests together, in one of them).
TEST_WORKERS ?= 2
# Which jax wheel the venv gets: cpu | cuda | tpu.
ACCELERATOR ?= cpu

.PHONY: train test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(ACCELERATOR)]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(ACCELERATOR),test]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/python -m vitcls.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# Benchmarks: every figure as a ratio measured in one run; see benchmarks/README.md.
# The comparison with timm needs torch and timm (`pip install -e ".[bench]"`; for a
# CPU-only torch add --extra-index-url https://download.pytorch.org/whl/cpu); without
# them that row says it was skipped.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

# The linter first (rules in pyproject.toml: defects, not style), then the suite.
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
