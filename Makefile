# Set-up and the two everyday commands. `make demo` runs the built-in example, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,workflow]"
	touch $@

install: $(VENV)/.installed

# the built-in demo workflow (config/config.yaml): simulates particles of a generated phantom,
# runs the gold-standard iterations and post-processing, and writes the HTML report
demo: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores all
	$(VENV)/bin/snakemake --report report.html

test: $(VENV)/.installed
	$(PY) -m pytest
