# hwharness: the two commands a person needs are `make demo` and `make test`.
# Both install what they need first (Debian packages need root; see README).

PYTHON ?= python3
ACCEL ?= auto
PYTEST_ARGS ?=
APT_PACKAGES := qemu-system-x86 gcc binutils make mtools dosfstools
STAMP := .deps.stamp

.PHONY: deps guest images test demo bench clean

deps: $(STAMP)

$(STAMP): pyproject.toml
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v mformat >/dev/null \
	        || ! PATH="$$PATH:/sbin:/usr/sbin" command -v mkfs.fat >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	    else \
	        echo "missing Debian packages: run 'sudo apt-get install $(APT_PACKAGES)'" >&2; exit 1; \
	    fi; \
	fi
	$(PYTHON) -m pip install -q -e '.[test]'
	@touch $@

guest:
	$(MAKE) -C guests/proxy

images:
	$(MAKE) -C images

test: deps guest images
	$(PYTHON) -m pytest -n 2 --hwharness-accel $(ACCEL) $(PYTEST_ARGS)

demo: deps guest images
	$(PYTHON) -m harness.cli demo --accel $(ACCEL)

bench: deps guest images
	$(PYTHON) -m harness.cli bench roundtrip --accel $(ACCEL) --json bench-results/roundtrip-$(ACCEL).json
	$(PYTHON) -m harness.cli bench e1000 --accel $(ACCEL) --json bench-results/e1000-$(ACCEL).json
	$(PYTHON) -m harness.cli bench e1000-itr --accel $(ACCEL) --json bench-results/e1000-itr-$(ACCEL).json
	$(PYTHON) -m harness.cli bench ahci --accel $(ACCEL) --json bench-results/ahci-$(ACCEL).json
	$(PYTHON) -m harness.cli bench nvme --accel $(ACCEL) --json bench-results/nvme-$(ACCEL).json
	$(PYTHON) -m harness.cli latency --mode spin --accel $(ACCEL) --json bench-results/latency-spin-$(ACCEL).json \
	    --plot bench-results/latency-spin-$(ACCEL).png
	$(PYTHON) -m harness.cli latency --mode sleep --accel $(ACCEL) --json bench-results/latency-sleep-$(ACCEL).json \
	    --plot bench-results/latency-sleep-$(ACCEL).png

clean:
	$(MAKE) -C guests/proxy clean
	rm -rf bench-results $(STAMP)
