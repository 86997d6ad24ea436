"""The trace of what drivers did: harness.trace(), --trace on the CLI, --hwharness-trace in pytest.

The JSON is checked against the Chrome trace-event format's rules (what
ui.perfetto.dev and chrome://tracing read): complete events with a duration,
instants with a scope, metadata naming each process and thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import harness
from drivers.e1000 import E1000
from drivers.e1000.regs import Reg
from harness import tracing
from harness.access import Access, IrqEvent, Kind, Space
from harness.proxy.channel import ProxyChannel
from harness.proxy.traced import TracedChannel

pytest_plugins = ("pytester",)
REPO = Path(__file__).resolve().parents[1]


def events(path: Path) -> list[dict[str, Any]]:
    """The trace's events, each checked against the trace-event format."""
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, list)
    for e in loaded:
        assert e["ph"] in ("X", "i", "M") and isinstance(e["pid"], int), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and e["args"]["name"], e
            continue
        assert isinstance(e["tid"], int) and isinstance(e["ts"], (int, float)) and e["name"], e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        else:
            assert e["s"] == "t", e
    return loaded


class FakeChannel:
    """Enough of a channel for the tracer: a bus, an index, a name, register names."""

    def __init__(self, index: int) -> None:
        self.bus, self.index, self.name = "bus", index, f"fake {index}"

    def register_name(self, space: Space, addr: int) -> str:
        return "STATUS" if addr == 8 else ""


def test_records_are_written_in_chunks_and_the_tail_is_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tracing, "CHUNK", 100)
    channel = FakeChannel(3)
    with harness.trace(tmp_path / "t.json", keep=50) as tracer:
        for i in range(1000):
            at = tracer.t0 + i * 10
            tracer.access(channel, "read", Space.MMIO, 8, 4, i, "OK", 1000 + i, at, at + 5)  # type: ignore[arg-type]
            assert len(tracer.records) <= 100 + 50
        tracer.batch(channel, [Access(Kind.WRITE, Space.PIO, 0x60, 1, 0xAA)], None, "TIMEOUT", 5,  # type: ignore[arg-type]
                     tracer.t0 + 10_000, tracer.t0 + 10_100)
        tracer.interrupt(channel, IrqEvent(7, 2, 99, tracer.t0 + 10_200))  # type: ignore[arg-type]
        tail = tracer.tail().splitlines()
        assert tail[-1].endswith("interrupt count=7 new=2 tsc=99") and tail[-1].startswith("        10.200 us")
        assert len(tracer.tail(10).splitlines()) == 11, "ten records, the batch's access on a line of its own"
        assert len(tail) == 51
    assert tracer.written == 1002
    loaded = events(tmp_path / "t.json")
    slices = [e for e in loaded if e["ph"] == "X"]
    assert len(slices) == 1001 and slices[0]["name"] == "read STATUS" and slices[999]["args"]["value"] == "0x3e7"
    assert [e["args"]["name"] for e in loaded if e["name"] == "thread_name"] == ["ch3 fake 3"]
    text = (tmp_path / "t.txt").read_text().splitlines()
    assert len([line for line in text if "read" in line and "STATUS" in line]) == 1000
    assert any("TIMEOUT" in line for line in text) and "write pio 0x60 width 1 value 0xaa" in text[-2]


def test_tracing_off_leaves_the_plain_channel_and_its_hot_path(proxy_machine) -> None:
    assert tracing.active() is None
    port = proxy_machine.bus.ports(0xE9, 1)
    try:
        assert type(port.channel) is ProxyChannel
        assert port._read.func == port.channel._one and type(port.channel)._one is ProxyChannel._one
    finally:
        port.channel.close()


@pytest.mark.qemu
def test_a_driver_traced_with_register_names_tsc_interrupts_and_dma(proxy_machine_factory, tmp_path: Path) -> None:
    def e1000(spec) -> None:  # type: ignore[no-untyped-def]
        spec.device("e1000", mac="52:54:00:12:34:56")

    with harness.trace(tmp_path / "e1000.json") as tracer:
        pm = proxy_machine_factory(e1000, name="traced")
        nic = E1000.open(pm.bus)
        assert isinstance(nic.dev.channel, TracedChannel)
        status = nic.regs.read32(Reg.STATUS)
        nic.regs.write32(Reg.IMS, 0x80)
        nic.regs.write32(Reg.ICS, 0x80)                 # the NIC raises its interrupt
        assert nic.irq is not None
        nic.irq.wait(5.0)
        nic.regs.read32(Reg.ICR)
        nic.irq.ack()
        nic.close()
        with pm.bus.open(pm.bus.find(vendor=0x8086, device=0x100E)) as again:    # the same ring, reused
            again.bar(0).read32(Reg.STATUS)
        pm.close()
    loaded = events(tmp_path / "e1000.json")
    names = {e["args"]["name"] for e in loaded if e["ph"] == "M"}
    threads = [(e["pid"], e["tid"], e["args"]["name"]) for e in loaded if e["name"] == "thread_name"]
    assert len({(pid, tid) for pid, tid, _ in threads}) == len(threads), "a track per channel"
    assert len([name for _, _, name in threads if name.startswith("ch1 ") and "8086:100e" in name]) == 2
    assert "traced" in names and any("8086:100e" in n for n in names) and "ch0 admin" in names
    reads = [e for e in loaded if e["name"] == "read STATUS"]
    assert reads and reads[-1]["args"]["value"] == f"{status:#x}" and reads[-1]["args"]["space"] == "mmio"
    ics = [e for e in loaded if e["name"] == "write ICS"]
    assert ics and ics[0]["args"]["value"] == "0x80" and ics[0]["args"]["status"] == "OK"
    tscs = [e["args"]["guest_tsc"] for e in loaded if e["ph"] == "X" and e.get("cat") == "access"]
    assert all(t > 0 for t in tscs) and tscs == sorted(tscs), "the guest TSC of each access, in order"
    assert any(e["name"] == "interrupt" and e["ph"] == "i" for e in loaded)
    assert any(e["name"].startswith("batch of") for e in loaded), "the MTA clear is one batch"
    assert any(e["name"] == "poll CTRL" for e in loaded), "the reset wait is a guest-side poll"
    assert any(e["name"] == "dma alloc" for e in loaded) and any(e["name"] == "dma free" for e in loaded)
    text = tracing.text_path(tmp_path / "e1000.json").read_text()
    assert f" STATUS         w4 {status:#x} OK tsc=" in text
    assert tracer.written == len([e for e in loaded if e["ph"] != "M"])


@pytest.mark.qemu
def test_the_cli_traces_any_command(tmp_path: Path, hwharness_accel: str) -> None:
    from tests.fatimages import make_image
    make_image(tmp_path / "disk.img", 16, {"a.txt": b"traced\n"}, tmp_path)
    done = subprocess.run([sys.executable, "-m", "harness", "disk", "cat", "disk.img", "/a.txt",
                           "--trace", "out/disk.json", "--accel", hwharness_accel], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "traced\n"
    assert "hwharness: trace of" in done.stderr and "out/disk.json" in done.stderr
    loaded = events(tmp_path / "out" / "disk.json")
    issued = [a for e in loaded if e["name"].startswith("batch of") or e.get("args", {}).get("status") == "POSTED"
              for a in e["args"]["accesses"] if a.startswith("write mmio") and a.endswith(" P0.CI")]
    assert issued, "the AHCI port registers by name, in the (posted) batches that issue commands"
    accesses = [e["name"] for e in loaded] + [a for e in loaded for a in e.get("args", {}).get("accesses", ())]
    assert any(a == "read CAP" or a.startswith("read mmio") and " CAP -> " in a for a in accesses)
    assert (tmp_path / "out" / "disk.txt").read_text().count("\n") >= len(loaded) - 10


@pytest.mark.qemu
def test_pytest_traces_a_session_and_keeps_the_last_records_of_a_failed_test(
        pytester: pytest.Pytester, hwharness_accel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))         # the inner pytest loads this checkout's plugin
    pytester.makepyfile(test_inner='''
        def debugcon(spec):
            spec.chardev("null", "debugcon")
            spec.device("isa-debugcon", iobase=0xE9, chardev="debugcon")

        def test_fails_after_some_accesses(proxy_machine_factory):
            pm = proxy_machine_factory(debugcon)
            port = pm.bus.ports(0xE9, 1)
            for _ in range(1500):
                port.read8(0)
            assert False, "on purpose"
    ''')
    trace = pytester.path / "session.json"
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:cacheprovider",
                                           "--hwharness-accel", hwharness_accel, "--hwharness-trace", str(trace))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*hwharness trace*", "*the last 1000 records before the failure: *"])
    dumps = list((pytester.path / "session-failed").glob("*test_fails_after_some_accesses-call.txt"))
    assert len(dumps) == 1
    lines = dumps[0].read_text().splitlines()
    assert len(lines) == 1000 and all("read   pio 0xe9" in line for line in lines[-900:])
    assert len([e for e in events(trace) if e["name"] == "read pio 0xe9"]) >= 1500


@pytest.mark.qemu
def test_an_error_names_the_register(proxy_machine) -> None:
    from harness.errors import DeviceTimeout
    with proxy_machine.bus.open(proxy_machine.bus.find(vendor=0x8086, device=0x100E)) as nic:
        nic.bar(0).name_registers(Reg)
        with pytest.raises(DeviceTimeout, match=r"poll mmio 0x[0-9a-f]+008 .* \(STATUS\) \(last value 0x") as failed:
            nic.bar(0).poll32(Reg.STATUS, 0x4, 0x4, timeout=0.01)          # FUNC_ID: 0 on a single-port NIC
        assert failed.value.register == "STATUS" and failed.value.request.addr == nic.bar(0).base + Reg.STATUS
