"""pytest-split's groups partition this suite: every test in exactly one group, together all of them.

CI runs the suite as ``make test PYTEST_ARGS="--splits=N --group=i"``, one runner per
group (docs/ci.md, docs/ci-workflow.yml); a test in no group would never run and one in
two would run twice. Each collection runs in a pytest of its own, as CI runs it, with the
durations committed in ``.test_durations``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "docs" / "ci-workflow.yml"
DURATIONS = REPO / ".test_durations"
# The plugin by its module name, whatever entry point the installed package has.
PLUGIN = ["-p", "no:hwharness", "-p", "harness.tools.pytest_plugin"]


def collected(*args: str) -> list[str]:
    """The node IDs ``pytest --collect-only -q`` lists with ``args``, in order."""
    done = subprocess.run([sys.executable, "-m", "pytest", *PLUGIN, "--collect-only", "-q", "-p", "no:cacheprovider",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


@functools.cache
def everything() -> list[str]:
    return collected()


def test_the_groups_partition_the_suite() -> None:
    splits = 3                                 # with pytest-split's default algorithm, as CI runs it
    with ThreadPoolExecutor(splits + 1) as pool:
        whole = pool.submit(everything)
        groups = list(pool.map(lambda i: collected(f"--splits={splits}", f"--group={i}"), range(1, splits + 1)))
    everything_ = whole.result()
    assert len(everything_) > 100 and len(set(everything_)) == len(everything_)
    for i, group in enumerate(groups, 1):
        assert group, f"group {i} of {splits} is empty"
    owners: dict[str, list[int]] = {}
    for i, group in enumerate(groups, 1):
        for test in group:
            owners.setdefault(test, []).append(i)
    twice = {t: g for t, g in owners.items() if len(g) > 1}
    assert not twice, f"tests in more than one group: {twice}"
    assert set(owners) == set(everything_), f"in no group: {sorted(set(everything_) - set(owners))}"


def test_the_stored_durations_name_tests_of_this_suite() -> None:
    durations = json.loads(DURATIONS.read_text())
    assert durations and all(isinstance(s, (int, float)) and s >= 0 for s in durations.values())
    known = set(everything())
    stale = set(durations) - known
    # A renamed or removed test leaves its old entry behind until the next --store-durations.
    assert len(stale) <= len(durations) // 10, f"refresh .test_durations (docs/ci.md): stale {sorted(stale)[:10]}"


def test_the_workflow_example_runs_every_group_of_its_split() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["test"]
    groups = job["strategy"]["matrix"]["group"]
    splits = int(job["env"]["SPLITS"])
    assert sorted(groups) == list(range(1, splits + 1))
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "make deps" in commands
    assert 'make test PYTEST_ARGS="--splits=$SPLITS --group=${{ matrix.group }}' in commands
    assert "/dev/kvm" in commands, "the workflow says whether the runner has KVM"
