# All set-up comes from this file: a fresh machine needs only Python 3.11 and the package registries.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench lint clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
