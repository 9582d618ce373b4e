# se_compress: the common jobs. MODEL defaults to the shipped default model.
PYTHON ?= python3
MODEL ?= default
OUT ?=
CALIB ?= wikitext2
NPROC ?=
# NPROC=N: detect/quantize/compress in N processes (GPUs) through torchrun's launcher (README: several GPUs)
SE_RUN = se-compress$(if $(NPROC), --nproc $(NPROC),)

.PHONY: quickstart setup test detect ablate compress train-default bench-detect-memory

quickstart: setup  ## install, then find the Super Experts of the shipped default model
	se-compress detect default

setup:  ## install torch (CPU wheel) first, then se_compress with its test extras
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

test:  ## the whole test suite (what .ci/run runs)
	$(PYTHON) -m pytest -q

detect:  ## find the Super Experts of MODEL
	$(SE_RUN) detect $(MODEL) --calib $(CALIB) $(if $(OUT),--out $(OUT),)

TEXT ?= wikitext2

ablate:  ## the paper's study: zero the SEs vs as many random experts [TEXT=wikitext2|books|FILE]
	se-compress ablate $(MODEL) --text $(TEXT) $(if $(OUT),--out $(OUT),)

train-default:  ## retrain the shipped default model with its recipe (--preset v2; GPU: ~200 s on an H200; CPU: see README)
	$(PYTHON) -m se_compress.default_model.train --preset v2 --data ../shared/data/train-text \
		--val se_compress/data/text/wikitext2-valid.txt --out build/train-v2 $(if $(DEVICE),--device $(DEVICE),)

RECIPE ?= qwen3-int4-se-protect

compress:  ## run a recipe from recipes/ on MODEL (default: the shipped model) [RECIPE=... OUT=... FORCE=1 NPROC=N]
	$(SE_RUN) compress --recipe $(RECIPE) --model $(MODEL) $(if $(OUT),--out $(OUT),) $(if $(FORCE),--force,)

# all: every shipped recipe except studies (paper-ablation: `make compress RECIPE=paper-ablation`).
RECIPES ?= all

.PHONY: compare bench-bnb peers bench-peers
peers:  ## create the peers' own venvs: llm-compressor 0.14.0.1 and GPTQModel 7.6.0 (build/<peer>-venv), for peer-* recipes
	se-compress compare --setup-peers

BITS_LIST ?= 4,3,2
bench-peers: peers  ## ours naive / SE-aware, llm-compressor (+ our SE export), GPTQModel at W4/W3/W2 g32: one table with intervals
	$(PYTHON) bench/peers_table.py --bits $(BITS_LIST)

compare:  ## run or reuse RECIPES (default: all shipped) on MODEL; one table + chart in checkpoints/compare-<model>
	se-compress compare --recipes $(RECIPES) --model $(MODEL) $(if $(OUT),--out $(OUT),)

bench-detect-memory:  ## peak RSS of streamed detection vs depth
	$(PYTHON) bench/detect_memory.py

FRACTION ?= 0.25

.PHONY: prune merge bench-prune-merge

prune:  ## remove FRACTION of MODEL's routed experts by REAP, never a Super Expert
	se-compress prune $(MODEL) --fraction $(FRACTION) --criterion reap --se-policy protect --calib $(CALIB) $(if $(OUT),--out $(OUT),)

merge:  ## merge MODEL's routed experts down by FRACTION (output similarity), Super Experts kept alone
	se-compress merge $(MODEL) --fraction $(FRACTION) --se-policy singleton --calib $(CALIB) $(if $(OUT),--out $(OUT),)

bench-prune-merge:  ## ppl after pruning/merging 25% and 50% of experts, each criterion x SE policy
	$(PYTHON) bench/prune_merge.py --model $(MODEL)

BITS ?= 4
METHOD ?= gptq
SE_POLICY ?= noclip,calib
# GROUP: the default model's experts are 32 wide; 128 fits Qwen3-30B-A3B and most published models
GROUP ?= 32

.PHONY: quantize bench-quant

quantize:  ## RTN/GPTQ int BITS (group GROUP) of MODEL with SE_POLICY; compressed-tensors output
	$(SE_RUN) quantize $(MODEL) --method $(METHOD) --bits $(BITS) --group-size $(GROUP) --se-policy $(SE_POLICY) --calib $(CALIB) $(if $(OUT),--out $(OUT),)

bench-quant:  ## ppl/size/time: bf16, W4/W3/W2 RTN+GPTQ x SE policy, and GPTQModel 7.6.0 (own venv)
	$(PYTHON) bench/quant.py --model $(MODEL)

TASKS ?=
LIMIT ?=

.PHONY: eval push

eval:  ## evaluate MODEL: WikiText-2 ppl, lm-eval tasks (shipped copies offline), attention sink, repetition [TASKS=a,b LIMIT=N]
	se-compress eval $(MODEL) $(if $(TASKS),--tasks $(TASKS),) $(if $(LIMIT),--limit $(LIMIT),) $(if $(OUT),--out $(OUT),)

push:  ## write the model card and upload CHECKPOINT to the Hub as REPO_ID (token: HF_TOKEN or `hf auth login`) [DRY_RUN=1]
	se-compress push $(CHECKPOINT) --repo-id $(REPO_ID) $(if $(DRY_RUN),--dry-run,)

bench-bnb:  ## bitsandbytes load_in_4bit leaves the fused experts in bf16: bytes and perplexity beside ours
	$(PYTHON) bench/bnb_naive.py --setup
	$(PYTHON) bench/bnb_naive.py
