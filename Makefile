# hwharness: the two commands a person needs are `make demo` and `make test`.
# Both install what they need first (Debian packages need root; see README).

PYTHON ?= python3
ACCEL ?= auto
PYTEST_ARGS ?=
APT_PACKAGES := qemu-system-x86 gcc binutils make mtools dosfstools e2fsprogs libc6-dev qemu-utils libnbd-bin
STAMP := .deps.stamp
# apt's progress goes here, not to the terminal; if it fails, its tail is shown
APT_LOG := .deps-apt.log

.PHONY: deps guest images test demo bench clean

deps: $(STAMP)

$(STAMP): pyproject.toml
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v mformat >/dev/null \
	        || ! command -v gcc >/dev/null || ! command -v objcopy >/dev/null \
	        || ! command -v qemu-img >/dev/null || ! command -v nbdinfo >/dev/null \
	        || [ ! -e /usr/lib/x86_64-linux-gnu/libc.a ] \
	        || ! PATH="$$PATH:/sbin:/usr/sbin" command -v mkfs.fat >/dev/null \
	        || ! PATH="$$PATH:/sbin:/usr/sbin" command -v mkfs.ext4 >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "installing $(APT_PACKAGES) with apt-get (its output: $(APT_LOG))"; \
	        if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(APT_PACKAGES); } \
	                >$(APT_LOG) 2>&1; then \
	            echo "apt-get failed; the end of $(APT_LOG):" >&2; tail -n 25 $(APT_LOG) >&2; exit 1; \
	        fi; \
	    else \
	        echo "missing Debian packages: run 'sudo apt-get install $(APT_PACKAGES)'" >&2; exit 1; \
	    fi; \
	fi
	$(PYTHON) -m pip install -q -e '.[test]'
	@touch $@

# The guest is built on first use into a cache keyed by its sources (harness/proxy/guest.py);
# this builds it ahead of time and prints where.
guest:
	$(PYTHON) -c 'from harness.proxy.guest import guest_elf; print(guest_elf())'

images:
	$(MAKE) -C images PYTHON=$(PYTHON)

test: deps guest images
	$(PYTHON) -m pytest -n 2 --hwharness-accel $(ACCEL) $(PYTEST_ARGS)

demo: deps guest images
	$(PYTHON) -m harness demo --accel $(ACCEL)

bench: deps guest images
	$(PYTHON) -m harness bench roundtrip --accel $(ACCEL) --json bench-results/roundtrip-$(ACCEL).json
	$(PYTHON) -m harness bench e1000 --accel $(ACCEL) --json bench-results/e1000-$(ACCEL).json
	$(PYTHON) -m harness bench e1000-itr --accel $(ACCEL) --json bench-results/e1000-itr-$(ACCEL).json
	$(PYTHON) -m harness bench ahci --accel $(ACCEL) --json bench-results/ahci-$(ACCEL).json
	$(PYTHON) -m harness bench nvme --accel $(ACCEL) --json bench-results/nvme-$(ACCEL).json
	$(PYTHON) -m harness bench restart --accel $(ACCEL) --json bench-results/restart-$(ACCEL).json
	$(PYTHON) -m harness latency --mode spin --accel $(ACCEL) --json bench-results/latency-spin-$(ACCEL).json \
	    --plot bench-results/latency-spin-$(ACCEL).png
	$(PYTHON) -m harness latency --mode sleep --accel $(ACCEL) --json bench-results/latency-sleep-$(ACCEL).json \
	    --plot bench-results/latency-sleep-$(ACCEL).png

clean:
	$(MAKE) -C guests/proxy clean
	rm -rf bench-results $(STAMP)
