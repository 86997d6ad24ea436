"""The shared-memory ABI, read from the built guest ELF (DWARF, via pyelftools).

guests/proxy/abi.h is the only place the layout is written down. This module
reads its structures and enumerators back out of the ELF's debug info, so no
offset, size or constant is typed twice; the few tables the header defines
(``const`` arrays named ``proxy_*``) are read from the ELF's read-only data at
their symbol, typed by their DWARF. The one number the host states is the ABI
version it was written against, and it refuses any other.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence, Union

from elftools.elf.elffile import ELFFile

from ..errors import AbiError

HOST_ABI_VERSION = 14


@dataclass(frozen=True)
class Scalar:
    size: int
    signed: bool = False
    char: bool = False


@dataclass(frozen=True)
class Array:
    element: "Type"
    count: int

    @property
    def size(self) -> int:
        return self.element.size * self.count


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    type: "Type"


@dataclass(frozen=True)
class Struct:
    name: str
    size: int
    members: tuple[Member, ...]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise AbiError(f"struct {self.name} has no member {name!r}")


Type = Union[Scalar, Array, Struct]


class Abi:
    """Constants and struct layouts of one guest ELF."""

    def __init__(self, consts: dict[str, int], structs: dict[str, Struct], path: Path,
                 tables: dict[str, tuple[Type, bytes]] | None = None) -> None:
        self.consts = consts
        self.structs = structs
        self.path = path
        self._tables = tables or {}
        version = consts.get("PROXY_ABI_VERSION")
        if version != HOST_ABI_VERSION:
            raise AbiError(f"{path}: guest ABI version {version}, this harness speaks {HOST_ABI_VERSION}")

    def __getattr__(self, name: str) -> int:
        # abi.PROXY_RING_ENTRIES and friends
        try:
            return self.consts[name]
        except KeyError:
            raise AttributeError(name) from None

    def reserved_ports(self, base: int, count: int) -> list[str]:
        """Why the proxy refuses ports ``base .. base + count - 1`` to any ISA channel
        (``enum proxy_reserved_ports``): one reason per reserved range they touch."""
        reasons = []
        for name, value in self.consts.items():
            if name.startswith("PROXY_RESERVED_"):
                start, n = value >> 16, value & 0xFFFF
                if start < base + count and base < start + n:
                    what = name.removeprefix("PROXY_RESERVED_").lower().replace("_", " ")
                    reasons.append(f"{start:#x}-{start + n - 1:#x} ({what})")
        return reasons

    def names(self, prefix: str) -> SimpleNamespace:
        """The constants that start with ``prefix``, without it: ``abi.names("PROXY_PCI_").COMMAND``."""
        return SimpleNamespace(**{name.removeprefix(prefix): value for name, value in self.consts.items()
                                  if name.startswith(prefix)})

    def table(self, name: str) -> Any:
        """A table abi.h defines (a ``const`` array), decoded: a list of ints or dicts."""
        try:
            t, raw = self._tables[name]
        except KeyError:
            raise AbiError(f"{self.path}: no table {name} in the debug info and symbols") from None
        return self.decode(t, raw)

    @functools.cached_property
    def _readonly_config(self) -> list[dict[str, int]]:
        return list(self.table("proxy_readonly_config"))

    def readonly_config(self, header_type: int, caps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (offset, size) of every config-space field a channel to this function may not
        write (``proxy_readonly_config``): its BARs and ROM, and each MSI capability's message."""
        bridge = header_type & self.PROXY_PCI_HEADER_LAYOUT == self.PROXY_PCI_HEADER_BRIDGE
        header = self.PROXY_PCI_HEADER_BRIDGE if bridge else self.PROXY_PCI_HEADER_NORMAL
        fields = []
        for field in self._readonly_config:
            if not field["cap"]:
                if field["header"] == header:
                    fields.append((field["offset"], field["size"]))
                continue
            fields += [(at + field["offset"], field["size"]) for cap, at in caps if cap == field["cap"]]
        return fields

    def struct(self, name: str) -> Struct:
        try:
            return self.structs[name]
        except KeyError:
            raise AbiError(f"{self.path}: no struct {name} in the debug info") from None

    def locate(self, struct_name: str, path: str) -> tuple[int, Type]:
        """Offset and type of a dotted member path, e.g. ``locate("proxy_shared", "crash.rip")``."""
        t: Type = self.struct(struct_name)
        offset = 0
        for part in path.split("."):
            if not isinstance(t, Struct):
                raise AbiError(f"{struct_name}.{path}: {part} is not inside a struct")
            m = t.member(part)
            offset += m.offset
            t = m.type
        return offset, t

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.locate(struct_name, path)[0]

    def sizeof(self, struct_name: str) -> int:
        return self.struct(struct_name).size

    def packer(self, struct_name: str, fields: list[str]) -> struct.Struct:
        """A struct.Struct covering ``fields`` (scalars, in order) with the gaps as padding.

        It starts at the first field's offset, so pack_into(buf, base + that offset, ...).
        """
        s = self.struct(struct_name)
        codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
        fmt, pos = "<", s.member(fields[0]).offset
        for name in fields:
            m = s.member(name)
            if not isinstance(m.type, Scalar):
                raise AbiError(f"{struct_name}.{name} is not a scalar")
            if m.offset < pos:
                raise AbiError(f"{struct_name}.{name}: fields out of order")
            fmt += "x" * (m.offset - pos) + codes[m.type.size]
            pos = m.offset + m.type.size
        return struct.Struct(fmt)

    def decode(self, t: Type | str, buf: Any, offset: int = 0) -> Any:
        """Decode a value of type ``t`` at ``offset``: ints, lists, dicts; char arrays as str."""
        if isinstance(t, str):
            t = self.struct(t)
        if isinstance(t, Scalar):
            return int.from_bytes(bytes(buf[offset:offset + t.size]), "little", signed=t.signed)
        if isinstance(t, Array):
            if isinstance(t.element, Scalar) and t.element.char:
                raw = bytes(buf[offset:offset + t.size])
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            if isinstance(t.element, Scalar) and t.element.size == 1:
                return bytes(buf[offset:offset + t.size])
            return [self.decode(t.element, buf, offset + i * t.element.size) for i in range(t.count)]
        return {m.name: self.decode(m.type, buf, offset + m.offset) for m in t.members}


def _attr(die: Any, name: str, default: Any = None) -> Any:
    a = die.attributes.get(name)
    return a.value if a is not None else default


def _name(die: Any) -> str | None:
    n = _attr(die, "DW_AT_name")
    return n.decode() if isinstance(n, bytes) else n


def _resolve(die: Any, structs: dict[str, Struct]) -> Type:
    tag = die.tag
    if tag in ("DW_TAG_typedef", "DW_TAG_volatile_type", "DW_TAG_const_type"):
        return _resolve(die.get_DIE_from_attribute("DW_AT_type"), structs)
    if tag == "DW_TAG_base_type":
        enc = _attr(die, "DW_AT_encoding")
        # DW_ATE_signed 5, signed_char 6, unsigned_char 8
        return Scalar(_attr(die, "DW_AT_byte_size"), signed=enc in (5, 6), char=_name(die) == "char")
    if tag == "DW_TAG_enumeration_type":
        return Scalar(_attr(die, "DW_AT_byte_size"))
    if tag == "DW_TAG_array_type":
        element = _resolve(die.get_DIE_from_attribute("DW_AT_type"), structs)
        count = 1
        for sub in die.iter_children():
            if sub.tag == "DW_TAG_subrange_type":
                upper = _attr(sub, "DW_AT_upper_bound")
                count *= _attr(sub, "DW_AT_count", (upper + 1) if upper is not None else 0)
        return Array(element, count)
    if tag == "DW_TAG_structure_type":
        name = _name(die)
        if name in structs:
            return structs[name]
        members = []
        for m in die.iter_children():
            if m.tag == "DW_TAG_member":
                members.append(Member(_name(m), _attr(m, "DW_AT_data_member_location"),
                                      _resolve(m.get_DIE_from_attribute("DW_AT_type"), structs)))
        s = Struct(name or "<anonymous>", _attr(die, "DW_AT_byte_size"), tuple(members))
        if name:
            structs[name] = s
        return s
    raise AbiError(f"unsupported DWARF type {tag} in the ABI")


def _initial_bytes(elf: ELFFile, path: Path, name: str, size: int) -> bytes:
    """The ``size`` bytes a variable starts with, from the section its symbol points into."""
    symtab = elf.get_section_by_name(".symtab")
    symbols = symtab.get_symbol_by_name(name) if symtab is not None else None
    if not symbols:
        raise AbiError(f"{path}: no symbol {name}; abi.h's tables are defined where PROXY_ABI_TABLES is")
    address = symbols[0]["st_value"]
    for section in elf.iter_sections():
        start = section["sh_addr"]
        if section["sh_type"] == "SHT_PROGBITS" and start <= address and address + size <= start + section["sh_size"]:
            return section.data()[address - start:address - start + size]
    raise AbiError(f"{path}: {name} at {address:#x} is in no section with contents")


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> Abi:
    consts: dict[str, int] = {}
    structs: dict[str, Struct] = {}
    tables: dict[str, tuple[Type, bytes]] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            raise AbiError(f"{path}: no debug info; build the guest with -g")
        for cu in elf.get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                name = _name(die)
                if die.tag == "DW_TAG_enumerator" and name and name.startswith("PROXY_"):
                    consts[name] = _attr(die, "DW_AT_const_value")
                elif (die.tag == "DW_TAG_structure_type" and name and name.startswith("proxy_")
                      and name not in structs and not _attr(die, "DW_AT_declaration")):
                    _resolve(die, structs)
                elif (die.tag == "DW_TAG_variable" and name and name.startswith("proxy_")
                      and name not in tables and "DW_AT_location" in die.attributes):
                    t = _resolve(die.get_DIE_from_attribute("DW_AT_type"), structs)
                    tables[name] = (t, _initial_bytes(elf, path, name, t.size))
    return Abi(consts, structs, path, tables)


def load_abi(path: Path) -> Abi:
    """The ABI of the guest ELF at ``path`` (cached while the file is unchanged)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AbiError(f"{path} does not exist: build the guest with `make guest`") from None
    return _load(path.resolve(), st.st_mtime_ns)
