# Quick start: `make demo` and `make test` each create .venv (once) and install ann2snn into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-ray test-gpu wheel-smoke kernels clean

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

## the GPU tests (skipped without onnxruntime-gpu and a CUDA GPU; README "One GPU" installs them)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/test_device.py

## build the wheel with `python -m build`, install it in a fresh venv, smoke-test it there
wheel-smoke: $(STAMP)
	rm -rf build/dist build/wheel-venv
	$(BIN)/python -m build --wheel --outdir build/dist .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet --disable-pip-version-check build/dist/ann2snn-*.whl
	cd build && wheel-venv/bin/python ../scripts/wheel_smoke.py

## optional: the compiled multi-step IF-neuron kernels (g++ and npm; see README "Speed and memory").
## The onnxruntime C API headers come from the npm package below, fetched once into ORT_HEADERS.
ORT_HEADERS_PKG := com.github.asus4.onnxruntime@0.4.9
ORT_HEADERS ?= $(HOME)/.cache/ann2snn/ort-headers-0.4.9/Headers
ORT_HEADERS_PATH := package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers
KERNELS_LIB := runtime/kernels/libann2snn_kernels.so
CXX ?= g++

kernels: $(KERNELS_LIB)

$(ORT_HEADERS)/onnxruntime_c_api.h:
	rm -rf build/ort-headers && mkdir -p build/ort-headers $(dir $(ORT_HEADERS))
	cd build/ort-headers && npm pack --silent $(ORT_HEADERS_PKG) > /dev/null
	tar -xzf build/ort-headers/*.tgz -C build/ort-headers '$(ORT_HEADERS_PATH)'
	rm -rf $(ORT_HEADERS) && mv 'build/ort-headers/$(ORT_HEADERS_PATH)' $(ORT_HEADERS) && rm -rf build/ort-headers

# -ffp-contract=off: no fused multiply-add, so the float32 arithmetic is the ONNX function's bit for bit
$(KERNELS_LIB): runtime/kernels/ann2snn_kernels.cc $(ORT_HEADERS)/onnxruntime_c_api.h
	$(CXX) -std=c++17 -O3 -ffp-contract=off -fno-fast-math -shared -fPIC -fvisibility=hidden \
		-I$(ORT_HEADERS) -o $@ $<

clean:
	rm -rf build .pytest_cache $(KERNELS_LIB)
