# Plain targets over the scripts; `make` alone lists them.
PY := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
MODEL ?= bn_gap
ARGS ?=

.PHONY: help install test train evaluate export serve bench bench-pytest reproduce figures pretrained docs gpu-check clean
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install:  ## python3 -m venv .venv, then pip install -r requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt

test:  ## the test suite (what CI runs): two xdist workers, one torch thread each
	$(PY) -m pytest -n 2

train:  ## train MODEL (default bn_gap) with its recipe; ARGS="--epochs 1" etc.
	$(PY) train.py --model $(MODEL) $(ARGS)

evaluate:  ## evaluate MODEL's latest best checkpoint (else pretrained/) on the test set
	$(PY) evaluate.py --model $(MODEL) $(ARGS)

export:  ## export MODEL to every format, each verified on all test images
	$(PY) export.py --model $(MODEL) --format all $(ARGS)

serve:  ## the drawing page for MODEL on http://127.0.0.1:8000/ (predict.py --serve)
	$(PY) predict.py --serve --model $(MODEL) $(ARGS)

bench:  ## quick speed table (gap10k, CPU); FULL=1: every model on every device
	$(PY) bench.py $(if $(FULL),,--quick) --json bench.json $(ARGS)

bench-pytest:  ## pytest-benchmark inference micro-benchmarks
	$(PY) -m pytest tests/benchmarks -p no:cacheprovider --benchmark-autosave $(ARGS)

reproduce:  ## train every recipe over SEEDS seeds, then write REPRODUCTION.md, figures/ and the README table
	$(PY) reproduce.py $(if $(SEEDS),--seeds $(SEEDS),) $(ARGS)

figures:  ## no training: REPRODUCTION.md, figures/, README's results table from results/ (not pretrained/)
	$(PY) reproduce.py --no-train $(ARGS)

pretrained:  ## pretrained/<model>.pt from each recipe's seed-1 best.pt in results/, once checked as full runs
	$(PY) reproduce.py --publish-pretrained $(ARGS)

docs:  ## regenerate the --help blocks and tables in docs/ (cog; tests/test_docs.py checks they are current)
	$(PY) -m cogapp -r -I docs docs/*.md

gpu-check:  ## the prepared one-shot GPU run, packed into ARCHIVE (default gpu-check.tar.gz); REHEARSE=1: on the CPU
	bash gpu_check.sh $(or $(ARCHIVE),gpu-check.tar.gz) $(if $(REHEARSE),--rehearse,)

clean:  ## remove runs, exports, benchmark output and caches
	rm -rf runs exports .pytest_cache .benchmarks __pycache__ tests/__pycache__ bench.json
