# Two commands do all set-up on a fresh machine:
#   make demo   venv + packages, index the sample photos, run a query
#   make test   venv + packages, run the test suite
# MODEL=DIR points the demo at a local model directory (no hub access needed).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= facebook/dinov2-small
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH   ?= torch==2.13.0
FAISS   ?= cpu
comma   := ,
# Milvus Lite pulls faiss-cpu: only where faiss-cpu is the FAISS wheel anyway
EXTRAS  ?= $(FAISS),dev,scale$(if $(filter cpu,$(FAISS)),$(comma)lite)
DEMO_INDEX ?= demo-index
MODELS  ?= models
DEMO_PHOTOS ?= data/caltech101-sample/images
QUERY   ?= data/caltech101-sample/images/airplanes__image_0001.jpg

.PHONY: setup demo demo-offline test test-slow bench lint clean browser serve

$(BIN)/dinosearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a plain `torch` would pull the multi-GB CUDA build);
	# on a GPU machine: make setup TORCH=torch FAISS=gpu
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $@

setup: $(BIN)/dinosearch

demo: setup
	$(BIN)/dinosearch index $(DEMO_PHOTOS) --index $(DEMO_INDEX) --model $(MODEL)
	$(BIN)/dinosearch search $(DEMO_INDEX) $(QUERY) -k 5
	$(BIN)/dinosearch info $(DEMO_INDEX)

# The same demo with an architecture-exact dinov2-small of random weights (offline machines):
# it proves the whole path runs; rankings are meaningless without the real weights.
demo-offline: setup
	$(BIN)/python scripts/make_model.py small $(MODELS)/dinov2-small-random
	$(MAKE) demo MODEL=$(MODELS)/dinov2-small-random DEMO_INDEX=$(DEMO_INDEX)-random

# Debian's chromium for the browser test (Playwright drives it; nothing is downloaded by Playwright itself),
# curl and openssl for the README's commands, which the suite runs (tests/test_readme.py)
browser:
	@command -v chromium >/dev/null && command -v curl >/dev/null && command -v openssl >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium curl openssl; }

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check indexer search api scripts tests

serve: setup
	$(BIN)/dinosearch serve $(DEMO_INDEX)

clean:
	rm -rf $(VENV) $(DEMO_INDEX) demo-index-random models *.egg-info test-artifacts
