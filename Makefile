PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-frontends lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

# The TF/TFLite front-ends' extra (TensorFlow, ~1.3 GB installed) is not part of `make test`; without it their
# tests skip with the reason. This target installs it and runs them (docs/frontends.md).
$(VENV)/.tf-installed: $(VENV)/.test-installed
	$(PIP) install -e '.[test,tf]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.test-installed
	$(PY) -m pytest

test-frontends: $(VENV)/.tf-installed
	$(PY) -m pytest tests/test_frontends.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) out
