# kdjax: the two commands a new user runs.
#   make demo     teacher, student from scratch, distilled student on Fashion-MNIST, and their
#                 report (2 CPU cores: < 15 min)
#   make demo-lm  the same for language models, on the Python standard library's sources
#   make demo-lm-cache  then the student distilled from a top-64 teacher cache
#   make demo-lm-onpolicy  then the student distilled on its own samples half of the steps
#   make test     the test suite (make test-extras: the tests of the torch and hf extras;
#                 make test-litert: LiteRT export's, in its own environment)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(CURDIR)/data/tfds
FMNIST ?= /usr/share/datasets/fashion-mnist
WORK   ?= workdirs/demo
SEED   ?= 0

TEXT   ?= $(CURDIR)/data/text
LMWORK ?= workdirs/demo_lm

.PHONY: demo demo-lm demo-lm-cache demo-lm-onpolicy test test-extras test-litert install data \
        text-data clean

$(BIN)/kdjax: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/kdjax

# The report's charts (reliability diagrams, accuracy against size) need matplotlib: the demos
# install the `report` extra so that a new user sees them.
$(VENV)/.report: $(BIN)/kdjax
	$(BIN)/pip install -q -e '.[report]'
	touch $@

test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

# The tests of the features built on heavy optional dependencies, which `make test` skips: the
# PyTorch bridge (the torch extra: torch, torchax, timm), Hugging Face models (the hf extra:
# transformers) and ONNX export (the onnx extra, and jax2onnx without its declared dependencies:
# they pin orbax-checkpoint < 0.11.37, and converting an NNX model imports none of them). CI runs
# them after the core suite (.ci/run), with the files whose other tests run in the core suite but
# which compare against PyTorch or ONNX Runtime where installed (layouts, .pth, formats, benchmarks,
# structured pruning's ONNX exports).
EXTRA_TESTS := $(wildcard tests/test_torch_*.py) tests/test_lm_hf.py tests/test_interop_onnx.py \
               tests/test_interop_layouts.py tests/test_interop_pth.py tests/test_interop_formats.py \
               tests/test_benchmarks.py tests/test_compress_depgraph.py \
               tests/test_compress_user_shrink.py
test-extras: install
	$(BIN)/pip install -q -e '.[torch,hf,onnx]'
	$(BIN)/pip install -q --no-deps jax2onnx==0.17.1
	$(BIN)/python -m pytest -q -n auto --dist loadfile $(EXTRA_TESTS)

# LiteRT export (the litert extra: tensorflow-cpu and ai-edge-litert, ~1.5 GB) in an environment
# of its own, so that TensorFlow never lands in the one the other tests use (.ci/run runs it last).
LITERT_VENV := .venv-litert
test-litert:
	$(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/pip install -q -e '.[test,litert]'
	$(LITERT_VENV)/bin/python -m pytest -q tests/test_interop_litert.py

# Fashion-MNIST's original IDX files come from Debian's package dataset-fashion-mnist.
$(FMNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "kdjax: installing Debian's dataset-fashion-mnist (the original IDX files)"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
	  echo "kdjax: Fashion-MNIST's IDX files are not in $(FMNIST)."; \
	  echo "  Install them with: sudo apt-get install dataset-fashion-mnist"; \
	  echo "  or copy the four *-ubyte.gz files into a folder and run: make demo FMNIST=/that/folder"; \
	  exit 1; \
	fi

$(DATA)/fashion_mnist: | $(FMNIST)/train-images-idx3-ubyte.gz install
	$(BIN)/kdjax prepare fashion_mnist --from $(FMNIST) --data-dir $(DATA)

data: $(DATA)/fashion_mnist

# The fair comparison (experiments/fashion_mnist/fair.py): a CNN teacher, then the same small MLP
# from scratch and distilled, each with the recipe the validation sweep chose for it
# (benchmarks/fashion_mnist_fair.py), then the report (accuracy, calibration, size, speed).
demo: $(VENV)/.report data
	$(BIN)/kdjax train   --config experiments/fashion_mnist/fair.py:teacher --workdir $(WORK)/teacher --config.data.data_dir=$(DATA) --config.seed=$(SEED)
	$(BIN)/kdjax train   --config experiments/fashion_mnist/fair.py:scratch --workdir $(WORK)/student_scratch --config.data.data_dir=$(DATA) --config.seed=$(SEED)
	$(BIN)/kdjax distill --config experiments/fashion_mnist/fair.py:kd      --workdir $(WORK)/student_kd --config.data.data_dir=$(DATA) --config.teacher.workdir=$(WORK)/teacher --config.seed=$(SEED)
	$(BIN)/kdjax summary $(WORK)/teacher $(WORK)/student_scratch $(WORK)/student_kd
	$(BIN)/kdjax report  $(WORK)/teacher $(WORK)/student_scratch $(WORK)/student_kd --teacher $(WORK)/teacher --split test --calibration-split 'train[54000:]' --out $(WORK)/report

# The LM demo's corpus: the top-level modules of the Python standard library that comes with the
# venv's interpreter (nothing to download or install), byte-level tokenized, 128 positions a row.
$(TEXT)/pystdlib/kdjax_text.json: | install
	$(BIN)/kdjax prepare text --name pystdlib --data-dir $(TEXT) --seq-len 128 \
	  --from $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")/*.py

text-data: $(TEXT)/pystdlib/kdjax_text.json

demo-lm: $(VENV)/.report text-data
	$(BIN)/kdjax train   --config experiments/lm/teacher.py         --workdir $(LMWORK)/teacher --config.data.data_dir=$(TEXT) --config.seed=$(SEED) --no-progress
	$(BIN)/kdjax train   --config experiments/lm/student_scratch.py --workdir $(LMWORK)/student_scratch --config.data.data_dir=$(TEXT) --config.seed=$(SEED) --no-progress
	$(BIN)/kdjax distill --config experiments/lm/distill.py         --workdir $(LMWORK)/student_kd --config.data.data_dir=$(TEXT) --config.teacher.workdir=$(LMWORK)/teacher --config.seed=$(SEED) --no-progress
	$(BIN)/kdjax summary $(LMWORK)/teacher $(LMWORK)/student_scratch $(LMWORK)/student_kd
	$(BIN)/kdjax report  $(LMWORK)/teacher $(LMWORK)/student_scratch $(LMWORK)/student_kd --out $(LMWORK)/report

# After demo-lm: the teacher's top 64 cached once (kdjax cache-teacher), and the same student
# distilled from the cache, with no teacher in the step (README: "Teacher cache").
demo-lm-cache: demo-lm
	$(BIN)/kdjax cache-teacher --teacher $(LMWORK)/teacher --data pystdlib --data-dir $(TEXT) --top-k 64 --out $(LMWORK)/teacher_cache_k64
	$(BIN)/kdjax distill --config experiments/lm/distill.py --workdir $(LMWORK)/student_kd_cache --config.data.data_dir=$(TEXT) --config.teacher.workdir= --config.teacher.cache=$(LMWORK)/teacher_cache_k64 --config.seed=$(SEED) --no-progress
	$(BIN)/kdjax summary $(LMWORK)/student_kd $(LMWORK)/student_kd_cache

# After demo-lm: the same student distilled with on-policy batches (λ = 0.5: half the steps
# train on the student's own continuations, sampled in the step and scored by the teacher;
# README: "On-policy distillation").
demo-lm-onpolicy: demo-lm
	$(BIN)/kdjax distill --config experiments/lm/onpolicy.py --workdir $(LMWORK)/student_onpolicy --config.data.data_dir=$(TEXT) --config.teacher.workdir=$(LMWORK)/teacher --config.seed=$(SEED) --no-progress
	$(BIN)/kdjax summary $(LMWORK)/student_kd $(LMWORK)/student_onpolicy

clean:
	rm -rf $(VENV) workdirs
