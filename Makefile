# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Two pytest workers: the suite's tests are single-threaded (OMP_NUM_THREADS=1), the machine has
# two cores. Tests sharing a session fixture (the demo run, the loopback cluster) stay together.
PYTEST_WORKERS ?= 2
# --no-loadscope-reorder: the groups run costliest first, as tests/conftest.py orders them.
XDIST := -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

# The embedded default: real handwritten digits, a small CNN, 2 CPU DDP workers, WE on.
# Each run gets a new name, so `make demo` always trains (the same name would resume).
demo: setup
	$(BIN)/we-dist convert digits --out data/digits
	$(BIN)/we-dist train recipes/demo.yaml name=demo-$$(date +%Y%m%d-%H%M%S)

# The whole suite: fast unit tests and slow integration tests (real Ray, MLflow, FFCV).
test: setup
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
