# Two commands on a fresh machine:  make demo   (the main job: DSM vs SSM vs Stein on the NCSN toy -> runs/demo/)  and  make test  (the whole suite).
# Both install what is missing first: torch 2.13.0 (CPU build, unless a torch is already there),
# the Python dependencies, and this package with its compiled extension (pip -e, no build isolation).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed-stamp
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install demo test test-fast test-gpu bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q "numpy>=1.24" "pytest>=7" "scipy>=1.10" "tqdm>=4.60" "matplotlib>=3.7" "scikit-learn>=1.3" "setuptools>=77" wheel ninja
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install -q triton || echo "triton not installed: the Triton backend and its tests are skipped"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $(STAMP)

demo: install
	$(PYTHON) -m train.demo

# Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 so the Triton kernels run on CPU tensors.
test: install
	$(PYTHON) -m pytest -q -ra

test-fast: install
	$(PYTHON) -m pytest -q -ra -m "not slow"

# On a machine with a CUDA device: the GPU tests (compiled Triton, the CUDA extension).
test-gpu: install
	$(PYTHON) -m pytest -q -ra -m gpu

bench: install
	$(PYTHON) benchmarks/kernels.py

clean:
	rm -rf build steinops/_C*.so steinops.egg-info .pytest_cache
