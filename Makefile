# recon-diffuser: `make demo` and `make test` are all a new user needs.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-all demo-models test bench weights download-nsd clean-demo

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes; a second `make setup` takes a second.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[dev,captions]'
	touch $(STAMP)

demo: setup
	$(VPY) synthetic_main.py --config configs/demo.toml
	$(VPY) re_recon_main.py dropout_demo
	@echo "demo finished: see demo_output/results/synthetic/ (images/, eval/) and demo_output/results/experiments/"

# The demo plus experiments 2 (AI captions, offline template captioner) and 3 (perturbations).
demo-all: demo
	$(VPY) re_recon_main.py captions_demo
	$(VPY) re_recon_main.py adv_pert_demo

# Retrain the demo's miniature networks on CPU into miniature/weights/ (seeded, bitwise reproducible on one CPU;
# 30 min on a 2-core EPYC (1,797 s), 45 on one 1.6x slower).
demo-models: setup
	$(VPY) -m miniature.train

test: setup
	$(VPY) -m pytest tests

bench: setup
	$(VPY) benchmarks/ridge_bench.py
	$(VPY) benchmarks/versatile_bench.py

weights: setup
	$(VPY) -m models.weights --weights-dir $${WEIGHTS_DIR:-weights}

# Every model at its published size with random weights, written in the `make weights` layout
# (a temporary ~16 GB folder), loaded back and run on one 512 px image; ~11 GB RAM, CPU by default.
.PHONY: rehearse
rehearse: setup
	$(if $(shell command -v flock),flock /tmp/recon-heavy.lock) $(VPY) -m models.rehearse $(REHEARSE_ARGS)

download-nsd: setup
	$(VPY) -m prepare_data.download_nsd --dest $${NSD_DIR:-raw/nsd} --subjects 1 2 5 7 --sessions 37

clean-demo:
	rm -rf demo_output
