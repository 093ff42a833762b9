# gradwatch: the verbs. `make train` and `make test` set everything up on first use.
#
# Hydra overrides pass straight through: `make train optimizer=adam trainer.max_epochs=2000`.
# GNU make collects command-line assignments in MAKEOVERRIDES; we hand them to Hydra.
# `make train ARGS="optimizer=adam"` works too.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
# Optional extras for `make install`, comma-separated: EXTRAS=submitit,optuna (pyproject.toml).
EXTRAS ?=
HOST   ?= 127.0.0.1
PORT   ?= 6006
# $(call RUN_HYDRA,module,extra args): the shell (not make) splits MAKEOVERRIDES, so values with
# escaped spaces stay whole; this Makefile's own variables are dropped; `set -f`: no globbing of
# model.layer_sizes=[2,8,1].
RUN_HYDRA = @set -f; set -- $(MAKEOVERRIDES); for o do shift; case "$$o" in \
	ARGS=*|VENV=*|EXTRAS=*|HOST=*|PORT=*) ;; *) set -- "$$@" "$$o" ;; esac; done; \
	echo "$(PY) -m $(1) $$* $(2)"; $(PY) -m $(1) "$$@" $(2)

.DEFAULT_GOAL := help
.PHONY: help install train sweep test test-all zoo bench report tensorboard lint format clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  Hydra overrides pass through: make train optimizer=adam trainer.max_epochs=2000"

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on local disk, never a CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv, install gradwatch (editable), dev tools; EXTRAS=submitit,optuna
ifneq ($(strip $(EXTRAS)),)
	$(PY) -m pip install -q -e '.[dev,$(strip $(EXTRAS))]'
endif

train: $(STAMP) ## train (default: the tutorial's XOR run); Hydra overrides pass through
	$(call RUN_HYDRA,gradwatch.train,$(ARGS))

sweep: $(STAMP) ## Hydra multirun: which optimizer solves XOR? (ARGS="..." for any other sweep)
	$(call RUN_HYDRA,gradwatch.train --multirun,$(or $(strip $(ARGS)),experiment=xor_sweep))

test: $(STAMP) ## run the fast tests (slow ones excluded)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q

zoo: $(STAMP) ## broken and healthy trainings: does the monitor name each bug right? (ARGS="dead" for some)
	$(PY) -m gradwatch.zoo $(ARGS)

bench: $(STAMP) ## benchmark gradwatch against plain PyTorch and other tools
	$(PY) scripts/bench.py $(ARGS)

report: $(STAMP) ## tables and plots from run directories: make report ARGS="outputs/..."
	$(PY) -m gradwatch.report $(ARGS)

# gradwatch.board: TensorBoard's server without its notes on TensorFlow and its fast data loader.
tensorboard: $(STAMP) ## serve every run under outputs/ on 127.0.0.1:6006 (HOST=, PORT= to change)
	$(PY) -m gradwatch.board --logdir outputs --host $(HOST) --port $(PORT)

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

clean: ## remove caches and build leftovers (keeps outputs/ and .venv)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
