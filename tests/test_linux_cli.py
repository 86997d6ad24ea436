"""The console commands and the boot bench, as a person runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from harness.tools.bench import boot

pytestmark = pytest.mark.qemu
pytest_plugins = ["pytester"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def test_run_prints_the_output_and_exits_with_the_status(linux_accel, linux_image) -> None:
    done = subprocess.run(cli("run", "--accel", linux_accel, "--", "uname -r; echo done; false"),
                          capture_output=True, text=True, timeout=300)
    assert done.stdout == f"{linux_image.release}\ndone\n", done.stderr
    assert done.returncode == 1


def test_boot_attaches_the_terminal_until_ctrl_close_bracket(linux_accel, linux_image) -> None:
    session = pexpect.spawn(sys.executable, ["-m", "harness", "boot", "--accel", linux_accel],
                            encoding="utf-8", timeout=120)
    try:
        session.expect("Ctrl-] leaves")
        session.expect_exact(linux_image.prompt)
        session.send("echo $((20+22))\r")          # raw mode: the Enter key sends CR
        session.expect_exact("echo $((20+22))")     # a person sees what they type
        session.expect("42")
        session.send("\x1d")
        session.expect(pexpect.EOF)
    finally:
        session.close(force=True)
    assert session.exitstatus == 0


def test_boot_bench_reports_every_phase(linux_accel, tmp_path) -> None:
    result = boot.run(linux_accel, count=1, restore_count=2, parallel_count=2, idle_count=1, idle_s=0.1)
    phases = result["phases_p50_s"]
    assert set(phases) == set(boot.PHASES)
    # one boot: its phases telescope from QEMU's exec to the answered command
    assert sum(phases.values()) == pytest.approx(result["boot_p50_s"], abs=1e-6)
    assert phases["qemu_start"] > 0 and phases["init_to_prompt"] > 0 and phases["prompt_to_answer"] > 0
    assert result["parallel2_s"] > 0 and result["restore_p50_ms"] > 0 and result["proxy_boot_p50_ms"] > 0
    assert set(result["restore_standby_phases_p50_ms"]) == set(boot.STANDBY_PHASES)
    assert result["restore_standby_p50_ms"] > 0
    assert result["after_idle"]["count"] == 1 and result["after_idle"]["boot_p50_s"] > 0
    assert (result["init_icount_s"] > 0) if result["accel"] == "tcg" else (result["init_icount_s"] is None)


def test_a_users_three_line_test_passes_with_the_plugin(pytester, linux_accel, linux_image) -> None:
    pytester.makepyfile(f"""
        def test_mine(linux_machine):
            output, status = linux_machine.console.run("uname -r")
            assert status == 0 and output == {linux_image.release!r}
    """)
    result = pytester.runpytest("-p", "no:xdist", f"--hwharness-accel={linux_accel}")
    result.assert_outcomes(passed=1)


def test_restoring_inside_each_test_takes_the_qemu_that_stood_by(pytester, linux_accel) -> None:
    """--hwharness-restore-ahead 0: each test's machine is the QEMU that stood by during the
    test before it; once the session ends, none is left."""
    pytester.makepyfile("".join(f"""
        def test_{i}(linux_saved, linux_machine):
            assert linux_machine.console.run("echo {i} > /tmp/who; cat /tmp/who") == ("{i}", 0)
            with open("seen.txt", "a") as f:
                f.write(f"{{linux_machine.process.pid}} {{linux_saved.standing_by.process.pid}}\\n")
        """ for i in range(3)))
    result = pytester.runpytest("-p", "no:xdist", f"--hwharness-accel={linux_accel}", "--hwharness-restore-ahead=0")
    result.assert_outcomes(passed=3)
    seen = [tuple(map(int, line.split())) for line in (pytester.path / "seen.txt").read_text().splitlines()]
    assert [machine for machine, _ in seen[1:]] == [standing for _, standing in seen[:-1]]
    for machine, standing in seen:
        with pytest.raises(ProcessLookupError):
            os.kill(standing, 0)


def test_a_pytest_split_group_shares_one_saved_boot_and_removes_it(pytester, linux_accel) -> None:
    record = """
        def record(saved, machine):
            with open("seen.txt", "a") as f:
                f.write(f"{saved.directory} {machine.process.pid}\\n")
    """
    for module in ("a", "b"):
        pytester.makepyfile(**{f"test_{module}": record + "".join(f"""
        def test_{module}{i}(linux_saved, linux_machine):
            record(linux_saved, linux_machine)
        """ for i in (1, 2))})
    # The plugin by its module name, whatever entry point the installed package has.
    result = pytester.runpytest("-p", "no:xdist", "-p", "no:hwharness", "-p", "harness.tools.pytest_plugin",
                                f"--hwharness-accel={linux_accel}", "--splits=2", "--group=1")
    result.assert_outcomes(passed=2, deselected=2)
    seen = [line.split() for line in (pytester.path / "seen.txt").read_text().splitlines()]
    assert len(seen) == 2
    assert len({directory for directory, _ in seen}) == 1, "the group's tests restore from one saved boot"
    assert len({pid for _, pid in seen}) == 2, "each test has a machine of its own"
    assert not Path(seen[0][0]).exists(), "the saved boot is removed when the group ends"
