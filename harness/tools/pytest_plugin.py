"""pytest plugin: fixtures that boot machines, options in their own group.

Fixtures:
- ``hwharness_accel``: the accelerator chosen by ``--hwharness-accel`` (auto, kvm, tcg).
- ``proxy_machine_factory``: boots proxy machines from a spec-editing callback;
  every machine it made is shut down at the end of the test
  (``proxy_machine_factory_module``: at the end of the module).
- ``proxy_machine``: one booted proxy machine per test module, with an e1000
  (random MAC, in ``proxy_machine.mac``) and an isa-debugcon on port 0xe9.
- ``linux_image``: the Linux guest ``make images`` built (:func:`harness.machine.linux.linux`).
- ``linux_accel``: the accelerator Linux machines use; skips with the reason where
  that is an emulating KVM (kvm_pvm), under which the guest takes minutes to boot.
- ``linux_saved``: the Linux guest booted once per session and saved at its prompt
  (:mod:`harness.machine.saved`).
- ``linux_restored_ahead``: machines restored from ``linux_saved`` while earlier tests
  run (:class:`~harness.machine.saved.RestoredAhead`, ``--hwharness-restore-ahead``
  of them kept ready, 1 by default), each at its prompt, a command answered.
- ``linux_machine``: a Linux machine at its shell prompt, a new one for every test,
  restored from ``linux_saved`` (taken from ``linux_restored_ahead``, so a test waits
  only for what is left of its restore), so each test starts from the same freshly
  booted state and no test sees another's writes.
- ``linux_machine_factory``: boots Linux machines, ``factory(configure=None,
  modules=(), name="linux")``, each at its prompt; shut down after the test
  (``linux_machine_factory_module``: after the module).

``--hwharness-trace PATH`` traces every machine of the session (one file per
xdist worker, ``PATH`` with ``-gw0`` before the suffix); for a failed test
the last 1,000 records go to ``<PATH stem>-failed/<test>.txt`` and the
report says where.

Tests that boot QEMU carry the ``qemu`` marker; without QEMU they fail with
the install hint (the README says QEMU is required, so there is no skip).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .. import tracing
from ..errors import HarnessError
from ..machine.linux import LinuxImage, linux
from ..machine import Machine, MachineSpec, random_mac
from ..machine.accel import why_linux_does_not_boot
from ..machine.saved import RestoredAhead, SavedMachine, save_booted
from ..proxy import ProxyMachine, proxy_spec

DEBUGCON_PORT = 0xE9


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hwharness", "hwharness: emulated hardware")
    group.addoption("--hwharness-accel", default="auto", choices=("auto", "kvm", "tcg"),
                    help="accelerator for booted machines (default auto: kvm only where it is hardware-backed, "
                         "else tcg)")
    group.addoption("--hwharness-qemu", default="qemu-system-x86_64", help="the QEMU binary")
    group.addoption("--hwharness-keep", action="store_true",
                    help="keep every machine's directory (serial log, QEMU output, command line)")
    group.addoption("--hwharness-artifacts", default=None,
                    help="where machine directories go (default: pytest's temporary directory)")
    group.addoption("--hwharness-trace", default=None, metavar="PATH",
                    help="trace every access of every machine into PATH (Chrome/Perfetto JSON) and PATH's .txt; "
                         "a failed test's last 1000 records go to PATH-stem-failed/")
    group.addoption("--hwharness-quiet", type=float, default=None, metavar="SECONDS",
                    help="Linux machines: a console wait with no output for this long raises GuestHang "
                         "(default: never; a test can pass quiet= to a wait)")
    group.addoption("--hwharness-restore-ahead", type=int, default=1, metavar="N",
                    help="Linux machines restored for linux_machine while earlier tests run (default 1; "
                         "0: each test's restore starts when the test does)")


def trace_path(config: pytest.Config) -> Path | None:
    """This process's trace file: None without --hwharness-trace, and in xdist's controller (which runs no test)."""
    option = config.getoption("--hwharness-trace")
    worker = getattr(config, "workerinput", {}).get("workerid")     # set by xdist in its workers
    if not option or (getattr(config.option, "numprocesses", None) and not worker):
        return None
    path = Path(option).resolve()
    return path.with_name(f"{path.stem}-{worker}{path.suffix}") if worker else path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: the test boots a real QEMU machine")
    config.addinivalue_line("markers", "kvm: the test forces KVM whatever --hwharness-accel says "
                                       "(slow where KVM is emulated, such as kvm_pvm)")
    path = trace_path(config)
    if path is not None:
        tracing.start(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    if trace_path(config) is not None:
        tracing.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()                   # type: ignore[attr-defined]
    tracer = tracing.active()
    if report.failed and tracer is not None:
        failed = tracer.path.with_name(f"{tracer.path.stem}-failed")
        failed.mkdir(exist_ok=True)
        dump = failed / (re.sub(r"[^\w.-]+", "_", item.nodeid) + f"-{report.when}.txt")
        dump.write_text(tracer.tail())
        report.sections.append(("hwharness trace", f"the last {tracer.keep} records before the failure: {dump}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu"):
        qemu = item.config.getoption("--hwharness-qemu")
        if shutil.which(qemu) is None:
            pytest.fail(f"{qemu} is not installed: run `make deps` (Debian's qemu-system-x86)", pytrace=False)


@pytest.fixture(scope="session")
def hwharness_accel(pytestconfig: pytest.Config) -> str:
    return str(pytestconfig.getoption("--hwharness-accel"))


def _machine_args(config: pytest.Config, tmp_root: Path) -> dict[str, object]:
    artifacts = config.getoption("--hwharness-artifacts")
    return {"artifacts_root": Path(artifacts) if artifacts else tmp_root,
            "keep_artifacts": bool(config.getoption("--hwharness-keep"))}


MachineFactory = Callable[..., ProxyMachine]


def _factory(config: pytest.Config, accel: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MachineFactory]:
    made: list[ProxyMachine] = []

    def factory(configure: Callable[[MachineSpec], None] | None = None, name: str = "machine") -> ProxyMachine:
        spec = proxy_spec(accel=accel)
        spec.qemu = str(config.getoption("--hwharness-qemu"))
        if configure:
            configure(spec)
        pm = ProxyMachine(spec, name=name, **_machine_args(config, tmp_path_factory.getbasetemp()))
        made.append(pm)
        return pm.__enter__()

    yield factory
    for pm in made:
        pm.close()


@pytest.fixture
def proxy_machine_factory(pytestconfig: pytest.Config, hwharness_accel: str,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[MachineFactory]:
    """``factory(configure=None, name="m")``: boot a proxy machine; ``configure(spec)`` adds devices.
    Every machine it made is shut down after the test."""
    yield from _factory(pytestconfig, hwharness_accel, tmp_path_factory)


@pytest.fixture(scope="module")
def proxy_machine_factory_module(pytestconfig: pytest.Config, hwharness_accel: str,
                                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[MachineFactory]:
    """The same factory, its machines shared by a module's tests."""
    yield from _factory(pytestconfig, hwharness_accel, tmp_path_factory)


@pytest.fixture(scope="module")
def proxy_machine(pytestconfig: pytest.Config, hwharness_accel: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyMachine]:
    """A proxy machine shared by a module's tests: e1000 (``.mac``) and debugcon on 0xe9 (``.debugcon``)."""
    if shutil.which(str(pytestconfig.getoption("--hwharness-qemu"))) is None:
        pytest.fail("QEMU is not installed: run `make deps` (Debian's qemu-system-x86)", pytrace=False)
    spec = proxy_spec(accel=hwharness_accel)
    spec.qemu = str(pytestconfig.getoption("--hwharness-qemu"))
    mac = random_mac()
    spec.netdev("user", "net0", restrict=True)
    spec.device("e1000", netdev="net0", mac=mac)
    debugcon = spec.chardev_file("debugcon")
    spec.device("isa-debugcon", iobase=DEBUGCON_PORT, chardev="debugcon")
    pm = ProxyMachine(spec, name="shared", **_machine_args(pytestconfig, tmp_path_factory.getbasetemp()))
    with pm:
        pm.mac = mac                                    # type: ignore[attr-defined]
        pm.debugcon = pm.machine.path(debugcon)         # type: ignore[attr-defined]
        yield pm


# ---- the Linux guest ----

LinuxFactory = Callable[..., Machine]


def _linux_machine_args(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"quiet": config.getoption("--hwharness-quiet"), **_machine_args(config, tmp_path_factory.getbasetemp())}


@pytest.fixture(scope="session")
def linux_image() -> LinuxImage:
    """The Linux guest ``make images`` built; fails with the build command when it is missing."""
    try:
        return linux()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def linux_accel(hwharness_accel: str) -> str:
    """The accelerator for Linux machines; skips, saying why, where it is an emulating KVM."""
    why_not = why_linux_does_not_boot(hwharness_accel)
    if why_not:
        pytest.skip(f"{why_not}; it would take minutes to boot. The README lists this case as unsupported; "
                    "the proxy guest's tests cover forced KVM here")
    return hwharness_accel


def _linux_factory(config: pytest.Config, accel: str, image: LinuxImage,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxFactory]:
    made: list[Machine] = []

    def factory(configure: Callable[[MachineSpec], None] | None = None, modules: tuple[str, ...] = (),
                name: str = "linux", disk: str | None = None, root: bool = False,
                acpi: bool | None = None) -> Machine:
        spec = image.spec(accel=accel, modules=modules, disk=disk, root=root, acpi=acpi)
        spec.qemu = str(config.getoption("--hwharness-qemu"))
        if configure:
            configure(spec)
        m = Machine(spec, name=name, **_linux_machine_args(config, tmp_path_factory))
        made.append(m)
        m.launch()
        image.wait_ready(m)
        return m

    yield factory
    for m in made:
        m.shutdown()


@pytest.fixture
def linux_machine_factory(pytestconfig: pytest.Config, linux_accel: str, linux_image: LinuxImage,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxFactory]:
    """``factory(configure=None, modules=(), name="linux", disk=None, root=False, acpi=None)``:
    a Linux machine at its prompt; ``configure(spec)`` adds devices, ``modules`` are loaded at
    boot, ``disk`` is an NBD URI attached as /dev/vda, ``root`` boots from it, ``acpi=True``
    keeps ACPI for a device whose driver has no MSI (``LinuxImage.spec``). Shut down after the test."""
    yield from _linux_factory(pytestconfig, linux_accel, linux_image, tmp_path_factory)


@pytest.fixture(scope="module")
def linux_machine_factory_module(pytestconfig: pytest.Config, linux_accel: str, linux_image: LinuxImage,
                                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxFactory]:
    """The same factory, its machines shared by a module's tests."""
    yield from _linux_factory(pytestconfig, linux_accel, linux_image, tmp_path_factory)


@pytest.fixture(scope="session")
def linux_saved(pytestconfig: pytest.Config, linux_accel: str, linux_image: LinuxImage,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[SavedMachine]:
    """The Linux guest booted once per session (per xdist worker, per pytest-split group) and
    saved at its prompt; ``linux_saved.restore()`` starts a machine in that state."""
    spec = linux_image.spec(accel=linux_accel)
    spec.qemu = str(pytestconfig.getoption("--hwharness-qemu"))
    saved = save_booted(spec, linux_image.wait_ready, name="linux-saved",
                        **_linux_machine_args(pytestconfig, tmp_path_factory))
    yield saved
    saved.remove()


def _answered(m: Machine) -> None:
    assert m.console is not None
    m.console.run("true")


@pytest.fixture(scope="session")
def linux_restored_ahead(linux_saved: SavedMachine, pytestconfig: pytest.Config,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestoredAhead | None]:
    """Machines restored from ``linux_saved`` ahead of the tests that take them, each at its
    prompt with a command answered; None with ``--hwharness-restore-ahead 0``, where a QEMU
    stands by for each test's own restore instead (``SavedMachine.stand_by``). Those never
    taken are shut down at the end of the session."""
    size = int(pytestconfig.getoption("--hwharness-restore-ahead"))
    if size < 0:
        raise pytest.UsageError(f"--hwharness-restore-ahead takes 0 or more machines, not {size}")
    if size == 0:
        linux_saved.stand_by(name="linux", **_linux_machine_args(pytestconfig, tmp_path_factory))
        try:
            yield None
        finally:
            linux_saved.stand_down()
        return
    with RestoredAhead(linux_saved, _answered, size=size, name="linux",
                       **_linux_machine_args(pytestconfig, tmp_path_factory)) as ahead:
        yield ahead


@pytest.fixture
def linux_machine(linux_saved: SavedMachine, linux_restored_ahead: RestoredAhead | None,
                  pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A Linux machine at its prompt, in the state it was in right after booting: a machine of
    its own, restored from ``linux_saved`` (ahead of the test, unless
    ``--hwharness-restore-ahead 0``), shut down after the test.

    ``linux_machine.console.run("uname -r")`` -> ``("6.1.0-...", 0)``.
    """
    if linux_restored_ahead is not None:
        m = linux_restored_ahead.take()
    else:
        m = linux_saved.restore(name="linux", **_linux_machine_args(pytestconfig, tmp_path_factory))
    yield m
    m.shutdown()
