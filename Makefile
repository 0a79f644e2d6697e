# `make test` and `make demo` do all set-up themselves: a local virtualenv with the package and its extras, resolved
# to the newest versions setup.cfg allows (so that CI meets an upstream release the day it breaks us). The last set
# known to pass is constraints.txt: `make test VENV=.venv-pinned CONSTRAINTS=constraints.txt` installs exactly that,
# and `make constraints` records the current virtualenv's set after a green run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# SPEC §6: the CPU wheel of this torch lies on the machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
CONSTRAINTS ?=
STAMP := $(VENV)/.installed

.PHONY: test test-all test-gpu lint demo demo-base benchmark quality clean constraints versions

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) \
		"$(TORCH)" -e ".[test,train,bench,deepspeed]"
	touch $(STAMP)

# The versions a run tests, printed first in its log.
versions: $(STAMP)
	@$(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|diffusers|peft|transformers|accelerate|safetensors|huggingface.hub)=='

# Record the virtualenv's resolved set as the last known to pass (run after a green `make test`).
constraints: $(STAMP)
	{ echo "# The last set of versions known to pass make test (pip install -c constraints.txt -e .), $$(date -u +%F)."; \
	  $(BIN)/python -m pip freeze --exclude-editable 2>/dev/null | sed 's/+cpu$$//'; } > constraints.txt

lint: $(STAMP)
	$(BIN)/ruff check .

# The default suite: offline, within 15 minutes on 2 CPU cores. Tests marked `slow` need more (real-size UNet).
test: lint versions
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
