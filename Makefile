# One-command entry points. Every target creates the virtual environment first if it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install test demo study clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (CPU torch on CPU machines)

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q

demo: $(STAMP)  ## the main job on simulated data (see README)
	$(PY) demo.py --output_dir demo_output

study: $(STAMP)  ## the multi-seed study (see README; ~75-90 min on 2 idle cores)
	$(PY) demo.py --study --output_dir study_output

clean-venv:
	rm -rf $(VENV)
