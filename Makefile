# kaapcli: the two set-up commands of the README, plus docs and benchmarks.
#   make demo   venv + kaapcli, then the examples pipeline on mock data (embedded defaults, no servers)
#   make test   system packages (as root, apt), venv + test extras, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PACKAGES = dcmtk dicom3tools orthanc orthanc-dicomweb dcm2niix chromium redis-server make python3-venv

.PHONY: demo test check venv test-deps system-deps docs docs-check bench lint clean

$(BIN)/kaapcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -m compileall -q kaapcli  # as pip does for an installed package: no recompiling at every start
	touch $@

venv: $(BIN)/kaapcli

demo: venv
	$(MAKE) -C examples demo KAAPCLI=$(abspath $(BIN))/kaapcli PYTHON=$(abspath $(BIN))/python

# Installs what the tests talk to (DCMTK, dicom3tools, Orthanc + DICOMweb, dcm2niix, Chromium, Redis) when missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: system-deps venv check

check:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check kaapcli tests benchmarks

docs: venv
	$(BIN)/python -m kaapcli.cli.gendocs

docs-check:
	$(BIN)/python -m kaapcli.cli.gendocs --check

bench: venv
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) examples/out benchmarks/out .pytest_cache
