# kaapcli: the two set-up commands of the README, plus docs and benchmarks.
#   make demo   venv + kaapcli, then the examples pipeline on mock data (embedded defaults, no servers)
#   make test   system packages (as root, apt), venv + test extras, then `make check`
#   make check  ruff, mypy (clean), the generated-docs drift check, the whole test suite (in the existing venv)
#   make bench  every benchmark against its anchor tool; the README's performance table from the figures
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PACKAGES = dcmtk dicom3tools orthanc orthanc-dicomweb dcm2niix chromium redis-server make python3-venv man-db openssl jq time zip unzip

.PHONY: demo test check typecheck venv test-deps system-deps docs docs-check dist bench bench-quick lint clean

# editable_mode=compat puts the repository on sys.path with a plain .pth file: setuptools' default editable
# finder costs ~15 ms of every start (of kaapcli and of each test's subprocess); the plain mode is the fallback.
$(BIN)/kaapcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=compat || $(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "heudiconv==1.5.1"  # only for its real Siemens/XA test DICOMs (tests/realdata.py)
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

check: lint typecheck docs-check
	$(BIN)/python -m pytest -q

typecheck: venv
	$(BIN)/mypy kaapcli

lint: venv
	$(BIN)/ruff check kaapcli tests benchmarks

docs: venv
	$(BIN)/python -m kaapcli.cli.gendocs

docs-check: venv
	$(BIN)/python -m kaapcli.cli.gendocs --check

# The wheel and the sdist into dist/ (what tests/test_packaging.py builds and installs)
dist: venv
	$(BIN)/python -m build --outdir dist .

# Every benchmark (the bench extras install what they run against: dicognito), each figure printed next to its
# target, the figures saved to benchmarks/out/figures.jsonl and the README's performance table regenerated from
# them.  bench-quick: the same on small data (a smoke run; the README is left alone).
bench: system-deps venv
	$(BIN)/pip install -q -e ".[bench]" --config-settings editable_mode=compat
	$(BIN)/python benchmarks/report.py --readme README.md

bench-quick: system-deps venv
	$(BIN)/pip install -q -e ".[bench]" --config-settings editable_mode=compat
	$(BIN)/python benchmarks/report.py --quick

clean:
	rm -rf $(VENV) examples/out benchmarks/out .pytest_cache dist build kaapcli.egg-info
