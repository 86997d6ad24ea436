"""Suite-wide: no QEMU process this test process started may outlive the suite, and every
test's randomness is seeded and reported on failure."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import pytest


def child_qemus() -> list[int]:
    """PIDs of QEMU processes whose parent is this process."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if fields[1] == me and comm.startswith("qemu-system"):
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    yield
    left = child_qemus()
    assert not left, f"QEMU processes outlived the suite: {left}"


@pytest.fixture(autouse=True)
def seeded_random(request: pytest.FixtureRequest) -> Iterator[int]:
    """Every test's random choices come from one seed, printed when the test fails;
    HWHARNESS_SEED=<seed> repeats them."""
    seed = int(os.environ.get("HWHARNESS_SEED") or random.SystemRandom().getrandbits(32))
    random.seed(seed)
    request.node.hwharness_seed = seed
    yield seed


@pytest.fixture
def rng(seeded_random: int) -> random.Random:
    """A generator of the test's own, seeded like the module-level one."""
    return random.Random(seeded_random)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()               # type: ignore[attr-defined]
    seed = getattr(item, "hwharness_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"HWHARNESS_SEED={seed} repeats this test's random choices"))
