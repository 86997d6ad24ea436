"""Every bench in its --quick mode: it runs, writes JSON of the promised shape, and both
sides did all the work they were given (no figure is judged: machines are shared)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.tools.bench import ahci, compare, e1000, forward, nvme

pytestmark = pytest.mark.qemu


def bench(name: str, accel: str, tmp_path: Path, *extra: str, clock: str = "host") -> dict:
    out = tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, "-m", "harness", "bench", name, "--quick", "--accel", accel,
                          "--json", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["clock"] == clock
    return result


def check_paired(result: dict, units: dict[str, int], counted_by: str) -> None:
    """The shape paired.run_rounds promises, for these workloads and their units per run."""
    assert result["accel"]["python"] == result["accel"]["native"] in ("kvm", "tcg")
    assert result["tsc_hz_boot"] > 0 and result["tsc_hz_host"] > 0 and result["native_call_us"] > 0
    rounds = result["rounds"]
    assert rounds >= 1 and result["warmup_rounds"] == 1 and len(result["first"]) == rounds
    assert all(cores >= 0 for cores in result["foreign_cores"])
    if "iommu_rounds" in result:                # the Python driver with the IOMMU on, against off
        cost = result["iommu_rounds"]
        assert result["iommu"] is True and len(cost["first"]) == rounds
        assert result["iommu_cost"] == min(v for k, v in cost["results"].items() if k.startswith("ratio_")) > 0
        for key in units:
            assert cost["results"][f"iommu_on_{key}"] > 0 and cost["results"][f"iommu_off_{key}"] > 0
    for key, count in units.items():
        for name in (key, f"native_{key}", f"ratio_{key}"):
            assert result["results"][name] > 0, name
            assert len(result["per_round"][name]) == rounds
        assert result["ratio_spread"][f"ratio_{key}"] >= 1.0
        assert result["work"][key] == {"units_per_run": count, "counted_by": counted_by}
        for name in (key, f"native_{key}"):         # where each side's time went, from the kernel's counts
            used = result["cpu_cores"][name]
            assert set(used) == {"main_loop", "vcpu", "qemu_other", "driver"} and min(used.values()) >= 0, (name, used)
            assert len(result["kicked_wakes"][name]) == rounds and min(result["kicked_wakes"][name]) >= 0, name
            assert result["timed_s"][name] > 0
            # The kernel counts a running thread's time at its ticks (4 ms at HZ=250): over a
            # few milliseconds of runs the figures are a tick's worth or nothing.
            if result["timed_s"][name] >= 0.1:
                assert sum(used.values()) <= (os.cpu_count() or 1) + 0.5, (name, used)
        if result["timed_s"][f"native_{key}"] >= 0.1:
            assert result["cpu_cores"][f"native_{key}"]["vcpu"] > 0, "the native loop runs on the vCPU"
        # this process's own time is exact (its CPU clock)
        assert result["cpu_cores"][key]["driver"] > 0, "the Python driver runs in the bench's process"
    assert set(result["work"]) == set(units)


def test_bench_ahci_quick(tmp_path: Path, hwharness_accel: str) -> None:
    result = bench("ahci", hwharness_accel, tmp_path)
    assert result["benchmark"] == "ahci" and result["aio"] in ("io_uring", "threads")
    n = ahci.QUICK["count"]
    check_paired(result, {"randread_4k_qd1_iops": n, "randread_4k_qd32_iops": n // 32 * 32, "seqread_128k_mbps": n},
                 "QEMU's query-blockstats rd_operations")


def test_bench_nvme_quick(tmp_path: Path, hwharness_accel: str) -> None:
    result = bench("nvme", hwharness_accel, tmp_path)
    assert result["benchmark"] == "nvme" and result["aio"] in ("io_uring", "threads")
    n = nvme.QUICK["count"]
    for prefix in ("", "ioeventfd_"):          # the driver as machines get it, and on ioeventfds
        reads = {f"{prefix}randread_4k_qd1_iops": n, f"{prefix}randread_4k_qd32_iops": n // 64 * 64,
                 f"{prefix}randread_4k_qd32x2_iops": n // 64 * 64, f"{prefix}seqread_128k_mbps": n}
        writes = {f"{prefix}randwrite_4k_qd32_iops": n // 64 * 64}
        check_paired({**result, "work": {k: v for k, v in result["work"].items() if k in reads}}, reads,
                     "QEMU's query-blockstats rd_operations")
        check_paired({**result, "work": {k: v for k, v in result["work"].items() if k in writes}}, writes,
                     "QEMU's query-blockstats wr_operations")
    assert len(result["work"]) == 10


def test_bench_e1000_quick(tmp_path: Path, hwharness_accel: str) -> None:
    result = bench("e1000", hwharness_accel, tmp_path)
    assert result["benchmark"] == "e1000"
    q = e1000.QUICK
    for way, register in (("tx_", "GPTC"), ("tx_zerocopy_", "GPTC"), ("rx_", "GPRC")):
        keys = {f"{way}pps_64": q["count_64"], f"{way}pps_1514": q["count_1514"]}
        check_paired({**result, "work": {k: v for k, v in result["work"].items() if k in keys}}, keys,
                     f"the NIC's {register} register")
    assert len(result["work"]) == 6


def test_bench_roundtrip_quick(tmp_path: Path, hwharness_accel: str) -> None:
    result = bench("roundtrip", hwharness_accel, tmp_path)
    assert result["accel"] == {"proxy": result["accel"]["proxy"], "qtest": "tcg"}
    r = result["results"]
    for key in ("proxy_pio_p50_us", "proxy_mmio_p50_us", "qtest_pio_p50_us", "native_pio_us", "native_call_us",
                "batch_ops_per_s", "qtest_over_proxy_pio", "trace_on_cost", "trace_off_cost",
                "owner_pio_p50_us", "attached_pio_p50_us", "attached_over_owner_pio", "attached_over_owner_mmio"):
        assert r[key] > 0, key
    assert r["attached_over_owner_pio_spread"] >= 1
    assert r["proxy_pio_p50_us"] <= r["proxy_pio_p99_us"]
    assert r["idle_cpu_percent"] >= 0


def test_bench_instructions_quick(tmp_path: Path, hwharness_accel: str) -> None:
    """Counts, not speeds: each a positive whole number of guest instructions, the same (or
    nearly) in most repeats, under TCG whatever was asked, named so bench compare knows lower is
    better. Most, not all: on a loaded host an interrupt may land inside one repeat's span (a
    CI run once counted 239 against 229, 229)."""
    result = bench("instructions", "auto" if hwharness_accel == "kvm" else hwharness_accel, tmp_path,
                   clock="guest instructions")
    assert result["accel"] == "tcg" and result["icount_shift"] == 0
    # QEMU's PIT runs on the virtual clock, which -icount shift=0 moves 1 ns per instruction:
    # the guest's PIT-calibrated TSC rate is 1 GHz (without icount it is the host's rate)
    assert abs(result["tsc_hz"] - 1e9) < 1e7
    keys = {"pio_batch_instructions", "mmio_batch_instructions", "pio_single_instructions",
            "turn_resume_instructions", "irq_entry_instructions", "irq_total_instructions"}
    assert set(result["results"]) == set(result["range"]) == keys
    for key, count in result["results"].items():
        low, high = result["range"][key]
        assert isinstance(count, int) and count > 0 and low <= count <= high, key
        repeated = result["repeated"][key]
        agree = [v for v in repeated if abs(v - count) <= count // 50]
        assert 3 * len(agree) >= 2 * len(repeated), f"{key}: {repeated} is not deterministic"
        assert compare.better(f"results.{key}") == "lower"
    r = result["results"]
    assert r["pio_single_instructions"] > r["pio_batch_instructions"], "a batch of one costs its batch's start and end"


def test_bench_e1000_itr_quick(tmp_path: Path, hwharness_accel: str) -> None:
    result = bench("e1000-itr", hwharness_accel, tmp_path)
    assert set(result["results"]) == {f"itr_{itr}" for itr in e1000.ITR_SETTINGS}
    for figures in result["results"].values():
        assert 0 < figures["irq_latency_p50_us"] <= figures["irq_latency_p99_us"]
        assert figures["rx_pps"] > 0 and figures["irqs_per_1000_frames"] >= 0   # 0: every look found frames


def test_bench_ahci_and_e1000_quick_with_linux_as_the_peer(tmp_path: Path, linux_accel: str) -> None:
    """Linux's own drivers in the same machine configuration: each figure present, each run
    checked by the bench (blockread's whole reads, pktgen's and the interface's counts)."""
    disk = bench("ahci", linux_accel, tmp_path, "--peer", "linux")
    net = bench("e1000", linux_accel, tmp_path, "--peer", "linux")
    for result, keys, tool in ((disk, ("randread_4k_qd1_iops", "seqread_128k_mbps"), "blockread"),
                               (net, ("tx_pps_64", "tx_pps_1514"), "pktgen")):
        assert result["peer"]["tool"].startswith(tool) and result["peer"]["call_ms"] > 0
        for key in keys:
            assert result["results"][f"peer_linux_{key}"] > 0
            assert result["results"][f"ratio_python_over_peer_linux_{key}"] > 0
            assert len(result["peer"]["runs"][f"peer_linux_{key}"]) == 3


def test_bench_forward_quick(tmp_path: Path, hwharness_accel: str) -> None:
    """The Python bridge against the C one, then Linux's bridge where Linux boots: every frame
    the generator offered is accounted for on every side, and the sink got each run's all."""
    result = bench("forward", hwharness_accel, tmp_path)
    assert result["benchmark"] == "forward"
    q = forward.QUICK
    units = {"fwd_pps_64": q["count_64"], "fwd_pps_1514": q["count_1514"]}
    check_paired(result, units, "the host sink (frames delivered)")
    offered = (result["rounds"] + result["warmup_rounds"]) * sum(units.values())
    sides = ["python", "native"] + ([] if "skipped" in result["peer"] else ["peer_linux"])
    assert set(result["accounting"]) == set(sides)
    for side in sides:
        a = result["accounting"][side]
        assert a["offered"] == a["delivered"] == offered, (side, a)
        assert a["dropped_by_bridge"] == a["dropped_by_nic"] == a["unaccounted"] == 0, (side, a)
        assert a["forwarded"] >= offered, (side, a)        # Linux's bridge sends a few frames of its own
    for side in ("python", "native"):
        assert result["accounting"][side]["forwarded"] == offered
    if "peer_linux" in sides:
        assert result["peer"]["tool"].startswith("brctl")
        for key in units:
            assert result["results"][f"peer_linux_{key}"] > 0
            assert result["results"][f"ratio_python_over_peer_linux_{key}"] > 0
    else:
        assert "the Linux guest is not booted" in result["peer"]["skipped"]


def test_bench_restart_quick_with_a_hang(tmp_path: Path, hwharness_accel: str) -> None:
    """The command line's restart bench: --hang stops the driver instead of killing it;
    the image is checked by the bench itself once QEMU is gone."""
    result = bench("restart", hwharness_accel, tmp_path, "--hang")
    r = result["results"]
    assert result["signal"] == "SIGSTOP" and result["causes"] == ["hung: no heartbeat"]
    assert r["acked_lost"] == 0 and r["blocks_acked"] == r["blocks"] and r["restarts"] >= 2
    assert 0 < r["restart_p50_ms"] <= r["restart_p99_ms"] <= r["restart_max_ms"]


def test_bench_serve_quick_and_with_kills(tmp_path: Path, linux_accel: str) -> None:
    """A Linux machine through the Python AHCI and NVMe exports and qemu-nbd: every figure of
    every server, the ratios, the work the bench checked; then --kill: Linux writes on its
    root through SIGKILLs and a SIGSTOP, and the bench itself checks the files, the log and
    fsck once QEMU is gone (it fails otherwise)."""
    result = bench("serve", linux_accel, tmp_path)
    keys = ("host_nbdcopy_read_mbps", "linux_randread_4k_qd1_iops", "linux_seqread_128k_mbps",
            "linux_seqread_1m_mbps", "linux_seqwrite_1m_fsync_mbps")
    assert set(result["results"]) == {"ahci", "nvme", "qemu-nbd"}
    for server, figures in result["results"].items():
        assert all(figures[key] > 0 for key in keys), (server, figures)
        assert figures["foreign_cores"] >= 0
    for server in ("ahci", "nvme"):
        assert all(result[f"ratio_python_over_qemu_nbd_{server}_{key}"] > 0 for key in keys)
    assert len(result["per_round"]) == 3 * result["rounds"] == len(result["foreign_cores"])
    assert "sha256" in result["checked"] and result["call_ms"] > 0

    killed = bench("serve", linux_accel, tmp_path, "--kill", "2")
    r = killed["results"]
    assert (r["io_errors"], r["checksum_mismatches"], r["fsck"]) == (0, 0, "clean")
    assert sorted(x["signal"] for x in killed["restarts"]) == ["SIGKILL", "SIGKILL", "SIGSTOP"]
    assert [x["cause"] for x in killed["restarts"] if x["signal"] == "SIGSTOP"][0].startswith("hung")
    assert 0 < r["restart_p50_ms"] <= r["restart_max_ms"] and 0 < r["stall_p50_ms"] <= r["stall_max_ms"]
    assert len(killed["lines"]) == 4 and killed["written_mb"] == killed["plan"]["files"] * 2


def test_compare_sweeps_what_a_killed_compare_left_and_nothing_else(tmp_path: Path) -> None:
    """A compare killed outright (SIGKILL: nothing unwinds) leaves a registered git worktree
    and a scratch directory; the next compare removes them, and leaves a live one's alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "f").write_text("x")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    tmp = Path(compare.tempfile.gettempdir())
    made = {name: tmp / f"{compare.SCRATCH_PREFIX}{pid}-{what}-test" for name, pid, what in
            [("dead_tree", dead.pid, "abcd1234"), ("dead_scratch", dead.pid, "results"),
             ("live_tree", live.pid, "abcd1234")]}
    try:
        for name in ("dead_tree", "live_tree"):
            subprocess.run(git[:3] + ["worktree", "add", "-q", "--detach", str(made[name]), "HEAD"], check=True)
        made["dead_scratch"].mkdir()
        compare.sweep_killed(repo)
        listed = subprocess.run(git[:3] + ["worktree", "list"], capture_output=True, text=True, check=True).stdout
        assert not made["dead_tree"].exists() and str(made["dead_tree"]) not in listed
        assert not made["dead_scratch"].exists()
        assert (made["live_tree"] / "f").exists() and str(made["live_tree"]) in listed
    finally:
        live.kill()
        live.wait()
        for d in made.values():
            shutil.rmtree(d, ignore_errors=True)
