# se_compress: the common jobs. MODEL defaults to the shipped default model.
PYTHON ?= python3
MODEL ?= default
OUT ?=
CALIB ?= wikitext2

.PHONY: quickstart setup test detect ablate train-default bench-detect-memory

quickstart: setup  ## install, then find the Super Experts of the shipped default model
	se-compress detect default

setup:  ## install torch (CPU wheel) first, then se_compress with its test extras
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

test:  ## the whole test suite (what .ci/run runs)
	$(PYTHON) -m pytest -q

detect:  ## find the Super Experts of MODEL
	se-compress detect $(MODEL) --calib $(CALIB) $(if $(OUT),--out $(OUT),)

ablate:  ## the paper's study: zero the SEs vs as many random experts
	se-compress ablate $(MODEL) $(if $(OUT),--out $(OUT),)

train-default:  ## retrain the shipped default model (about 90 minutes on 2 CPU cores)
	$(PYTHON) -m se_compress.default_model.train --data ../shared/data/train-text \
		--val se_compress/data/text/wikitext2-valid.txt --out build/train-se --plant se --steps 2600 --threads 2

bench-detect-memory:  ## peak RSS of streamed detection vs depth
	$(PYTHON) bench/detect_memory.py
