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
STUDENT ?= cnn_padded
SHOTS ?= 5
COMMON = run=$(RUN) seed=$(SEED) overwrite=true
SOURCE = dataset=glyphs_source
TARGET = dataset=glyphs_target dataset.shots=$(SHOTS) dataset.subset_seed=$(SEED) stage.batch_size=32
TEACHER_FIT = stage.epochs=60
# Students train long, on strongly augmented views: a patient, consistent teacher labels each view.
# Their recipe (400 epochs, 4-pixel crops, batch 32) is a named experiment, conf/experiment/demo.yaml;
# the teacher stages keep their own settings here.
STUDENT_FIT = experiment=demo
# Baselines get the same care as the runs they are compared with: every student trains once per
# learning rate (a multirun), the scratch teacher too, and eval shows each job's validation score.
FINETUNE_LR = 0.03
TEACHER_LRS = 0.03,0.05
STUDENT_LRS = 0.02,0.05
EQ := =
# A sweep exits 1 when some of its jobs failed (e.g. diverged at a learning rate too high) and the
# others finished: the failed ones keep their last good checkpoint, eval and report list them.
SWEEP_OK = || [ $$? -eq 1 ]
# A multirun's last job folder stands for the whole sweep (the '=' in its name comes from $(EQ)).
LAST = optimizer.lr$(EQ)0.05/best.pt

.DEFAULT_GOAL := help
.PHONY: help venv demo mnist-usps mnist-usps-methods bench bench-distill bench-fewshot bench-kd \
	bench-views bench-harness bench-profile cifar10-data cifar-split cifar-split-methods test lint format clean-demo

help: ## list the workflows
	@echo "distill-cli: make <target>"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-19s %s\n", $$1, $$2}'
	@echo "Demo variables: RUN=$(RUN) SEED=$(SEED) SHOTS=$(SHOTS) TEACHER=$(TEACHER) STUDENT=$(STUDENT)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# compat: the repository root goes on sys.path, so Hydra finds the sweeper plugin in hydra_plugins/
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]' \
	    --config-settings editable_mode=compat
	touch $@

venv: $(STAMP) ## create .venv and install distill-cli with its test tools

demo: $(OUT)/eval/metrics.json ## run the whole pipeline on the built-in offline data, then the eval table

$(OUT)/pretrain/best.pt: $(INPUTS)
	$(CLI) pretrain $(COMMON) $(SOURCE) model=$(TEACHER) stage.epochs=5

$(OUT)/finetune/best.pt: $(OUT)/pretrain/best.pt
	$(CLI) finetune $(COMMON) $(TARGET) $(TEACHER_FIT) optimizer.lr=$(FINETUNE_LR)

$(OUT)/scratch_teacher/$(LAST): $(INPUTS)
	$(CLI) pretrain -m $(COMMON) $(TARGET) model=$(TEACHER) tag=scratch_teacher $(TEACHER_FIT) \
	    optimizer.lr=$(TEACHER_LRS) $(SWEEP_OK)

$(OUT)/distill/$(LAST): $(OUT)/finetune/best.pt
	$(CLI) distill -m $(COMMON) $(TARGET) model=$(STUDENT) $(STUDENT_FIT) \
	    optimizer.lr=$(STUDENT_LRS) $(SWEEP_OK)

$(OUT)/scratch_student/$(LAST): $(INPUTS)
	$(CLI) pretrain -m $(COMMON) $(TARGET) model=$(STUDENT) tag=scratch_student $(STUDENT_FIT) \
	    optimizer.lr=$(STUDENT_LRS) $(SWEEP_OK)

$(OUT)/eval/metrics.json: $(OUT)/pretrain/best.pt $(OUT)/finetune/best.pt \
		$(addprefix $(OUT)/,$(addsuffix /$(LAST),scratch_teacher distill scratch_student))
	$(CLI) eval run=$(RUN)

# --- MNIST -> USPS on the real data in ../shared/data (docs/results.md) ------------------------
DATA ?= ../shared/data
CIFAR10 := data/cifar10_jpeg
CIFAR10_TAR ?= $(DATA)/cifar10_jpeg.tar.gz
M2U := run=mnist_usps seed=$(SEED) overwrite=true
MNIST := dataset=mnist dataset.root=$(DATA) dataset.download=false dataset.image_size=16
USPS := dataset=usps dataset.root=$(DATA) dataset.download=false
FEW := $(USPS) dataset.shots=10 stage.batch_size=32
FULL := $(USPS) stage.epochs=8

# The students' recipe (400 epochs, 4-pixel crops, batch 32) and the data location: the named
# experiment conf/experiment/mnist_usps.yaml, e.g. `distill-cli distill experiment=mnist_usps kd=dkd`.
M2U_STUDENT := experiment=mnist_usps dataset.root=$(DATA)

mnist-usps: $(STAMP) ## MNIST -> USPS at 10 shots per class and on the full target (~6 min)
	$(CLI) pretrain $(M2U) $(MNIST) model=$(TEACHER) dataset.fraction=0.2 stage.epochs=3
	$(CLI) finetune $(M2U) $(FEW) $(TEACHER_FIT) optimizer.lr=$(FINETUNE_LR)
	$(CLI) pretrain -m $(M2U) $(FEW) $(TEACHER_FIT) model=$(TEACHER) tag=scratch_teacher \
	    optimizer.lr=$(TEACHER_LRS) $(SWEEP_OK)
	$(CLI) distill -m $(M2U_STUDENT) $(M2U) model=$(STUDENT) optimizer.lr=$(STUDENT_LRS) $(SWEEP_OK)
	$(CLI) pretrain -m $(M2U_STUDENT) $(M2U) $(FEW) model=$(STUDENT) tag=scratch_student \
	    optimizer.lr=$(STUDENT_LRS) $(SWEEP_OK)
	$(CLI) finetune $(M2U) $(FULL) tag=finetune_full
	$(CLI) pretrain $(M2U) $(FULL) model=$(TEACHER) tag=scratch_teacher_full
	$(CLI) distill $(M2U) model=$(STUDENT) tag=distill_full stage.epochs=8 \
	    stage.from=outputs/mnist_usps/finetune_full
	$(CLI) pretrain $(M2U) $(FULL) model=$(STUDENT) tag=scratch_student_full
	$(CLI) eval run=mnist_usps

# Every kd method at 10 labels per class, on the labelled subset and with the unlabelled rest of
# USPS, 3 seeds each (docs/results.md), with the settings of conf/experiment/methods.yaml. Then
# the variants that change a method's own weights, each under its own tag: the feature methods
# beside Hinton KD (kd_weight 1, RepDistiller's CRD+KD), and kd, dkd and dist on standardized
# logits (LSKD: kd at T 2 with weights ce 1, kd 9; dkd scaled by 9; dist at its defaults). Then
# the scratch baseline, eval and report. Reuses the mnist-usps teacher if present.
METHODS ?= kd,logit_mse,dkd,dist,ttm,wttm,ctkd,fitnet,at,sp,rkd,pkt,crd
FEATURE_METHODS ?= fitnet,at,sp,rkd,pkt,crd
# The student: resnet8 (78k parameters, BatchNorm), lr 0.05 for every method (the BatchNorm-free
# cnn_padded diverges under dkd and logit_mse at its KD learning rate).
METHODS_STUDENT ?= resnet8
M2U_TEACHER := outputs/mnist_usps/finetune/best.pt
METHODS_SWEEP := experiment=methods overwrite=true dataset.root=$(DATA) model=$(METHODS_STUDENT) \
	seed=0,1,2 hydra/launcher=local device.threads=1
SETS := stage.transfer_set=labeled,target
LS := kd.logit_standardize=true

$(M2U_TEACHER): | $(STAMP)
	$(CLI) pretrain $(M2U) $(MNIST) model=$(TEACHER) dataset.fraction=0.2 stage.epochs=3
	$(CLI) finetune $(M2U) $(FEW) $(TEACHER_FIT) optimizer.lr=$(FINETUNE_LR)

mnist-usps-methods: $(M2U_TEACHER) ## every kd method and variant x 2 transfer sets x 3 seeds on MNIST -> USPS (~75 min)
	$(CLI) distill -m $(METHODS_SWEEP) $(SETS) kd=$(METHODS) $(SWEEP_OK)
	$(CLI) distill -m $(METHODS_SWEEP) $(SETS) tag=methods_with_kd kd=$(FEATURE_METHODS) \
	    kd.kd_weight=1 $(SWEEP_OK)
	$(CLI) distill -m $(METHODS_SWEEP) $(SETS) tag=methods_ls_kd kd=kd $(LS) kd.temperature=2 \
	    kd.kd_weight=9 kd.ce_weight=1 $(SWEEP_OK)
	$(CLI) distill -m $(METHODS_SWEEP) $(SETS) tag=methods_ls_dkd kd=dkd $(LS) kd.kd_weight=9 $(SWEEP_OK)
	$(CLI) distill -m $(METHODS_SWEEP) $(SETS) tag=methods_ls_dist kd=dist $(LS) $(SWEEP_OK)
	$(CLI) pretrain -m $(METHODS_SWEEP) tag=scratch_methods
	$(CLI) eval run=mnist_usps stage.plots=false
	$(CLI) report run=mnist_usps

bench: $(STAMP) ## throughput vs a plain PyTorch loop and its ceiling, CPU formats, data cache (~35 min)
	$(BIN)/python bench/throughput.py --streamed --compile --out docs/bench_throughput.json
	$(BIN)/python bench/cpu_formats.py --out docs/bench_cpu_formats.json
	$(BIN)/python bench/data_cache.py --data $(DATA) --out docs/bench_data_cache.json

bench-distill: $(STAMP) ## distillation overhead and sweep cost, with and without the teacher cache
	$(BIN)/python bench/distill_cost.py --out docs/bench_distill.json

bench-fewshot: $(STAMP) $(CIFAR10)/.extracted ## few-shot stage time per validation protocol (~6 min)
	$(BIN)/python bench/fewshot_cost.py --data $(CIFAR10) --out docs/bench_fewshot.json

# --- CIFAR-10 class split: animals -> vehicles, a shots curve (docs/results.md) --------------
# A teacher pretrained once on the six animal classes; for each shots value and seed its own run
# (cifar_split_k<K>_seed<S>): the finetuned teacher, the same teacher from scratch, the student
# distilled on the labelled images and with the unlabelled target images, the student from
# scratch; then one report over all of them draws the curves. Scratch runs get the same
# learning rate and epochs as the runs they are compared with.
CS_TEACHER ?= resnet20
CS_STUDENT ?= cnn
CS_SHOTS ?= 5 10 50 250
CS_SEEDS ?= 0 1 2
CS_PRETRAIN_EPOCHS ?= 15
CIFAR := dataset=imagefolder dataset.root=$(CIFAR10)
CS_SOURCE := $(CIFAR) dataset.classes=[bird,cat,deer,dog,frog,horse]
CS_TARGET := $(CIFAR) dataset.classes=[airplane,automobile,ship,truck] stage.batch_size=32
CS_TEACHER_CKPT := outputs/cifar_split/pretrain/best.pt
# Epochs per shots value (the same for a run and its baseline): few images need many passes.
CS_T_EPOCHS_5 := 60
CS_T_EPOCHS_10 := 60
CS_T_EPOCHS_50 := 40
CS_T_EPOCHS_250 := 20
CS_S_EPOCHS_5 := 300
CS_S_EPOCHS_10 := 300
CS_S_EPOCHS_50 := 100
CS_S_EPOCHS_250 := 30
# Extra overrides for every job, e.g. `make -j2 cifar-split CS_EXTRA=device.threads=1` runs two
# shots/seed runs at a time on one core each.
CS_EXTRA ?=
CS_RUNS := $(foreach k,$(CS_SHOTS),$(foreach s,$(CS_SEEDS),cifar_split_k$(k)_seed$(s)))

cifar-split: outputs/cifar_split/report.md ## CIFAR-10 animals -> vehicles: shots curve, 3 seeds, report + plots (~2.5 h with -j2)

$(CS_TEACHER_CKPT): | $(STAMP) $(CIFAR10)/.extracted
	$(CLI) pretrain run=cifar_split seed=0 overwrite=true $(CS_SOURCE) model=$(CS_TEACHER) \
	    stage.epochs=$(CS_PRETRAIN_EPOCHS) stage.batch_size=128 optimizer.lr=0.1
	$(CLI) eval run=cifar_split stage.plots=false

# One shots value and seed per run folder, cifar_split_k<K>_seed<S>; each stage is a target of
# its own (its metrics.json, written when the stage finishes), so an interrupted grid resumes at
# the stage it was in. The stem of every rule below is k<K>_seed<S>.
cs_k = $(patsubst k%,%,$(word 1,$(subst _, ,$(1))))
cs_s = $(patsubst seed%,%,$(word 2,$(subst _, ,$(1))))
cs_args = run=cifar_split_$(1) seed=$(call cs_s,$(1)) overwrite=true $(CS_EXTRA)
cs_data = $(CS_TARGET) dataset.shots=$(call cs_k,$(1)) dataset.subset_seed=$(call cs_s,$(1))
CS := outputs/cifar_split_%
# The function-matching rows (experiment=function_matching, issue 20): with the unlabelled
# target images, and with none of them (the labelled subset plus the source's images); the
# scratch student with the same steps and learning rate as the first of them.
FM := experiment=function_matching model=$(CS_STUDENT)
CS_STAGES := finetune scratch_teacher distill distill_target scratch_student fm_target \
	fm_source scratch_student_long

$(CS)/finetune/metrics.json: $(CS_TEACHER_CKPT)
	$(CLI) finetune $(call cs_args,$*) $(call cs_data,$*) stage.from=outputs/cifar_split/pretrain \
	    stage.epochs=$(CS_T_EPOCHS_$(call cs_k,$*)) optimizer.lr=0.03

$(CS)/scratch_teacher/metrics.json: $(CS_TEACHER_CKPT)
	$(CLI) pretrain $(call cs_args,$*) $(call cs_data,$*) model=$(CS_TEACHER) tag=scratch_teacher \
	    stage.epochs=$(CS_T_EPOCHS_$(call cs_k,$*)) optimizer.lr=0.03

$(CS)/distill/metrics.json: $(CS)/finetune/metrics.json
	$(CLI) distill experiment=cifar_split $(call cs_args,$*) model=$(CS_STUDENT) \
	    stage.epochs=$(CS_S_EPOCHS_$(call cs_k,$*))

$(CS)/distill_target/metrics.json: $(CS)/finetune/metrics.json
	$(CLI) distill experiment=cifar_split $(call cs_args,$*) model=$(CS_STUDENT) tag=distill_target \
	    stage.transfer_set=target stage.unlabeled_ratio=1 stage.epochs=$(CS_S_EPOCHS_$(call cs_k,$*))

$(CS)/scratch_student/metrics.json: $(CS_TEACHER_CKPT)
	$(CLI) pretrain experiment=cifar_split $(call cs_args,$*) $(call cs_data,$*) \
	    model=$(CS_STUDENT) tag=scratch_student stage.epochs=$(CS_S_EPOCHS_$(call cs_k,$*))

$(CS)/fm_target/metrics.json: $(CS)/finetune/metrics.json
	$(CLI) distill $(FM) $(call cs_args,$*) tag=fm_target

# The source's 30,000 training images (1,000 held out) and the labelled few: 6 passes are about
# the images (and steps) of fm_target's 10 passes over the target's 19,000.
$(CS)/fm_source/metrics.json: $(CS)/finetune/metrics.json
	$(CLI) distill $(FM) $(call cs_args,$*) tag=fm_source stage.transfer_set=source \
	    stage.transfer_epochs=6

# As many optimizer steps as fm_target took (an epoch of the labelled subset is
# max(1, n_train // 32) steps), at the same learning rate, on the labelled images alone.
$(CS)/scratch_student_long/metrics.json: $(CS)/fm_target/metrics.json
	$(CLI) pretrain experiment=cifar_split $(call cs_args,$*) $(call cs_data,$*) \
	    model=$(CS_STUDENT) tag=scratch_student_long stage.epochs=$$($(BIN)/python -c \
	    "import json; m = json.load(open('$<')); print(max(1, round(m['steps'] / max(1, m['n_train'] // 32))))")

# Every stage's best.pt on the test split; then the function-matching students' best_val.pt
# (the epoch labelled validation would have kept; best.pt is the fidelity pick) in folders of
# their own. `.venv/bin/python bench/fm_table.py` prints the tables of docs/results.md.
$(CS)/eval/metrics.json: $(foreach t,$(CS_STAGES),$(CS)/$(t)/metrics.json)
	$(CLI) eval run=cifar_split_$* stage.plots=false $(CS_EXTRA)
	$(CLI) eval run=cifar_split_$* tag=eval_fm_val overwrite=true stage.plots=false $(CS_EXTRA) \
	    stage.from=outputs/cifar_split_$*/fm_target/best_val.pt
	$(CLI) eval run=cifar_split_$* tag=eval_fm_source_val overwrite=true stage.plots=false \
	    stage.from=outputs/cifar_split_$*/fm_source/best_val.pt $(CS_EXTRA)

# The stages' metrics.json are targets of their own, never intermediate files to delete.
.SECONDARY:

outputs/cifar_split/report.md: $(foreach r,$(CS_RUNS),outputs/$(r)/eval/metrics.json)
	$(CLI) report run=cifar_split stage.runs=[cifar_split_k*] \
	    stage.metrics=[best_val_acc,top1]
	$(CLI) eval run=cifar_split_k10_seed0

# The logit methods on the class split at 10 labels per class, in each 10-shot run beside its
# distill (kd) and scratch_student: same student recipe, epochs, learning rate and transfer sets.
CS_LOGIT_METHODS ?= kd,logit_mse,dkd,dist,ttm,wttm,ctkd

cifar-split-methods: outputs/cifar_split/report.md ## the logit methods on the class split at 10 shots, 3 seeds (~20 min)
	for s in $(CS_SEEDS); do \
	    $(CLI) distill -m experiment=cifar_split run=cifar_split_k10_seed$$s seed=$$s tag=methods \
	        stage.epochs=$(CS_S_EPOCHS_10) kd=$(CS_LOGIT_METHODS) stage.transfer_set=labeled,target \
	        stage.unlabeled_ratio=1 hydra/launcher=local device.threads=1 $(SWEEP_OK) || exit 1; \
	    $(CLI) eval run=cifar_split_k10_seed$$s stage.plots=false || exit 1; \
	done
	$(CLI) report run=cifar_split_k10_seed0 'stage.runs=[cifar_split_k10_seed1,cifar_split_k10_seed2]' \
	    stage.metrics=[best_val_acc,top1]

# --- the distillation step's cost (docs/performance.md) ----------------------------------------
bench-kd: $(STAMP) $(CIFAR10)/.extracted ## distill vs the usual KD loop; the teacher's share of a step (~10 min)
	$(BIN)/python bench/kd_loop.py --data $(CIFAR10) --variants plain,prepared,bf16,compile,compile_bf16 \
	    --out docs/bench_kd_loop.json

# The speed issue's harness job (#24): resnet8x4 -> cnn, 5,000 CIFAR-10 JPEGs (10 classes x 500),
# batch 128, T=4, 3 epochs; against the usual PyTorch KD loop and torchdistill (installed here if
# missing, without touching torch), with function matching's mixed step beside the plain one.
bench-harness: $(STAMP) $(CIFAR10)/.extracted ## distill vs torchdistill and a plain KD loop on the harness job (~6 min)
	$(BIN)/python -c "import torchdistill" 2>/dev/null || $(BIN)/pip install --quiet --no-deps 'torchdistill==1.1.5'
	$(BIN)/python bench/kd_loop.py --data $(CIFAR10) --classes 10 --per-class 500 --epochs 3 \
	    --parts reference,torchdistill,distill --variants prepared,float32,mixed --long-epochs 0 \
	    --out docs/bench_harness.json

bench-profile: $(STAMP) $(CIFAR10)/.extracted ## where a step's time goes: distill (default, float32), mixed, pretrain (~6 min)
	$(BIN)/python bench/step_profile.py --data $(CIFAR10) --out docs/bench_step_profile.json

bench-views: $(STAMP) $(CIFAR10)/.extracted ## accuracy and time of stage.aug_views=K, glyphs and CIFAR-10 (~10 min)
	$(BIN)/python bench/aug_views.py --data glyphs --views 1,2,4,8,16,none --seeds 0,1,2 \
	    --out docs/bench_aug_views_glyphs.json
	$(BIN)/python bench/aug_views.py --data $(CIFAR10) --views 1,2,4,8,none --seeds 0,1 \
	    --per-class 300 --teacher-epochs 8 --out docs/bench_aug_views_cifar10.json

# --- real CIFAR-10 images: ../shared/data's JPEG tarball, extracted once into data/ -----------
cifar10-data: $(CIFAR10)/.extracted ## extract the CIFAR-10 JPEG tarball into data/cifar10_jpeg (once)

$(CIFAR10)/.extracted:
	@test -f $(CIFAR10_TAR) || { echo "error: $(CIFAR10_TAR) not found; set DATA=DIR (the folder holding cifar10_jpeg.tar.gz)"; exit 2; }
	mkdir -p $(CIFAR10)
	tar -xzf $(CIFAR10_TAR) -C $(CIFAR10)
	touch $@

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check distill_cli tests bench
	$(BIN)/ruff format --check distill_cli tests bench

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix distill_cli tests bench
	$(BIN)/ruff format distill_cli tests bench

clean-demo: ## delete the demo run folder, outputs/RUN
	rm -rf $(OUT)
