# Two entry points: `make demo` and `make test`. Both set up everything they
# need from a fresh clone: a virtualenv in .venv, the Rust extension built by
# maturin, the dev tools, and the few system packages the tests call.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)
# Release build for both commands: the demo measures latency, and the tests
# must exercise the same code users run. One build serves both.
RUST_SOURCES := Cargo.toml Cargo.lock pyproject.toml $(shell find rust -name '*.rs' -o -name Cargo.toml)
# Python stubs of the peering protocol, generated (never committed) before the package builds.
PROTO_SOURCES := federation/proto/generate.py $(shell find federation/proto -name '*.proto')
PROTO_STUBS := python/meshfed/federation/_proto/peering_pb2_grpc.py

.PHONY: demo test lint test-rust test-python system-deps bench clean servers servers-stop

demo: $(VENV)/.built
	$(BIN)/meshfed demo

test: lint test-rust test-python test-fuzz

lint: $(VENV)/.built
	$(BIN)/ruff check python tests
	$(BIN)/ruff format --check python tests
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest meshfed._core
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test-rust:
	cargo test --workspace --locked

# The Python suite runs against real Consul (ACLs on) and a real Kubernetes
# control plane as well as the doubles; the servers are stopped by PID
# whatever the tests' outcome.
SERVERS := $(CURDIR)/.servers
test-python: $(VENV)/.built system-deps $(BIN)/helm
	$(BIN)/python tests/servers/run.py start $(SERVERS)
	status=0; MESHFED_TEST_SERVERS=$(SERVERS)/servers.json $(BIN)/pytest $(PYTEST_ARGS) || status=$$?; \
	  $(BIN)/python tests/servers/run.py stop $(SERVERS); exit $$status

# Start the real servers for running pytest by hand (tests/servers/run.py); `make servers-stop` ends them.
servers: $(VENV)/.built system-deps
	$(BIN)/python tests/servers/run.py start $(SERVERS)

servers-stop:
	$(BIN)/python tests/servers/run.py stop $(SERVERS)

# Side-by-side benchmark against HAProxy and nginx (bench/README.md); not part of `make test`.
bench: $(VENV)/.built
	bench/run

# `openssl verify` is how the tests check SVIDs with a tool meshfed did not write.
system-deps:
	@command -v openssl >/dev/null || (apt-get update -qq && apt-get install -y -qq openssl)

# helm and the real servers come from the Go module proxy (a package
# registry), never a release download; tests/servers/build compiles each once
# per user and version into a cache outside the clone (several CPU-minutes).
$(BIN)/helm: | $(BIN)/python
	ln -sf "$$(tests/servers/build helm)/bin/helm" $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "maturin>=1.9,<2"

$(PROTO_STUBS): $(BIN)/python $(PROTO_SOURCES)
	$(BIN)/python -m pip install --quiet "grpcio-tools>=1.66"
	$(BIN)/python federation/proto/generate.py

$(VENV)/.built: $(BIN)/python $(RUST_SOURCES) $(PROTO_STUBS)
	$(BIN)/maturin develop --release --locked --extras dev --quiet
	@touch $@

clean:
	rm -rf $(VENV) target python/meshfed/federation/_proto $(SERVERS)

# Fuzzing: a short run of each cargo-fuzz target in every `make test`;
# FUZZ_SECONDS=3600 for a long one. cargo-fuzz comes from crates.io; libFuzzer
# needs the nightly toolchain, which rustup installs beside stable on the
# machines this project runs on. Without nightly the run is reported as
# skipped (the stable proptest over the same parser still runs in cargo test).
FUZZ_SECONDS ?= 15
.PHONY: test-fuzz
test-fuzz:
	@if ! rustup run nightly rustc --version >/dev/null 2>&1; then \
	  echo "test-fuzz: SKIPPED: no nightly toolchain (the proptest parser tests ran in cargo test)"; exit 0; fi; \
	cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz; \
	cd rust/meshfed-gateway && for target in client_hello proxy_v2; do \
	  log=fuzz/fuzz-$$target.log; \
	  cargo +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) >$$log 2>&1 || { cat $$log; exit 1; }; \
	  echo "fuzz $$target: $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' $$log)"; done
