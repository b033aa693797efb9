# Two commands do all set-up on a fresh machine (README): `make demo` and `make test`.
# Both create or reuse the virtual environment in .venv. torch is installed first as the CPU build
# (torch==2.13.0 lies on local disk on our machines), so the project install never pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" \
	  || $(PY) -m pip install -q "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m medetect demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
