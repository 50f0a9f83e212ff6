# Two commands on a fresh Linux machine (Python 3.10+, no GPU, no Hugging Face Hub needed):
#   make demo   set up .venv, synthesise a Swahili corpus, prepare, train the tiny model, evaluate
#   make test   set up .venv with the test extras and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only build machines a local CPU wheel may be preferred by pip's find-links;
# elsewhere PyPI's build (CUDA on Linux x86_64) is installed. Override: make demo TORCH=torch==2.x
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo_out

.PHONY: demo test install clean

$(BIN)/w2vbert-asr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[lm,test]"
	# pyctcdecode pins numpy<2, which pyarrow (datasets) cannot use; it runs fine on numpy 2.
	$(BIN)/python -m pip install --quiet --no-deps "pyctcdecode==0.5.0"
	touch $@

install: $(BIN)/w2vbert-asr

demo: install
	$(BIN)/w2vbert-asr synth recipe=demo output_dir=$(DEMO_DIR)
	$(BIN)/w2vbert-asr train recipe=demo output_dir=$(DEMO_DIR)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DIR) outputs
