"""The ABI as read back from the built guest ELF."""

from pathlib import Path

import pytest

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


def test_another_abi_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abi_mod, "HOST_ABI_VERSION", 99)
    abi_mod._load.cache_clear()
    with pytest.raises(AbiError, match="ABI version"):
        abi_mod.load_abi(guest_elf())
    abi_mod._load.cache_clear()


def test_a_missing_elf_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(AbiError, match="make guest"):
        abi_mod.load_abi(tmp_path / "nope.elf")
