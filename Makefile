# Everything starts from a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit evaluation integration bench install clean schema

TAU_BENCH ?= ../shared/data/tau-bench/gpt-4o-airline.json

demo: $(STAMP)
	$(BIN)/trackside demo $(if $(wildcard $(TAU_BENCH)),--tau-bench $(TAU_BENCH))

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Fleet-sized evaluations: the detectors' quality bars, the state's footprint and the simulator's speed on simulated fleets.
evaluation: $(STAMP)
	$(BIN)/python -m pytest -q tests/evaluation

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python -m jobs.bench

schema: $(STAMP)
	$(BIN)/python -m streams.contracts.schema > streams/contracts/schemas/agent-event.json

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .trackside .pytest_cache
