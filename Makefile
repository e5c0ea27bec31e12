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

.PHONY: train test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(ACCELERATOR)]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[$(ACCELERATOR),test]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/python -m vitcls.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
