# lmas: `make demo` runs the default experiment, `make test` runs `make lint` (ruff: lint + format check,
# mypy; settings in pyproject.toml) and then the tests (not `slow`, not `gpu`);
# `make test-slow` the long ones, `make test-gpu` the CUDA ones (tests/gpu; they skip without CUDA).
# Both create .venv on first use from the committed lock; a second call skips what is done.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.lmas-installed
LOCK   := requirements/lock.txt
export LMAS_CACHE ?= $(HOME)/.cache/lmas

.PHONY: venv demo lint test test-slow test-gpu clean-venv

venv: $(STAMP)

$(STAMP): $(LOCK) setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, transformers, peft, lightning, hydra, avalanche, lmas"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/lmas-train $(ARGS)

lint: venv
	$(VENV)/bin/ruff check lmas
	$(VENV)/bin/ruff format --check lmas
	$(VENV)/bin/mypy lmas

# pytest exit 5 (no test collected) counts as a failure
test: lint
	$(PY) -m pytest -m "not slow and not gpu" $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: venv
	$(PY) -m pytest -m slow $(ARGS)

# on a machine with CUDA (torch.cuda.is_available()); elsewhere every test skips with the reason
test-gpu: venv
	$(PY) -m pytest -m gpu tests/gpu $(ARGS)

clean-venv:
	rm -rf $(VENV)
