"""The layering, as a test: every import in harness/ and drivers/ points down, and no two
modules import each other, however indirectly.

The layers, lowest first (README, "A short tour"):

    harness.errors, harness.access      the contract drivers program against
    harness.tracing, harness.devices    what records accesses; the device classes (block, NIC)
    drivers.<device>                    device logic: the contract and the device classes only
    harness.machine                     a QEMU process; it knows no transport
    harness.proxy, harness.qtest        transports, plugged into the machine
    harness.processes                   drivers in processes of their own
    harness.services                    what drivers serve to others
    harness.tools                       the CLI, the benches, the pytest plugin: nothing imports them

``harness/__init__.py`` and ``harness/__main__.py`` are the public face and may name any layer.
Imports under ``if TYPE_CHECKING:`` count for the layering (a type is a dependency too) but
not for cycles (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CONTRACT = {"harness.errors", "harness.access"}
BELOW_DRIVERS = CONTRACT | {"harness.devices"}
TRANSPORT_BASE = CONTRACT | {"harness.tracing", "harness.machine"}

# layer -> the layers it may import (a module may always import its own layer)
ALLOWED: dict[str, set[str]] = {
    "harness.errors": set(),
    "harness.access": {"harness.errors"},
    "harness.tracing": CONTRACT,
    "harness.devices": CONTRACT,
    "drivers": BELOW_DRIVERS,
    "harness.machine": CONTRACT,
    "harness.proxy": TRANSPORT_BASE,
    # qtest grants what the proxy grants: it reads the rules from the proxy guest's ABI, and nothing else
    "harness.qtest": TRANSPORT_BASE | {"harness.proxy.abi", "harness.proxy.guest"},
    "harness.processes": TRANSPORT_BASE | {"harness.proxy"},
    "harness.services": TRANSPORT_BASE | BELOW_DRIVERS | {"drivers", "harness.proxy", "harness.processes"},
    "harness.tools": {"harness", "drivers"},
    "harness": {"harness", "drivers"},          # harness/__init__.py and __main__.py only
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer a module belongs to; a driver is its own layer (``drivers.ahci``)."""
    if module.startswith("drivers."):
        return ".".join(module.split(".")[:2])
    best = "harness"
    for layer in ALLOWED:
        if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def allowed(source: str, target: str) -> bool:
    here, there = layer_of(source), layer_of(target)
    if here == there:
        return True
    rules = ALLOWED["drivers" if here.startswith("drivers") else here]
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


MODULES = {module_name(p): p for top in ("harness", "drivers") for p in sorted((ROOT / top).rglob("*.py"))}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, runs at run time) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` depends on the module; `from pkg import name` on the package
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES:
                if target != module:
                    out.append((target, node.lineno, node.lineno not in typing_only))
            elif target.split(".")[0] in ("harness", "drivers"):
                out.append((target, node.lineno, False))    # names nothing: test_every_import_resolves says so
    return out


def test_the_walk_sees_the_project() -> None:
    assert {"harness.access", "harness.proxy.channel", "drivers.ahci.driver", "harness.tools.cli"} <= set(MODULES)
    assert ("harness.access", 33) in {(t, n) for t, n, _ in imports("harness.proxy.channel")} or \
        any(t == "harness.access" for t, _, _ in imports("harness.proxy.channel"))
    assert not allowed("harness.machine.machine", "harness.proxy.ivshmem")     # the rule can fail
    assert not allowed("drivers.ahci.driver", "drivers.nvme.pci")


def test_every_import_resolves() -> None:
    """A lazy import of a module that moved fails only when its line runs; catch it here."""
    broken = [f"{m} line {line}: {t}" for m in MODULES for t, line, _ in imports(m) if t not in MODULES]
    assert not broken, f"imports of project modules that do not exist: {broken}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = [f"line {line}: {target}" for target, line, _ in imports(module)
              if target in MODULES and not allowed(module, target)]
    assert not upward, f"{module} ({layer_of(module)}) imports against the layering: {upward}"


def test_no_module_is_imported_by_a_lower_layer_than_tools() -> None:
    users = [(m, t) for m in MODULES for t, _, _ in imports(m)
             if t.startswith("harness.tools") and not m.startswith("harness.tools") and m not in ("harness.__main__",)]
    assert not users, f"tools are imported by the library: {users}"


def test_no_import_cycles() -> None:
    graph = {m: sorted({t for t, _, runs in imports(m) if runs}) for m in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}          # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    real = [c for c in cycles if not all(c[0] == x or x.startswith(c[0] + ".") or c[0].startswith(x + ".")
                                         for x in c)]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)
