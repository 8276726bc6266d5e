# Early-exit serving on Triton. `make demo` and `make test` each do their own set-up.
SHELL := /bin/bash
# The venv must use Debian's Python 3.11: Triton's Python stub embeds Debian's libpython3.11 and loads the venv's
# standard library, so an interpreter built elsewhere (pyenv, conda) gives extension modules it cannot load.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SETUP_STAMP := $(VENV)/.setup-done
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

SST2_DIR ?= ../shared/data/sst2
NLP_MODEL := sst2_minilm
NLP_CHECKPOINT := models/$(NLP_MODEL).safetensors

.PHONY: help setup model prepare reference-models serve stop demo test bench lint clean
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
	@touch $@

setup: $(SETUP_STAMP)  ## venv with pinned dependencies, redis-server, Triton backend directory
	@$(PY) -m triton_backend.server assemble --out $(BACKENDS) >/dev/null
	@echo "setup complete (data set: $(DATASET))"

$(CHECKPOINT): | $(SETUP_STAMP)
	$(PY) -m model_zoo.cifar_resnet --dataset $(DATASET) --data-dir $(DATA_DIR) --out $@

model: $(CHECKPOINT)  ## train the reference ResNet (committed; retrain with `rm models/*; make model`)

$(REPO)/$(MODEL)/1/manifest.json: $(CHECKPOINT) | $(SETUP_STAMP)
	$(PY) -m controller.prepare --name $(MODEL) --checkpoint $(CHECKPOINT) --data $(DATASET) \
	  --data-dir $(DATA_DIR) --repository $(REPO)

prepare: setup $(REPO)/$(MODEL)/1/manifest.json  ## add ramps, profile, export the model-repository entries

$(NLP_CHECKPOINT): | $(SETUP_STAMP)
	$(PY) -m model_zoo.minilm_sst2 --data-dir $(SST2_DIR) --out $@

$(REPO)/$(NLP_MODEL)/1/manifest.json: $(NLP_CHECKPOINT) | $(SETUP_STAMP)
	$(PY) -m controller.prepare --model model_zoo.minilm_sst2:factory --checkpoint $(NLP_CHECKPOINT) \
	  --name $(NLP_MODEL) --data sst2 --data-dir $(SST2_DIR) --repository $(REPO)

reference-models: prepare $(REPO)/$(NLP_MODEL)/1/manifest.json  ## both reference entries: CIFAR ResNet and MiniLM SST-2 (~10 min on CPU)

serve: prepare  ## Redis :6379, Triton :8000/:8001/:8002 and the controller in the background
	$(PY) -m workload.stack up --redis-port $(REDIS_PORT) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
	  --metrics-port $(METRICS_PORT) --model $(MODEL) --model $(MODEL)_vanilla --model image_preprocess \
	  --model $(MODEL)_pipeline

stop:  ## stop what `make serve` started
	$(PY) -m workload.stack down

demo: prepare  ## the whole loop live: vanilla vs early exits steered by the controller
	$(PY) -m workload.demo --model $(MODEL) --dataset $(DATASET) --data-dir $(DATA_DIR)

test: setup  ## unit and integration tests (real tritonserver and redis-server)
	$(PY) -m pytest -q tests

bench: reference-models  ## side-by-side benchmark, CV and NLP (writes bench_results/<model>/report.md and plots)
	$(PY) -m workload.bench --model $(MODEL) --dataset $(DATASET) --data-dir $(DATA_DIR) --load 0.25
	$(PY) -m workload.bench --model $(NLP_MODEL) --dataset sst2 --data-dir $(SST2_DIR) --requests 800 --load 0.25

lint: setup  ## ruff (style and bug checks configured in pyproject.toml)
	$(PY) -m ruff check early_exit triton_backend controller workload model_zoo tests

clean:  ## remove build outputs (keeps the venv and the committed checkpoint)
	rm -rf build bench_results $(REPO)/*/1/*.pt2 $(REPO)/*/1/*.safetensors $(REPO)/*/1/manifest.json
