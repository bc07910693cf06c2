# proxykd: `make proxy && make student` runs the main job, `make test` the tests.
# Every variable below can be overridden on the command line, e.g. `make proxy DEVICE=cuda`.

PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU wheel of torch; set TORCH=torch (or a CUDA index) on a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: help venv dev test proxy student table smoke bench clean

# List the targets with the comment above each.
help:
	@awk '/^# /{c=substr($$0,3); next} /^[a-z]+:/{if(c!="")printf "  %-8s %s\n",substr($$1,1,length($$1)-1),c} {c=""}' Makefile

# Create .venv with the runtime requirements (torch first, as the CPU wheel, where none is present).
venv: $(VENV)/.runtime
$(VENV)/.runtime: requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

# Add the test-only requirements (transformers as the model's reference, pytest, hypothesis, matplotlib).
dev: $(VENV)/.dev
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

# Run the test suite (CPU; GPU tests skip themselves).
test: $(VENV)/.dev
	$(PYTHON) -m pytest tests

# Stage 1: build the world, pretrain the bases, collect teacher data, align the proxy (not built yet).
proxy: $(VENV)/.runtime
	@echo "make proxy: not built yet (issue 6/8)"; exit 1

# Stage 2: distil the student from the aligned proxy and the teacher's text (not built yet).
student: $(VENV)/.runtime
	@echo "make student: not built yet (issue 6/8)"; exit 1

# Remove everything runs/ holds (the venv stays).
clean:
	rm -rf runs
