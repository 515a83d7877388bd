# Quick start: `make demo` and `make test` each create .venv (once) and install ann2snn into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-ray wheel-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## compile the bundled MNIST CNN and print ANN vs SNN accuracy on the 10,000 MNIST test images
demo: $(STAMP)
	$(BIN)/ann2snn compile models/mnist_cnn.onnx --calib models/data/mnist_calib.npz -o build/mnist_cnn.snn.onnx
	$(BIN)/ann2snn eval models/mnist_cnn.onnx build/mnist_cnn.snn.onnx --data models/data/mnist_test.npz -T 4,8,16,32

## the default test suite (a few minutes on 2 cores)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## the slow end-to-end checks (full MNIST test set)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## the distributed run/eval tests on a local Ray cluster (installs Ray into .venv first)
test-ray: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[ray]'
	$(BIN)/python -m pytest -q -m ray tests/test_distributed.py

## build the wheel with `python -m build`, install it in a fresh venv, smoke-test it there
wheel-smoke: $(STAMP)
	rm -rf build/dist build/wheel-venv
	$(BIN)/python -m build --wheel --outdir build/dist .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet --disable-pip-version-check build/dist/ann2snn-*.whl
	cd build && wheel-venv/bin/python ../scripts/wheel_smoke.py

clean:
	rm -rf build .pytest_cache
