# Set-up and everyday commands. Every target installs what it needs first.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install test test-thorough train sample bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -m pip install -q -r requirements.txt

test: install
	HYPOTHESIS_PROFILE=ci $(PYTHON) -m pytest -q -p no:cacheprovider test_math.py test_training.py

test-thorough: install
	HYPOTHESIS_PROFILE=thorough $(PYTHON) -m pytest -q -p no:cacheprovider test_math.py test_training.py

train: install
	$(PYTHON) ddpm_score.py train

sample: install
	$(PYTHON) ddpm_score.py sample --run runs/default

# diffusers (optional, `pip install diffusers`) adds its solvers to tables 4 and 5 of bench_samplers
bench: install
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/bench_samplers.py
	$(PYTHON) benchmarks/bench_train.py
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/bench_trained.py
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/bench_nll.py
