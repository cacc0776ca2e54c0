# tradeforge: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test ui bench clean mlflow

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "tradeforge needs Python 3.11, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install  ## ingest 3 symbols x 10 days on the embedded engines, print a summary
	$(BIN)/tradeforge demo

test: install  ## the full test suite, on real engines it starts itself (two workers: the machine's two cores)
	$(BIN)/python -m pytest -n 2

ui: install  ## the Dagster UI on the demo's instance and warehouse
	$(BIN)/tradeforge ui

mlflow: install  ## the MLflow UI on the demo's tracking store
	$(BIN)/tradeforge mlflow ui

bench: install  ## throughput benchmarks against their baselines
	$(BIN)/python -m benchmarks

clean:  ## stops the embedded nats-server (if one runs on .tradeforge), then removes the state and the venv
	@if [ -x $(BIN)/tradeforge ]; then $(BIN)/tradeforge bus stop || true; fi
	rm -rf $(VENV) .tradeforge *.egg-info
