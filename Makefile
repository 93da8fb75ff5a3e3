# codetune — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a GPU user installs their CUDA torch into the venv first (see README).
TORCH ?= torch==2.13.0
REPO ?=
MODEL ?=
ARGS ?=
RUN ?=
RUNS ?=
PROMPT ?=
RUN_NAME ?=
OUT ?=
TO ?=
CONFIG ?= configs/training_config.yaml
MODEL_ARG := $(if $(MODEL),--model.name_or_path $(MODEL),)
NAME_ARG := $(if $(RUN_NAME),--run_name $(RUN_NAME),)

.PHONY: help install demo inspect compare plan prepare train train-rust resume generate merge export tensorboard test bench gpu-check embedded-model clean clean-runs

help: ## List every target
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: REPO=path MODEL=hub-id-or-dir ARGS='--trainer.max_epochs=2' RUN=runs/<name> RUNS='runs/a runs/b' RUN_NAME=name OUT=dir TO=ollama CONFIG=file PROMPT='fn process'"

install: $(VENV)/.installed ## Create .venv and install codetune with pinned versions (torch first)

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: install ## Tune the embedded model on this project's own source with LoRA, on CPU (about 2.5 minutes)
	@$(PY) -m codetune fit --config configs/training_config.yaml --config configs/presets/demo.yaml \
		--data.repo . $(NAME_ARG) $(ARGS)

inspect: install ## Language mix, skipped files and the config to use: make inspect REPO=~/code/project
	@test -n "$(REPO)" || { echo "make inspect: set REPO=path/to/your/repository"; exit 2; }
	@$(PY) -m codetune inspect "$(REPO)" $(ARGS)

compare: install ## Metrics and config differences of runs: make compare RUNS="runs/a runs/b" [ARGS=--json]
	@test -n "$(RUNS)" || { echo 'make compare: set RUNS="runs/a runs/b" (run directories or manifest files)'; exit 2; }
	@$(PY) -m codetune compare $(RUNS) $(ARGS)

plan: install ## VRAM plan of a config (reads config.json only): make plan CONFIG=... [MODEL=dir-or-id] [ARGS='--vram 6GiB --json']
	@$(PY) -m codetune plan --config $(CONFIG) $(MODEL_ARG) $(ARGS)

prepare: install ## Only scan, tokenize and pack into OUT: make prepare REPO=... OUT=dir [CONFIG=...] [MODEL=...]
	@test -n "$(REPO)" -a -n "$(OUT)" || { echo "make prepare: set REPO=path/to/your/repository and OUT=dir"; exit 2; }
	@$(PY) -m codetune prepare --config $(CONFIG) --data.repo "$(REPO)" --out "$(OUT)" $(MODEL_ARG) $(ARGS)

train: install ## Train with the default config: make train REPO=~/code/project [MODEL=...] [ARGS=...]
	@test -n "$(REPO)" || { echo "make train: set REPO=path/to/your/repository"; exit 2; }
	@$(PY) -m codetune fit --config configs/training_config.yaml --data.repo "$(REPO)" $(MODEL_ARG) $(NAME_ARG) $(ARGS)

train-rust: install ## Train with the Rust config: make train-rust REPO=~/code/crate [MODEL=...] [ARGS=...]
	@test -n "$(REPO)" || { echo "make train-rust: set REPO=path/to/your/crate"; exit 2; }
	@$(PY) -m codetune fit --config configs/training_config_rust.yaml --data.repo "$(REPO)" $(MODEL_ARG) $(NAME_ARG) $(ARGS)

resume: install ## Continue a run from its last checkpoint: make resume RUN=runs/<name>
	@test -f "$(RUN)/config.yaml" || { echo "make resume: set RUN=runs/<name> (a run directory with config.yaml)"; exit 2; }
	@$(PY) -m codetune fit --config "$(RUN)/config.yaml" --ckpt_path last $(ARGS)

generate: install ## Complete code with a finished run: make generate RUN=runs/<name> PROMPT="fn process" [ARGS=...]
	@test -n "$(RUN)" -a -n "$(PROMPT)" || { echo 'make generate: set RUN=runs/<name> and PROMPT="fn process"'; exit 2; }
	@$(PY) -m codetune generate "$(RUN)" --prompt "$(PROMPT)" $(ARGS)

merge: install ## Merge a run's adapter into its base (16-bit): make merge RUN=runs/<name> OUT=dir [ARGS=--dtype float32]
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "make merge: set RUN=runs/<name> and OUT=dir"; exit 2; }
	@$(PY) -m codetune merge "$(RUN)" --out "$(OUT)" $(ARGS)

export: install ## Export a run for llama.cpp, Ollama or vLLM: make export RUN=runs/<name> TO=gguf|ollama|vllm [ARGS=...]
	@test -n "$(RUN)" -a -n "$(TO)" || { echo "make export: set RUN=runs/<name> and TO=gguf, ollama or vllm"; exit 2; }
	@$(PY) -m codetune export "$(RUN)" --to "$(TO)" $(if $(OUT),--out "$(OUT)",) $(ARGS)

embedded-model: install ## Rebuild the embedded model from Debian packages (apt-get as root; about 2 hours on 2 cores; resumable)
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y --no-install-recommends $$(grep -v '^#' bench/embedded/packages.txt)
	$(PY) bench/embedded_model.py $(ARGS)

tensorboard: install ## Serve the TensorBoard logs of every run under runs/
	$(VENV)/bin/tensorboard --logdir runs --bind_all

test: install ## Run the test suite (offline, CPU)
	$(PY) -m pytest -q $(ARGS)

bench: install ## Print the benchmark figures (training throughput vs TRL, memory, secrets, ingest); installs trl
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py
	$(PY) bench/memory.py
	$(PY) bench/secret_redaction.py
	$(PY) bench/ingest.py

gpu-check: install ## On a CUDA card: the GPU check's table (bench/gpu_check.py), JSON in gpu_check.json [ARGS=--dry-run]
	$(PY) bench/gpu_check.py --out gpu_check.json $(ARGS)

clean: ## Remove the venv and caches (trained runs stay: make clean-runs)
	rm -rf $(VENV) .pytest_cache *.egg-info

clean-runs: ## Delete every trained run under runs/ (adapters, checkpoints, logs)
	rm -rf runs
