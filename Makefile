# rbvl: `make demo` runs the whole R&B slice on the CPU; `make test` runs the test suite.
# Both create the virtual environment (.venv) on first use.

VENV   ?= .venv
PY     := $(VENV)/bin/python
RBVL   := $(VENV)/bin/rbvl
DEMO   ?= demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/pytest -q --durations=15

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

demo: install
	$(PY) -m data_tools.make_demo $(DEMO)/data --overwrite
	$(VENV)/bin/rbvl-regroup --input $(DEMO)/data/train.json --eval $(DEMO)/data/eval.json \
	    --embedder open_clip:rbvl-tiny --k 3,4,5,6,8 --out $(DEMO)/shards --overwrite
	rm -rf $(DEMO)/runs  # the demo's own runs: a second `make demo` trains afresh
	$(RBVL) train recipes/demo_tiny_rnb.yaml manifest=$(DEMO)/shards/manifest.json output_dir=$(DEMO)/runs/rnb
	$(RBVL) train recipes/demo_tiny_rnb.yaml mixing.strategy=stratified \
	    manifest=$(DEMO)/shards/manifest.json output_dir=$(DEMO)/runs/stratified
	$(RBVL) compare $(DEMO)/runs/stratified $(DEMO)/runs/rnb

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DEMO) runs .pytest_cache
