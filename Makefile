# `make test` and `make demo` do all set-up themselves: a local virtualenv with the package and its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# SPEC §6: the CPU wheel of this torch lies on the machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-all test-gpu lint demo demo-base benchmark quality clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test,train,bench]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The default suite: offline, within 15 minutes on 2 CPU cores. Tests marked `slow` need more (real-size UNet).
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

test-all: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The tests marked `cuda`, on a machine with a GPU, in its own Python (whose torch is a CUDA build; the virtualenv above
# pins the CPU wheel): pip install -e . there first.
test-gpu:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m cuda -q -p no:cacheprovider

# DreamBooth-SaRA end to end on the embedded tiny base (CPU, offline): writes demo/output/grid.png.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m demo.run_demo

# Rebuild the demo's pre-trained base (about 17 minutes on 2 CPU cores); the repository ships its result.
demo-base: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m demo.build_demo_base --output_dir demo/base

# SaRA against its peers on SD 1.5's UNet architecture at the paper's 50M (about 15 minutes on 2 CPU cores), then the
# plot of every saved setting. docs/benchmarks.md has the commands of the 20M, 5M and batch-4 runs.
benchmark: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.benchmark --model sd15 --batch-size 1 --latent-size 32 --steps 3 \
		--target-fraction 0.058 --methods frozen,full,sara,masked_dense,lora_attention,lora_matched,supertuning,shira \
		--output docs/benchmark_sd15_peers.json
	$(BIN)/python -m benchmarks.benchmark --plot docs/benchmark_sd15_peers.png --from-json docs/benchmark_sd15_peers.json \
		docs/benchmark_sd15_peers_20m.json docs/benchmark_sd15_peers_5m.json docs/benchmark_sd15_peers_batch4.json

# Target fit against prior drift on the demo's tiny base (about 50 minutes on 2 CPU cores): docs/quality/.
quality: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.quality_study --output_dir docs/quality

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
