# The two commands of the README: `make demo` and `make test`. Each installs what is missing
# (scripts/setup.sh, a no-op when all is there), builds, and runs.
SHELL := /bin/bash
RUN := scripts/with-env
CARGO := $(RUN) cargo

.PHONY: setup build demo test bench fmt clippy

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --bin mixq

demo: build
	target/debug/mixq demo
	target/debug/mixq search --budget avg-bits=3.5 -o target/mixq-demo-config.json

test: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --all-targets

bench: setup
	$(CARGO) bench
	$(CARGO) bench -p mixq-kernels

fmt:
	$(CARGO) fmt --all
