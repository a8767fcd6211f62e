# make demo: set up .venv, fetch Fashion-MNIST, fine-tune, evaluate, soup and predict against ./mlflow.db
# make test: set up .venv, run the tests (what CI runs); make test-fast: the quick subset
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# `mlflow run --env-manager local` runs `python` from PATH: make it the venv's.
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT ?= true
DEMO_DATA ?= /usr/share/datasets/fashion-mnist
DEMO_MEMBERS ?= 4

.PHONY: demo demo-clock test test-fast lint venv data clean bench bench-quality stress screenshot

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes: a second `make` installs nothing.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

data:
	@bash scripts/fetch-fashion-mnist.sh "$(DEMO_DATA)"

# The clock starts before the set-up (first prerequisite) and again before the steps.
demo-clock:
	@date +%s > .demo-started

demo: demo-clock venv data
	@date +%s > .demo-steps
	$(BIN)/python -c "from soups.tracking import configure; configure()"
	@echo "== start: the sweep's shared starting weights, trained once"
	$(BIN)/mlflow run . -e start -P data=$(DEMO_DATA) --env-manager local
	@for i in $$(seq 0 $$(( $(DEMO_MEMBERS) - 1 ))); do \
	  echo "== finetune i=$$i (from the start run: the recipe says start: auto)"; \
	  $(BIN)/mlflow run . -e finetune -P i=$$i -P data=$(DEMO_DATA) \
	    --env-manager local || exit 1; \
	done
	@echo "== evaluate: test scores of every ingredient"
	$(BIN)/mlflow run . -e evaluate -P data=$(DEMO_DATA) --env-manager local
	@echo "== greedy_soup: the default method, every other method beside it"
	$(BIN)/mlflow run . -e greedy_soup -P data=$(DEMO_DATA) -P compare=all --env-manager local
	@echo "== infer: the champion soup next to a soft-voting ensemble of the same ingredients"
	$(BIN)/mlflow run . -e infer -P data=$(DEMO_DATA) -P ensemble=top:$(DEMO_MEMBERS) -P output=outputs/predictions.csv --env-manager local
	@echo; echo "See the runs: $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)  (http://127.0.0.1:5000)"
	@echo "make demo took $$(( $$(date +%s) - $$(cat .demo-started) )) s, the pipeline's steps $$(( $$(date +%s) - $$(cat .demo-steps) )) s of it."; rm -f .demo-started .demo-steps

# Two pytest workers, each taking whole test files (a file's shared servers and trained fixtures
# are built once): most tests wait on processes they started, so two workers keep 2 cores busy.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The developer's loop: everything but the `slow` tests (real servers, `mlflow run`, workers).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# The README's picture of the runs page (docs/runs-page.png): after `make demo`, a real server and a
# headless Chromium, as tests/test_ui.py looks at it.
screenshot: venv
	BIN=$(BIN) bash scripts/ui-screenshot.sh "$(MLFLOW_TRACKING_URI)" docs/runs-page.png

# Speed, memory and soup-quality benchmarks, each keeping its rows in bench/results/; renders
# docs/BENCHMARKS.md from them. `make bench BENCH=soup_memory` reruns one (all of them: hours).
bench: venv data
	$(BIN)/python -m bench.run_all $(BENCH)

# The soup-quality comparison alone: 3 split seeds x 4 members, shared start and independent, every
# method and the ensemble on the full test set (27 minutes here from an empty member cache).
bench-quality: venv data
	$(BIN)/python -m bench.run_all soup_quality

# Concurrency, load, faults, bad input and security against real processes: the champion race in
# 20 rounds, a live run resumed twice, 12 concurrent fine-tunes, 100 logging clients and an
# 8-worker sweep on PostgreSQL, two torchrun nodes on loopback;
# ends with a table: scenario, expected, observed.
stress: venv
	SOUPS_STRESS=1 SOUPS_LOAD_PROCESSES=12 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/test_champion_race.py tests/test_distributed.py::test_resume_refuses_a_run_whose_process_is_still_training \
	  tests/test_load.py tests/test_multinode.py \
	  tests/test_faults.py tests/test_bad_input.py tests/test_auth.py tests/test_models.py::test_pickle_payload_is_refused_and_never_runs

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf mlflow.db mlflow.db.lock optuna.db mlruns outputs
