# Set-up and the two everyday commands. `make demo` runs the built-in example, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: demo test install clean-demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# simulate 4000 particles of a generated phantom (box 64, CTF, SNR 0.1), reconstruct both half maps
# and the full map as relion_reconstruct would, and report the half-map resolution
demo: $(VENV)/.installed
	mkdir -p $(DEMO)
	$(VENV)/bin/omlrelion simulate --map phantom --box 64 --angpix 3.0 --n 4000 --snr 0.1 --seed 1 --o $(DEMO)/particles
	$(VENV)/bin/omlrelion reconstruct --i $(DEMO)/particles.star --o $(DEMO)/half1.mrc --ctf --subset 1
	$(VENV)/bin/omlrelion reconstruct --i $(DEMO)/particles.star --o $(DEMO)/half2.mrc --ctf --subset 2
	$(VENV)/bin/omlrelion reconstruct --i $(DEMO)/particles.star --o $(DEMO)/map.mrc --ctf \
		--half_maps $(DEMO)/half1.mrc $(DEMO)/half2.mrc --json $(DEMO)/map.json

test: $(VENV)/.installed
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO)
