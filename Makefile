# The README's commands. `make demo` trains the quick preset; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data/cifar10-jpeg.tar.gz)

export NO_ALBUMENTATIONS_UPDATE := 1
export GRADIO_ANALYTICS_ENABLED := False
ifneq ($(wildcard $(SHARED_DATA)),)
export CIFARKIT_DATA ?= $(SHARED_DATA)
endif

.PHONY: setup browser postgres demo test test-fast docs pictures bench bench-gpu clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cifarkit train --preset quick

# $(call need,CHECK,PACKAGE,WHAT): run CHECK; if it fails, install Debian's PACKAGE when root with apt-get,
# else say what `make test` needs (WHAT) and stop.
define need
	@$(1) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make test installs $(3) (apt-get install $(2))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "make test needs $(3): install it (Debian: sudo apt-get install -y $(2)) and run make test again, or run make test-fast"; \
	    exit 1; \
	  fi; }
endef

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
browser:
	$(call need,command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1,chromium,Chromium for its browser tests)

# The sweep's shared-storage test starts its own server from Debian's PostgreSQL programs.
postgres:
	$(call need,ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1,postgresql,PostgreSQL (its server programs) for its sweep test)

# Everything: unit tests, trainings on the real data, the DDP run, the sweeps' workers and database,
# the app server and the browser.
test: setup browser postgres
	$(BIN)/python -m pytest --durations=15   # the 15 slowest tests, to keep the suite short

# Every test not marked slow (nothing reads the real copy, trains, serves or opens a browser):
# about a minute on 2 idle cores, with or without the data copy.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# The manual (docs/, MkDocs Material) at http://127.0.0.1:8000; `make test` builds it with --strict.
HAVE_DOCS = $(shell $(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null && echo yes)
docs:
	$(if $(HAVE_DOCS),,$(error make docs needs the docs extra: $(BIN)/python -m pip install -e '.[docs]', or make setup))
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# The README's pictures (docs/images/) from a finished run with its report: make pictures RUN=runs/quick-...
pictures: setup browser
	@test -n "$(RUN)" || { echo "make pictures needs a run: make pictures RUN=runs/quick-..."; exit 1; }
	$(BIN)/python docs/make_pictures.py $(RUN)

# The CPU benchmarks, one after another (about 2.5 hours on 2 cores); run alone on the machine.
# Each prints its result; BENCHMARKS.md records them with the machine and date.
bench: setup
	$(BIN)/python bench/lightning_overhead.py --rounds 3
	$(BIN)/python bench/seed_pipeline.py
	$(BIN)/python bench/fast_time_to_accuracy.py --preset fast --seeds 0 1 2
	$(BIN)/python bench/fast_time_to_accuracy.py --preset quick --seeds 0
	$(BIN)/python bench/report_time.py runs/bench/fast-seed0 --repeat 3
	$(BIN)/python bench/tta_threshold.py runs/bench/fast-seed0 runs/bench/fast-seed1 runs/bench/fast-seed2
	$(BIN)/python bench/predict_throughput.py runs/bench/fast-seed0 --n 2000 --repeat 3
	$(BIN)/python bench/app_latency.py runs/bench/fast-seed0 --clients 50 --requests 4
	$(BIN)/python bench/app_soak.py runs/bench/fast-seed0

# On a machine with one recent NVIDIA GPU (no network needed): the prepared check, within 9 minutes:
# the fast preset over 5 seeds, airbench94 and its Muon variant beside it (copies in .airbench/, see
# bench/gpu_check.sh), and the seed preset against the seed's own pipeline. GPU_CHECK_SMOKE=1 runs
# every step on the CPU instead.
bench-gpu: setup
	PYTHON=$(BIN)/python bench/gpu_check.sh runs/gpu-check

clean:
	rm -rf $(VENV) runs
