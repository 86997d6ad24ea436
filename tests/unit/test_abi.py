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
    assert abi.offsetof("proxy_shared", "rings") + abi.PROXY_TOTAL_CHANNELS * abi.sizeof("proxy_ring") \
        <= abi.PROXY_DMA_OFFSET
    packer = abi.packer("proxy_request", ["op", "width", "status", "timeout_us", "addr", "value"])
    assert packer.format == "<BBHIQQ"
    assert abi.PROXY_STATUS_OK != abi.PROXY_STATUS_PENDING == 0


def test_what_the_proxy_touches_per_request_avoids_the_tlb_indexes_of_registers() -> None:
    """TCG's TLB is direct-mapped by page number (256 entries, abi.h): the windows' hot
    pages (each window's hot[p], every channel's ring) lie at indexes 0x40-0xbf and the
    kernel's hot symbols at 0xc0-0xef, none at 0x00-0x3f, where a window's first page, the
    LAPIC, the IOAPIC and the registers of every BAR aligned to 256 pages lie."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection
    abi = abi_mod.load_abi(guest_elf())
    hot = abi.offsetof("proxy_shared", "hot")
    assert hot == abi.PROXY_HOT_OFFSET and abi.sizeof("proxy_window_hot") == 4096
    rings_end = abi.offsetof("proxy_shared", "rings") + abi.PROXY_TOTAL_CHANNELS * abi.sizeof("proxy_ring")
    assert 0x40 <= hot >> 12 and (rings_end - 1) >> 12 < 0xc0
    assert abi.offsetof("proxy_shared", "devices") + abi.PROXY_MAX_DEVICES * abi.sizeof("proxy_pci_device") <= hot
    with open(guest_elf(), "rb") as f:
        elf = ELFFile(f)
        symbols = {s.name: s["st_value"] for sec in elf.iter_sections() if isinstance(sec, SymbolTableSection)
                   for s in sec.iter_symbols()}
        text = elf.get_section_by_name(".text")["sh_addr"]
    for name, addr in [("text", text), ("stack_top", symbols["stack_top"] - 1), ("channels", symbols["channels"]),
                       ("ring_at", symbols["ring_at"]), ("windows", symbols["windows"]),
                       ("polling", symbols["polling"]), ("access_kinds", symbols["access_kinds"])]:
        assert 0xc0 <= (addr >> 12) % 256 <= 0xef, f"{name} at {addr:#x}: TLB index {(addr >> 12) % 256:#x}"


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
