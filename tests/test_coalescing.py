"""Interrupt coalescing on the real devices: what QEMU 7.2's nvme does with NVMe's feature."""

from __future__ import annotations

import pytest

from drivers.nvme import Coalescing, Command, Nvme, NvmeError
from drivers.nvme.regs import FEATURE_INTERRUPT_COALESCING, Admin
from harness.proxy import ProxyMachine

pytestmark = pytest.mark.qemu

FEATURE_NOT_CHANGEABLE = (1, 0x0E)      # command specific status of Set Features


@pytest.fixture(scope="module")
def machine(proxy_machine_factory_module, tmp_path_factory) -> ProxyMachine:
    image = tmp_path_factory.mktemp("coalescing") / "blank.img"
    image.write_bytes(bytes(1 << 20))
    return proxy_machine_factory_module(lambda spec: spec.nvme([{"file": str(image), "format": "raw"}]),
                                        name="coalescing")


def test_qemus_nvme_refuses_interrupt_coalescing_and_the_driver_says_so(machine: ProxyMachine) -> None:
    """QEMU 7.2 answers Set Features 08h with Feature Not Changeable and Get Features with 0
    (one completion per interrupt): the option raises rather than pretend, and leaves the
    controller for the next driver."""
    with pytest.raises(NvmeError) as refused:
        Nvme.open(machine.bus, interrupts=True, coalesce=Coalescing(8, 100))
    assert refused.value.status == FEATURE_NOT_CHANGEABLE
    assert "Feature Not Changeable" in str(refused.value)
    nvme = Nvme.open(machine.bus, interrupts=True)
    try:
        assert nvme.admin is not None
        kept = nvme.admin.execute(Command(Admin.GET_FEATURES, cdw10=FEATURE_INTERRUPT_COALESCING, name="GET"))
        assert Coalescing.of(kept) == Coalescing()
        ns = nvme.namespaces()[0]
        assert ns.read(0, 8) == bytes(4096)
    finally:
        nvme.close()
