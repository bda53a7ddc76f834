# `make test` is what CI runs: it builds .venv from nothing, installs olmoe with its test extra and
# runs the tests. torch is pinned and installed first: this machine's package index serves a local
# CPU wheel for torch==2.13.0, while an unpinned requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo demo-chat clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The quickstart: tokenise the Python standard library, train a small OLMoE on it
# (configs/quickstart.yaml, or configs/quickstart-fp32.yaml where the CPU has no bf16 matrix
# instructions and trains in float32), save it to runs/quickstart; then
# `.venv/bin/olmoe generate runs/quickstart "def fibonacci(n):"`.
DEMO_DATA := data/stdlib/metadata.json
DEMO_PRECISION = $(shell $(PY) -c "import torch; from olmoe.hardware import training_precision; print(training_precision('auto', torch.device('cpu')))")

$(DEMO_DATA): $(STAMP)
	$(PY) -m olmoe data prepare stdlib --out data/stdlib --force

demo: $(DEMO_DATA)
	$(PY) -m olmoe train configs/$(if $(filter fp32,$(DEMO_PRECISION)),quickstart-fp32,quickstart).yaml

# The instruct quickstart, after `make demo`: requests for the standard library's functions and
# broken variants of their source (bench/demo_chat.py build, offline), SFT of runs/quickstart into
# runs/quickstart-sft, DPO of that into runs/quickstart-dpo, the held-out numbers before and after
# (bench/demo_chat.py report), and one held-out request answered through `olmoe chat`: about 10
# minutes on 2 CPU cores (docs/training.md#instruct-quickstart). The run directories start
# afresh: a run directory keeps its prepared data and DPO reference log-probabilities for
# --resume, and a fresh run in it would reuse them, stale after a new SFT model or data.
CHAT_DATA := data/stdlib-chat

demo-chat:
	$(PY) bench/demo_chat.py build --out $(CHAT_DATA)
	rm -rf runs/quickstart-sft runs/quickstart-dpo
	$(PY) -m olmoe train configs/quickstart-sft.yaml
	$(PY) -m olmoe train configs/quickstart-dpo.yaml
	$(PY) bench/demo_chat.py report --out $(CHAT_DATA)
	$(PY) bench/demo_chat.py request --out $(CHAT_DATA) > $(CHAT_DATA)/request.txt
	@echo "olmoe chat runs/quickstart-dpo answers it:"
	$(PY) -m olmoe chat runs/quickstart-dpo --max-new-tokens 80 --temperature 0 \
		< $(CHAT_DATA)/request.txt

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
