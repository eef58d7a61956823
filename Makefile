# kdjax: the two commands a new user runs.
#   make demo   teacher, student from scratch, distilled student on Fashion-MNIST, and their report
#               (2 CPU cores: < 15 min)
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(CURDIR)/data/tfds
FMNIST ?= /usr/share/datasets/fashion-mnist
WORK   ?= workdirs/demo
SEED   ?= 0

.PHONY: demo test install data clean

$(BIN)/kdjax: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/kdjax

test: install
	$(BIN)/python -m pytest -q tests

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
demo: install data
	$(BIN)/kdjax train   --config experiments/fashion_mnist/fair.py:teacher --workdir $(WORK)/teacher --config.data.data_dir=$(DATA) --config.seed=$(SEED)
	$(BIN)/kdjax train   --config experiments/fashion_mnist/fair.py:scratch --workdir $(WORK)/student_scratch --config.data.data_dir=$(DATA) --config.seed=$(SEED)
	$(BIN)/kdjax distill --config experiments/fashion_mnist/fair.py:kd      --workdir $(WORK)/student_kd --config.data.data_dir=$(DATA) --config.teacher.workdir=$(WORK)/teacher --config.seed=$(SEED)
	$(BIN)/kdjax summary $(WORK)/teacher $(WORK)/student_scratch $(WORK)/student_kd
	$(BIN)/kdjax report  $(WORK)/teacher $(WORK)/student_scratch $(WORK)/student_kd --teacher $(WORK)/teacher --split test --calibration-split 'train[54000:]' --out $(WORK)/report

clean:
	rm -rf $(VENV) workdirs
