# skiff: `make demo` shows it working, `make test` runs every test.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
# RocksDB's C++ build takes ~11 minutes on 2 cores: keep the target directory
# outside the checkout so every clone on this machine shares it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/skiff-target
SKIFF := $(CARGO_TARGET_DIR)/release/skiff

.PHONY: demo test build deps lint fuzz bench bench-dedup bench-serve bench-mount bench-hello bench-registry bench-nydus bench-analyze bench-warm bench-shared bench-relayer bench-containerd bench-takeover images roundtrip clean

deps:
	@tools/install-deps

build: deps
	cargo build --release --locked

lint: deps
	cargo fmt --all -- --check
	cargo clippy --release --locked --workspace --all-targets -- -D warnings

test: build lint
	cargo test --release --locked --workspace

demo: build
	SKIFF=$(SKIFF) tools/demo

images: deps
	tools/install-deps --bench
	tools/make-images

bench: bench-dedup bench-serve bench-mount bench-hello bench-registry bench-nydus bench-analyze bench-warm bench-shared bench-relayer bench-containerd bench-takeover

# Store size and convert speed against casync and file-level zstd.
bench-dedup: build images
	SKIFF=$(SKIFF) bench/dedup.sh

# Chunk server load (wrk, 64 connections) and batch fetch against nginx.
bench-serve: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) CHUNK_FILES=$(CARGO_TARGET_DIR)/release/chunk-files bench/serve.sh

# Lazy mount: first byte, cold and warm reads against local disk, and an
# emulated 100 Mbit/s, 20 ms link against pulling the gzip layers (root).
bench-mount: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/mount.sh

# HelloBench: time to a container's ready line over the emulated WAN, plain pull against skiff run.
bench-hello: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/hello.sh

# An OCI registry as the distribution engine: HelloBench and a cold full read
# through docker-registry, through skiff serve and the plain pull, over the emulated WAN.
bench-registry: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/registry.sh

# Cold reads side by side with Nydus 2.2.0 (installed into ~/.cache/nydus by
# cargo if missing), both from one docker-registry, on loopback and over the emulated link.
bench-nydus: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/nydus.sh

# skiff analyze on the dataset, checked against an independent count.
bench-analyze: build images
	SKIFF=$(SKIFF) bench/analyze.sh

# The hot cache warmed for the first pull after a push (FAST '18's rule).
bench-warm: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/warm.sh

# The dataset's images with their layers cut anew where they share files.
bench-relayer: build images
	SKIFF=$(SKIFF) bench/relayer.sh

# N hosts reading one image at once: one shared cache (--shared) against a cache each.
bench-shared: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy bench/shared.sh

# CRI PullImage to ready: original images through containerd's overlayfs
# snapshotter against skiff images through skiff's, over the emulated link.
bench-containerd: build images
	cargo build --release --locked -p skiff-bench
	SKIFF=$(SKIFF) DELAY_PROXY=$(CARGO_TARGET_DIR)/release/delay-proxy \
	  CRI_START=$(CARGO_TARGET_DIR)/release/cri-start bench/containerd.sh

# Every dataset image: convert, export, umoci unpack, compare with the source.
roundtrip: build images
	cargo test --release --locked -p skiff-tests --test dataset -- --ignored --nocapture

clean:
	cargo clean

# A reader across kill -9 of its mount's daemon and across `skiff upgrade`, against a remount.
bench-takeover: build
	SKIFF=$(SKIFF) bench/takeover.sh

# Coverage-guided fuzzing (cargo-fuzz, libFuzzer): every target in
# tests/fuzz for FUZZ_SECONDS each (not in CI). Crashes land in
# tests/fuzz/artifacts/TARGET/; each one found becomes a regression test.
FUZZ_SECONDS ?= 600
fuzz: deps
	tools/fuzz $(FUZZ_SECONDS)
