# Two entry points (see README): `make run` (install + whole DAG on the embedded default)
# and `make test` (install + test suite). Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2

.PHONY: install run test lint schema clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel on disk; a bare `torch` requirement would pull a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/snakemake --cores $(CORES) all

# Everything but the SLURM test first; the SLURM test last (it starts and stops its own
# single-node cluster when run as root with the Debian packages, and skips otherwise).
test: install
	$(BIN)/pytest -q -m "not slurm"
	$(BIN)/pytest -q -m slurm tests/test_slurm.py

lint: install
	$(BIN)/snakemake --lint

schema: install
	$(BIN)/python -m poserft.config --write-schema schemas/config.schema.yaml

clean-results:
	rm -rf results logs .snakemake/metadata
