# make install | test | train MODEL=gap10k [ARGS="--epochs 1"] | evaluate | export | bench [FULL=1] | reproduce | clean
PY := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
MODEL ?= bn_gap
ARGS ?=

.PHONY: install test train evaluate export bench bench-pytest reproduce clean

install:
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt

test:
	$(PY) -m pytest

train:
	$(PY) train.py --model $(MODEL) $(ARGS)

evaluate:
	$(PY) evaluate.py --model $(MODEL) $(ARGS)

export:
	$(PY) export.py --model $(MODEL) --format all $(ARGS)

bench:
	$(PY) bench.py $(if $(FULL),--full,--quick) --json bench.json $(ARGS)

bench-pytest:
	$(PY) -m pytest tests/benchmarks -p no:cacheprovider --benchmark-autosave $(ARGS)

reproduce:
	$(PY) reproduce.py $(if $(SEEDS),--seeds $(SEEDS),) $(ARGS)

clean:
	rm -rf runs exports .pytest_cache .benchmarks __pycache__ tests/__pycache__ bench.json
