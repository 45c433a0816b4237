# soundline: `make demo` (install + default corpus + dvc repro), `make test` (install + all tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
BENTO  ?= models/bento/soundline.bento
PORT   ?= 3000
export PATH := $(BIN):$(PATH)
PYTEST_ARGS ?=

.PHONY: install espeak corpus demo repro serve compare test test-unit bench lock clean container-test

# The venv is (re)installed when pyproject.toml or requirements.lock change in content (their
# hash is the stamp), not when a checkout merely touches them.
INSTALL_STAMP = $(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
install:
	@if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$(INSTALL_STAMP)" ]; then \
	  command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (soundline needs Python 3.11; set PYTHON=...)"; exit 1; }; \
	  test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  echo "installing requirements.lock into $(VENV) (torch is the CPU build, found via pip's find-links)"; \
	  $(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]' && echo "$(INSTALL_STAMP)" > $(VENV)/.installed; \
	fi

espeak:
	@command -v espeak-ng >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing espeak-ng (Debian package) for the default corpus"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else \
	    echo "error: espeak-ng is missing and cannot be installed here; install it as root:"; \
	    echo "  apt-get install espeak-ng   (Debian/Ubuntu)   or   brew install espeak-ng (macOS)"; exit 1; \
	  fi; }

# The default corpus is rebuilt byte-identically, so it matches the committed data.dvc.
# An existing data/raw (your own data, or `dvc pull`) is never overwritten.
# TASK=enhance: the paired enhancement corpus (8 espeak speakers x 10 sentences, each in 5 noises)
# instead; data.dvc then tracks it, and a data/raw of the other task is refused, not mixed in.
TASK ?= classify
ENHANCE_CORPUS = --speakers 8 --utterances 10
corpus: install espeak
	@case "$(TASK)" in classify|enhance) ;; *) echo "error: TASK must be classify or enhance, got '$(TASK)'"; exit 1;; esac
	@if [ -d data/raw ]; then \
	   paired=$$(head -1 data/raw/metadata.csv 2>/dev/null | tr ',' '\n' | grep -cx pair); \
	   if [ "$(TASK)" = enhance ] && [ "$$paired" = 0 ]; then \
	     echo "error: data/raw holds recordings without a 'pair' column (a classification corpus); move it away for TASK=enhance"; exit 1; fi; \
	   if [ "$(TASK)" = classify ] && [ "$$paired" = 1 ]; then \
	     echo "error: data/raw holds a paired enhancement corpus; move it away (or run with TASK=enhance)"; exit 1; fi; \
	   echo "data/raw exists: keeping it"; \
	 elif [ "$(TASK)" = enhance ]; then python -m pipeline.data.enhance_corpus --out data/raw $(ENHANCE_CORPUS); \
	 else dvc pull -q data.dvc 2>/dev/null || python -m pipeline.data.corpus --out data/raw; fi
	dvc commit -q -f data.dvc  # into the DVC cache (queued experiments check data out from it)
	dvc status data.dvc

# TASK=enhance runs the same stages as a DVC experiment with task: enhance (params.yaml in the
# workspace then says so; `git checkout params.yaml data.dvc` and a fresh data/raw switch back).
demo: corpus
	@if [ "$(TASK)" = enhance ]; then dvc exp run -S task=enhance; else dvc repro; fi

repro: install
	dvc repro

# The package stage's Bento archive (a DVC output: `dvc pull` brings it), imported into the local
# BentoML store when missing, served on 127.0.0.1:$(PORT).
serve: install
	python -m serving.serve $(BENTO) --port $(PORT)

# Four variants side by side (dvc exp run --queue), then the paired comparison table.
# SEEDS=N runs each variant with train/pretrain seeds 0..N-1 (experiments <variant>-s<seed>); the
# table then shows the seed-to-seed spread beside the variant differences.
# TASK=enhance compares four MaskUNet variants (SI-SNRi, PESQ, STOI per test utterance, beside
# the spectral-gating reference) on the enhancement corpus instead; TASK unset means classify.
# Queued experiments run in temporary workspaces: MLflow must be an absolute URI.
compare: export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
LABEL_FRACTION ?= 1.0
SEEDS ?= 1
COMPARE_TASK = $(or $(TASK),classify)
COMPARE_SET_classify = -S train.label_fraction=$(LABEL_FRACTION)
COMPARE_SET ?= -S task=$(COMPARE_TASK) $(COMPARE_SET_$(COMPARE_TASK))
VARIANTS_classify = cnn cnn-focal mae-scratch mae-pretrained
SET_cnn = -S train.model.arch=cnn
# the focal loss takes no label smoothing (the default recipe's weighted_ce does)
SET_cnn-focal = -S train.model.arch=cnn -S train.loss=focal -S train.label_smoothing=0
SET_mae-scratch = -S train.model.arch=mae -S train.init_from_pretrain=false
SET_mae-pretrained = -S train.model.arch=mae -S train.init_from_pretrain=true
# the default recipe, twice the channels, a log-spectral term in the loss, a clamp(0, 1) mask for the sigmoid
VARIANTS_enhance = unet unet-wide unet-spectral unet-relu
SET_unet =
SET_unet-wide = -S train.enhance.model.channels=16
SET_unet-spectral = -S train.enhance.spectral_weight=0.1
SET_unet-relu = -S train.enhance.model.mask=bounded_relu
VARIANTS = $(VARIANTS_$(COMPARE_TASK))
queue = dvc exp run --queue -n $(1) $(COMPARE_SET) $(2) &&
compare: corpus
	@test -n "$(VARIANTS)" || { echo "error: TASK must be classify or enhance, got '$(TASK)'"; exit 1; }
	@test "$(SEEDS)" -ge 1 2>/dev/null || { echo "error: SEEDS must be a whole number >= 1, got '$(SEEDS)'"; exit 1; }
	$(foreach v,$(VARIANTS),$(if $(filter 1,$(SEEDS)),$(call queue,$(v),$(SET_$(v))),$(foreach s,$(shell seq 0 $$(($(SEEDS) - 1))),$(call queue,$(v)-s$(s),-S train.seed=$(s) -S pretrain.seed=$(s) $(SET_$(v)))))) true
	dvc exp run --run-all -j 1
	python -m pipeline.compare --task $(COMPARE_TASK) --experiments $(VARIANTS) --seeds $(SEEDS)

test: install espeak
	python -m pytest -n 2 $(PYTEST_ARGS)

test-unit: install
	python -m pytest tests/unit $(PYTEST_ARGS)

# The image end to end (tests/container/run.sh): podman build, dvc repro in the container on the
# reduced corpus with an MLflow server container, bentoml serve + a real /classify request.
# Needs podman (../shared/tools/container-sandbox.sh sets it up) and 2-4 min (~7 with a cold
# build): not part of `make test`.
CONTAINER_SANDBOX ?= $(CURDIR)/../shared/tools/container-sandbox.sh
container-test:
	CONTAINER_SANDBOX=$(CONTAINER_SANDBOX) tests/container/run.sh

bench: install espeak
	python benchmarks/featurize.py
	python benchmarks/repro_noop.py

lock: install
	{ echo "# Exact versions installed together (pip constraints). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache reports data/features data/manifest.parquet
