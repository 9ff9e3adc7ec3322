# pixelbert_dist: make install | demo | test | bench
# Everything runs from a virtualenv at .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision: exact pins, the wheels lie on this machine's disk (a looser pin pulls GB of CUDA builds)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dali,dev,demo,wandb]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch/demo.py

test: install
	$(PY) -m pytest tests -q -ra --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# every unit test, none of the slow / launcher / Slurm lanes
test-fast: install
	$(PY) -m pytest tests -q -ra -m "not slow and not launcher and not slurm"

bench: install
	bash benchmarks/run_all.sh --quick

clean:
	rm -rf $(VENV) .cache
