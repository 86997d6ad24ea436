"""bench instructions without QEMU: -icount reaches QEMU's command line only under TCG."""

from pathlib import Path

import pytest

from harness.errors import BadInput
from harness.machine.spec import Endpoints, MachineSpec, build_argv
from harness.tools.bench import instructions

ENDS = Endpoints(Path("/nonexistent"), "\0qmp", "\0serial", Path("/nonexistent/serial.log"))


def test_icount_goes_on_the_command_line_under_tcg() -> None:
    spec = MachineSpec(icount_shift=0)
    argv = build_argv(spec, "tcg", ENDS)
    assert argv[argv.index("-icount") + 1] == "shift=0"
    assert "-icount" not in build_argv(MachineSpec(), "tcg", ENDS)


def test_icount_under_kvm_is_a_typed_error() -> None:
    with pytest.raises(BadInput, match="TCG"):
        build_argv(MachineSpec(icount_shift=0), "kvm", ENDS)


def test_bench_instructions_refuses_kvm_before_booting() -> None:
    with pytest.raises(BadInput, match="--accel tcg"):
        instructions.run("kvm", quick=True)
