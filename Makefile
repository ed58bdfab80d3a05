# Everything starts from a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test unit evaluation integration bench install clean schema browser

TAU_BENCH ?= ../shared/data/tau-bench/gpt-4o-airline.json
# Test files run two at a time, each file in one process (a module's stack is its own): an
# integration test mostly waits on its stack, so two cores run two of them. TEST_WORKERS=0: one at a time.
TEST_WORKERS ?= 2

demo: $(STAMP)
	$(BIN)/trackside demo $(if $(wildcard $(TAU_BENCH)),--tau-bench $(TAU_BENCH))

test: $(DEV_STAMP) browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

unit: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Fleet-sized evaluations: the detectors' quality bars, the state's footprint and the simulator's speed on simulated fleets.
evaluation: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/evaluation

integration: $(DEV_STAMP) browser
	$(BIN)/python -m pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python -m jobs.bench

schema: $(STAMP)
	$(BIN)/python -m streams.contracts.schema > streams/contracts/schemas/agent-event.json

install: $(STAMP)

# The demo installs what Trackside needs; the tests add the dev extra (pytest, instrumentation
# libraries, selenium).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# The console's tests drive Debian's chromium (headless) through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

clean:
	rm -rf $(VENV) .trackside .pytest_cache
