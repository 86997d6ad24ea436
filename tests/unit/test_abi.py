"""The ABI as read back from the built guest ELF."""

from pathlib import Path

import pytest

from harness import access
from harness.errors import AbiError
from harness.proxy import abi as abi_mod
from harness.proxy.guest import guest_elf


def test_layout_comes_from_the_elf() -> None:
    abi = abi_mod.load_abi(guest_elf())
    assert abi.sizeof("proxy_request") == 64
    assert abi.offsetof("proxy_shared", "rings") % 64 == 0
    assert abi.offsetof("proxy_shared", "rings") + abi.PROXY_MAX_CHANNELS * abi.sizeof("proxy_ring") \
        <= abi.PROXY_DMA_OFFSET
    packer = abi.packer("proxy_request", ["op", "width", "status", "timeout_us", "addr", "value"])
    assert packer.format == "<BBHIQQ"
    assert abi.PROXY_STATUS_OK != abi.PROXY_STATUS_PENDING == 0


def test_pci_constants_and_read_only_config_fields_come_from_the_elf() -> None:
    """abi.h's PCI registers and its read-only config-space table: what the proxy enforces and
    the qtest transport applies; the contract's own copy of the command bits agrees."""
    abi = abi_mod.load_abi(guest_elf())
    pci = abi.names("PROXY_PCI_")
    assert (pci.COMMAND, pci.COMMAND_MEMORY, pci.COMMAND_MASTER) == \
        (access.PCI_COMMAND, access.PCI_COMMAND_MEMORY, access.PCI_COMMAND_MASTER)
    assert len(abi.table("proxy_readonly_config")) == abi.PROXY_READONLY_CONFIG_FIELDS
    msi = (pci.CAP_ID_MSI, 0x50)
    assert abi.readonly_config(pci.HEADER_NORMAL, [msi, (pci.CAP_ID_MSIX, 0x70)]) == \
        [(pci.BAR0, 24), (0x30, 4), (0x54, 10)]                 # BARs 0-5, ROM, MSI address and data
    assert abi.readonly_config(pci.HEADER_BRIDGE | pci.HEADER_MULTI_FUNCTION, []) == [(pci.BAR0, 8), (0x38, 4)]
    with pytest.raises(AbiError, match="no table"):
        abi.table("proxy_nothing")


def test_another_abi_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abi_mod, "HOST_ABI_VERSION", 99)
    abi_mod._load.cache_clear()
    with pytest.raises(AbiError, match="ABI version"):
        abi_mod.load_abi(guest_elf())
    abi_mod._load.cache_clear()


def test_a_missing_elf_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(AbiError, match="make guest"):
        abi_mod.load_abi(tmp_path / "nope.elf")
