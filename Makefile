# Set-up and everyday commands. `make test` and `make demo` work on a fresh machine:
# they create .venv and install what they need (CPU torch first where there is no GPU).
PY ?= .venv/bin/python
PROTO_DIR := proto
PROTO_FILES := $(PROTO_DIR)/gradserve/v1/gradserve.proto

.PHONY: setup demo test proto lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

proto:
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$(PROTO_DIR) \
	  --pyi_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) $(PROTO_FILES)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	npx --yes @bufbuild/buf lint

bench:
	$(PY) bench/engine_cpu.py
	$(PY) bench/cpu_blocks.py
	$(PY) bench/server_compute.py
	$(PY) bench/mixed_load.py
	$(PY) bench/losses_cpu.py
	$(PY) bench/linear_cpu.py
	$(PY) bench/transfer.py
	$(PY) bench/streamed.py
	$(PY) bench/batching.py
	$(PY) bench/privacy.py
	$(PY) bench/overload.py

clean:
	rm -rf .venv build *.egg-info
