# Two commands: `make demo` (set up, then run the main job on the built-in data) and `make test`.
# The virtual environment is made with pip (torch and torchvision come from this machine kind's local disk that way;
# uv and poetry would download several GB) and is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export MRI_PLATFORM_HOME ?= $(CURDIR)/.state
export BENTOML_DO_NOT_TRACK := true
# Tests and benchmarks run in a loopback-only network namespace where the machine allows one.
ISOLATED := scripts/isolated

.PHONY: setup system-deps demo down test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mri-platform demo

# Stops what `make demo` (or `mri-platform stack up`) left running: the MLflow UI, the Bento, a local stack.
down:
	@if [ -x $(VENV)/bin/mri-platform ]; then $(VENV)/bin/mri-platform stack down; else echo "nothing to stop (no .venv)"; fi

# Debian packages the tests drive for real (Chromium, PostgreSQL); see the script.
system-deps:
	@scripts/system-deps

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(ISOLATED) $(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(ISOLATED) $(VENV)/bin/python benchmarks/train_throughput.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/report_table.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/tune_asha.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/serve_throughput.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/serve_hostile.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/serve_soak.py
	$(ISOLATED) $(VENV)/bin/python benchmarks/data_scale.py

clean:
	rm -rf $(VENV) .state
