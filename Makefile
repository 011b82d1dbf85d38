# `make demo`: set up .venv and run the whole pipeline offline (tiny model, photos from installed packages).
# `make test`: set up .venv and run the test suite (what CI runs); `make test-fast`: the fast subset (tests/conftest.py).
# `make app`: set up .venv and start the local web page on http://127.0.0.1:7860 (docs/app.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean app

setup: $(STAMP)

$(STAMP): requirements.txt requirements-app.txt requirements-cluster.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	# --no-deps: gradio caps pillow below the version requirements.txt pins (see requirements-app.txt)
	$(BIN)/python -m pip install --no-deps -r requirements-app.txt
	# Ray: optional for users (evaluate.py --sweep --ray), installed here because the tests run it
	$(BIN)/python -m pip install -r requirements-cluster.txt
	touch $(STAMP)

demo: setup
	$(BIN)/python -m testkit.tiny data/tiny_sd --arcface data/arcface_random.pth
	$(BIN)/python -m dataset_tools.demo_photos data/demo_raw
	$(BIN)/python -m dataset_tools.prepare source data/demo_raw/source data/demo/source
	$(BIN)/python -m dataset_tools.prepare reference data/demo_raw/reference data/demo/reference
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_magicapture.py --config configs/demo.toml
	$(BIN)/python generate.py --config configs/demo.toml --n 2 --steps 10
	# no --config: the demo's ArcFace is random, dlib's network is real; no CLIP or aesthetic weights here (skipped, one line each)
	$(BIN)/python evaluate.py --generated out/demo/generated --source data/demo/source --reference data/demo/reference --out out/demo/evaluation
	@echo "demo outputs: out/demo/ (LoRA, embeddings, samples/, attention/, logs/, generated/, evaluation/report.html)"

app: setup
	# the demo's tiny model and photos, so that a first try needs nothing else (kept when already there)
	test -f data/tiny_sd/model_index.json || $(BIN)/python -m testkit.tiny data/tiny_sd --arcface data/arcface_random.pth
	test -d data/demo_raw || $(BIN)/python -m dataset_tools.demo_photos data/demo_raw
	$(BIN)/python app.py

test: setup
	bash scripts/run_tests.sh $(BIN)/python

# the tests that need no tiny model, trainer, training subprocess or browser: under a minute, for the edit loop
test-fast: setup
	bash scripts/run_tests.sh $(BIN)/python -m fast

bench: setup
	$(BIN)/python bench/bench_prepare.py

clean:
	rm -rf out data/tiny_sd data/tiny_sd.safetensors data/demo data/demo_raw
