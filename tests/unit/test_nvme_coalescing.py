"""NVMe Interrupt Coalescing (5.21.1.8): its encoding, and the driver's set-then-read-back."""

from __future__ import annotations

import pytest

from drivers.nvme import Coalescing, Command, NvmeError
from drivers.nvme.core import Controller
from drivers.nvme.regs import FEATURE_INTERRUPT_COALESCING, Admin


class FeatureQueue:
    """An admin queue whose controller keeps what Set Features writes (or, ``ignores``, does not)."""

    def __init__(self, ignores: bool = False) -> None:
        self.features: dict[int, int] = {FEATURE_INTERRUPT_COALESCING: 0}
        self.ignores = ignores
        self.commands: list[Command] = []

    def execute(self, command: Command) -> int:
        self.commands.append(command)
        if command.opcode == Admin.SET_FEATURES and not self.ignores:
            self.features[command.cdw10 & 0xFF] = command.cdw11
        return self.features[command.cdw10 & 0xFF] if command.opcode == Admin.GET_FEATURES else 0


def controller(queue: FeatureQueue) -> Controller:
    c = Controller()
    c.admin = queue         # type: ignore[assignment]
    return c


def test_the_setting_is_encoded_as_the_specification_lays_it_out() -> None:
    assert Coalescing(8, 200).cdw11 == 0x0207        # TIME 2 (x 100 us), THR 7 (0's based)
    assert Coalescing(256, 25500).cdw11 == 0xFFFF
    assert Coalescing().cdw11 == 0                    # the reset value: no coalescing
    assert Coalescing.of(0x0207) == Coalescing(8, 200)


@pytest.mark.parametrize("threshold,time_us", [(0, 0), (257, 0), (1, -100), (1, 25600), (1, 150)])
def test_a_setting_the_field_cannot_hold_is_refused_before_the_device_sees_it(threshold: int, time_us: int) -> None:
    with pytest.raises(ValueError):
        Coalescing(threshold, time_us)


def test_what_was_set_is_read_back_through_get_features() -> None:
    queue = FeatureQueue()
    controller(queue).coalesce_interrupts(Coalescing(16, 100))
    assert [c.opcode for c in queue.commands] == [Admin.SET_FEATURES, Admin.GET_FEATURES]
    assert Coalescing.of(queue.features[FEATURE_INTERRUPT_COALESCING]) == Coalescing(16, 100)


def test_a_controller_that_accepts_but_does_not_keep_the_setting_is_an_error() -> None:
    with pytest.raises(NvmeError, match="reports Coalescing"):
        controller(FeatureQueue(ignores=True)).coalesce_interrupts(Coalescing(16, 100))
