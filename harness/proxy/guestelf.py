"""Symbols and crash reports for a guest ELF (pyelftools + capstone)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import capstone
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

EXCEPTION_NAMES = {
    0: "divide error (#DE)", 1: "debug (#DB)", 2: "NMI", 3: "breakpoint (#BP)", 4: "overflow (#OF)",
    5: "bound range (#BR)", 6: "invalid opcode (#UD)", 7: "device not available (#NM)",
    8: "double fault (#DF)", 10: "invalid TSS (#TS)", 11: "segment not present (#NP)",
    12: "stack fault (#SS)", 13: "general protection (#GP)", 14: "page fault (#PF)",
    16: "x87 error (#MF)", 17: "alignment check (#AC)", 18: "machine check (#MC)",
    19: "SIMD error (#XM)", 256: "panic",
}


@dataclass(frozen=True)
class Symbol:
    name: str
    addr: int
    size: int


class GuestElf:
    """A guest kernel image: its functions, and the bytes of its loaded sections."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.symbols: list[Symbol] = []
        self._segments: list[tuple[int, bytes]] = []
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self._segments.append((seg["p_vaddr"], seg.data()))
            for sec in elf.iter_sections():
                if isinstance(sec, SymbolTableSection):
                    for s in sec.iter_symbols():
                        if s["st_info"]["type"] in ("STT_FUNC", "STT_NOTYPE") and s.name and s["st_value"]:
                            self.symbols.append(Symbol(s.name, s["st_value"], s["st_size"]))
        self.symbols.sort(key=lambda s: s.addr)

    def symbolize(self, addr: int) -> tuple[Symbol, int] | None:
        """The function containing ``addr`` and the offset into it."""
        best = None
        for s in self.symbols:
            if s.addr <= addr and (s.size == 0 or addr < s.addr + s.size):
                if best is None or s.addr >= best.addr:
                    best = s
        return (best, addr - best.addr) if best else None

    def read(self, addr: int, size: int) -> bytes:
        for base, data in self._segments:
            if base <= addr < base + len(data):
                return data[addr - base:addr - base + size]
        return b""


@functools.lru_cache(maxsize=4)
def _elf(path: Path, mtime_ns: int) -> GuestElf:
    return GuestElf(path)


def load_elf(path: Path) -> GuestElf:
    return _elf(path.resolve(), path.stat().st_mtime_ns)


def disassemble(elf: GuestElf, rip: int, fallback: bytes, context: int = 6) -> list[str]:
    """Instructions around ``rip``, the faulting one marked with ``=>``.

    Decodes from the start of the enclosing function (so the instructions
    before ``rip`` are real boundaries), from the ELF's bytes; if ``rip`` is
    outside the image, from the code bytes the guest copied into the record.
    """
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    sym = elf.symbolize(rip)
    start = sym[0].addr if sym and rip - sym[0].addr < 4096 else rip
    code = elf.read(start, rip - start + 64) or fallback
    if not elf.read(start, 1):
        start = rip
    insns = list(md.disasm(code, start))
    at = next((i for i, ins in enumerate(insns) if ins.address == rip), None)
    if at is None:                   # rip not on a boundary we found: decode from rip itself
        insns = list(md.disasm(fallback or elf.read(rip, 64), rip))
        at = 0
    lines = []
    for ins in insns[max(0, at - context):at + context + 1]:
        mark = "=>" if ins.address == rip else "  "
        where = elf.symbolize(ins.address)
        label = f"<{where[0].name}+{where[1]:#x}>" if where else ""
        lines.append(f"{mark} {ins.address:08x} {label:<28} {ins.bytes.hex():<16} {ins.mnemonic} {ins.op_str}")
    return lines


def render_crash(elf: GuestElf, record: dict[str, Any]) -> str:
    """A crash record as a person wants to read it."""
    vector, rip = record["vector"], record["rip"]
    what = EXCEPTION_NAMES.get(vector, f"vector {vector}")
    sym = elf.symbolize(rip)
    where = f"{sym[0].name}+{sym[1]:#x}" if sym else "?"
    lines = [f"guest crash: {what} at {rip:#x} in {where}"]
    if record.get("message"):
        lines.append(f"  message: {record['message']}")
    if vector != 256:
        lines.append(f"  error code {record['error_code']:#x}  cs {record['cs']:#x}  rflags {record['rflags']:#x}")
        regs = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
        for row in range(0, len(regs), 4):
            lines.append("  " + "  ".join(f"{r:>3} {record[r]:016x}" for r in regs[row:row + 4]))
    lines.append("  " + "  ".join(f"{r} {record[r]:x}" for r in ("cr0", "cr2", "cr3", "cr4")))
    lines.append("  code:")
    lines += ["    " + line for line in disassemble(elf, rip, record.get("code", b""))]
    return "\n".join(lines)
