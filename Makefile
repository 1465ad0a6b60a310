# Two commands set up a fresh machine: `make demo` and `make test`; each installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install test demo bench clean

# torch first, pinned to the CPU wheel that lies on these machines, so that no
# later requirement can pull a multi-GB CUDA build; then the package itself.
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,ray]"
	@if command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; --data fashion-mnist will say how"; fi
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PYTHON) -m pytest -n 2 tests

demo: install
	mkdir -p out
	glorocert certify models/mnist-5k-eps0.3/model.onnx --data mnist-5k --eps 0.3,1.0 \
		--out out/demo-rows.csv --summary out/demo-summary.json --plot out/demo-curve.png

bench: install
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf out $(STAMP) .pytest_cache
