# distill-cli workflows. `make` (or `make help`) lists them.
#
# The demo is scripted the way users script the tool: each stage is a target whose output is that
# stage's checkpoint, so `make demo` re-runs only the stages whose inputs changed (the upstream
# checkpoint, a file in conf/, or this Makefile). Demo settings are variables: e.g.
#   make demo SEED=1 RUN=demo_seed1

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLI := $(BIN)/distill-cli
STAMP := $(VENV)/.installed

RUN ?= demo
SEED ?= 0
OUT := outputs/$(RUN)
INPUTS := $(STAMP) $(wildcard conf/*.yaml conf/*/*.yaml conf/*/*/*.yaml) Makefile

# --- demo settings: a ResNet teacher (1.2M parameters) and the seed's CNN student (0.15M) ------
TEACHER ?= resnet8x4
STUDENT ?= cnn
SHOTS ?= 5
COMMON = run=$(RUN) seed=$(SEED) overwrite=true
SOURCE = dataset=glyphs_source
TARGET = dataset=glyphs_target dataset.shots=$(SHOTS) dataset.subset_seed=$(SEED) stage.batch_size=32
# The scratch baselines train exactly like the runs they are compared with.
TEACHER_FIT = stage.epochs=60 optimizer.lr=0.03
STUDENT_FIT = stage.epochs=200 optimizer.lr=0.02

.DEFAULT_GOAL := help
.PHONY: help venv demo test lint format clean-demo

help: ## list the workflows
	@echo "distill-cli: make <target>"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Demo variables: RUN=$(RUN) SEED=$(SEED) SHOTS=$(SHOTS) TEACHER=$(TEACHER) STUDENT=$(STUDENT)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(STAMP) ## create .venv and install distill-cli with its test tools

demo: $(OUT)/eval/metrics.json ## run the whole pipeline on the built-in offline data, then the eval table

$(OUT)/pretrain/best.pt: $(INPUTS)
	$(CLI) pretrain $(COMMON) $(SOURCE) model=$(TEACHER) stage.epochs=5

$(OUT)/finetune/best.pt: $(OUT)/pretrain/best.pt
	$(CLI) finetune $(COMMON) $(TARGET) $(TEACHER_FIT)

$(OUT)/scratch_teacher/best.pt: $(INPUTS)
	$(CLI) pretrain $(COMMON) $(TARGET) model=$(TEACHER) tag=scratch_teacher $(TEACHER_FIT)

$(OUT)/distill/best.pt: $(OUT)/finetune/best.pt
	$(CLI) distill $(COMMON) $(TARGET) model=$(STUDENT) $(STUDENT_FIT)

$(OUT)/scratch_student/best.pt: $(INPUTS)
	$(CLI) pretrain $(COMMON) $(TARGET) model=$(STUDENT) tag=scratch_student $(STUDENT_FIT)

$(OUT)/eval/metrics.json: $(addprefix $(OUT)/,$(addsuffix /best.pt,pretrain finetune distill scratch_teacher scratch_student))
	$(CLI) eval run=$(RUN)

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check distill_cli tests
	$(BIN)/ruff format --check distill_cli tests

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix distill_cli tests
	$(BIN)/ruff format distill_cli tests

clean-demo: ## delete the demo run folder (outputs/$(RUN))
	rm -rf $(OUT)
