# The local stack contract: make test | demo | up | down | bench; make function builds the OCI Function.
# Every target installs what is missing: Debian packages, uv, the locked Python environment.
SHELL := /bin/bash
.DEFAULT_GOAL := help

APT_PACKAGES := qemu-utils openssh-server openssh-client e2fsprogs xfsprogs dosfstools mtools ntfs-3g btrfs-progs lvm2 mmdebstrap fdisk util-linux curl postgresql \
	qemu-system-x86 ovmf syslinux syslinux-common busybox-static systemd-boot-efi binutils cpio kmod zstd xz-utils libhivex-bin
# Every Python process make starts caches the bytecode of what it imports (under the environment's
# and the project's __pycache__/, both ignored by git). Where PYTHONDONTWRITEBYTECODE is set, as on
# CI, no process ever cached any, and each one compiled Prefect from source again: 3.4 s of a core
# to import prefect, 9.5 s for its server, against 1.7 s and 5.3 s from bytecode; a test run starts
# hundreds of such processes. (Compiling the whole environment at install instead, uv's
# --compile-bytecode, took a minute of CPU for 26,000 files, most of them never imported.)
export PYTHONDONTWRITEBYTECODE :=
# Looked up at each use, so a uv that uv-env just installed is found.
UV = $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
# The suite waits more than it computes: more workers than cores, so the end-to-end modules (most
# on the session's one shared stack) run side by side with the rest. Three, not four: on two cores
# a fresh-clone run took as long with three (10:36 against 10:27), at a load average of 4 to 7
# instead of 6 to 13.
PYTEST_WORKERS ?= 3
# Growth shows in every run: the slowest tests, and the total on pytest's last line.
PYTEST_REPORT := --durations=15
PYTEST_ARGS ?=
FUNCTION_BUILD_DIR ?= .local/function-build

.PHONY: help deps apt-deps uv-env test test-fast test-fleet up down status demo bench fleet function

help:
	@echo "make test   install what is missing, run the whole test suite"
	@echo "make test-fast  the inner loop: units and the core against the local OCI, no Prefect server"
	@echo "make up     start the local stack in the background (.local/stack.env)"
	@echo "make demo   make up, then import a sample disk end to end and verify it"
	@echo "make down   stop everything 'make up' started"
	@echo "make bench  time imports against the floor and the reference (not part of make test)"
	@echo "make fleet  a burst of uploads through a schedule of faults, on PostgreSQL and two hosts (FLEET_ARGS)"
	@echo "make function  write the upload function's build directory (FUNCTION_BUILD_DIR, default .local/function-build)"

deps: apt-deps uv-env

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

uv-env:
	@[ -x "$(UV)" ] || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet

# --no-loadscope-reorder: modules in the order tests/conftest.py puts them (longest first).
test: deps
	$(UV) run pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_REPORT) $(PYTEST_ARGS)

# The inner loop: units and core-level tests against the local OCI, without the tests that start a
# Prefect server (marked ``stack``) or move gigabytes, copy between regions or boot a machine
# (marked ``heavy``); see tests/conftest.py. make test runs them all.
test-fast: deps
	$(UV) run pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not stack and not heavy" $(PYTEST_REPORT) $(PYTEST_ARGS)

up: deps
	$(UV) run python -m deployments.local_stack up

demo: deps
	$(UV) run python -m deployments.demo

down:
	@$(UV) run --frozen python -m deployments.local_stack down

status:
	@$(UV) run --frozen python -m deployments.local_stack status

bench: deps
	$(UV) run python -m deployments.bench $(BENCH_ARGS)

fleet: deps
	$(UV) run python -m deployments.fleet $(FLEET_ARGS)

# The small fleet of make test alone (10 uploads, a host killed, the core APIs throttled).
test-fleet: deps
	$(UV) run pytest tests/e2e/test_fleet.py

# What `fn deploy` builds the function image from: function_trigger/ plus diskimport/contract.py.
function: deps
	$(UV) run python -m function_trigger.build $(FUNCTION_BUILD_DIR)
