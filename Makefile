# All set-up comes from this file: a fresh machine needs only Python 3.11 and the package registries.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench device-wheels lint clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23"
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m shiftbench run suites/demo.yaml

# pytest exits 5 when it collects no tests: for us that means a broken suite, never a pass.
test: $(STAMP)
	@$(PY) -m pytest -m "not slow and not bench" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

bench: $(STAMP)
	$(PY) -m pytest -m bench --benchmark-enable --benchmark-only -q

# Wheels for a GPU machine without a package index (Python $(DEVICE_PY) there, torch preinstalled), used by
# benchmarks/device_check.sh: the packages shiftbench needs beyond such an image's usual scientific stack.
DEVICE_PY ?= 3.12
device-wheels: $(STAMP)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version $(DEVICE_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl kornia==0.9.0 kornia_rs==0.2.0 imagecorruptions==1.1.2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
