"""hwharness as a user installs it: `python -m build` makes an sdist and a wheel; the wheel,
installed into a fresh venv outside the checkout, builds its guest from the sources it carries
and boots it, from another directory. And the guest cache: rebuilt when a source changes,
a clear message when the tools are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.errors import AbiError
from harness.proxy import guest
from tests.fatimages import have_tools, make_image

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.img", "files",
                                     "artifacts", "bench-results", ".pytest_cache", ".deps.stamp")


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done


@pytest.mark.qemu
def test_the_wheel_installed_elsewhere_builds_and_boots_its_guest(tmp_path: Path, hwharness_accel: str) -> None:
    source = tmp_path / "source"                  # a copy: building writes build/ and egg-info beside it
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", source)
    sdists = list((tmp_path / "dist").glob("hwharness-*.tar.gz"))
    wheels = list((tmp_path / "dist").glob("hwharness-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for name in ("proxy.c", "abi.h", "boot.S", "link.ld", "Makefile"):
        assert f"harness/proxy/guest-src/{name}" in names
    assert not any(n.endswith(".elf") for n in names), "the guest is built where it runs, not shipped"

    venv = tmp_path / "venv"                      # the current site-packages for the dependencies: no network
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HWHARNESS_DEBUG")}
    env["HWHARNESS_CACHE"] = str(tmp_path / "cache")      # a cold cache: the guest is built here
    where = run(venv / "bin" / "python", "-c", "import harness, drivers; print(harness.__file__, drivers.__file__)",
                cwd=elsewhere, env=env).stdout.split()
    assert all(Path(w).is_relative_to(venv) for w in where), where

    if have_tools():
        pytest.fail(f"{have_tools()} is not installed: run `make deps`", pytrace=False)
    make_image(elsewhere / "disk.img", 16, {"hello.txt": b"from an installed hwharness\n"}, tmp_path)
    done = run(venv / "bin" / "hwharness", "disk", "cat", "disk.img", "/HELLO.TXT", "--accel", hwharness_accel,
               cwd=elsewhere, env=env)
    assert done.stdout == "from an installed hwharness\n"
    built = list((tmp_path / "cache").glob("guest-*/proxy.elf"))
    assert len(built) == 1, "the installed package built its own guest into the cache"


def test_a_changed_source_gets_its_own_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "src"
    shutil.copytree(guest.guest_sources(), sources, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setenv("HWHARNESS_CACHE", str(tmp_path / "cache"))
    first = guest._elf_for(sources, guest.sources_hash(sources))
    assert first.is_file() and first.with_name("proxy-boot.elf").is_file()
    assert guest._elf_for(sources, guest.sources_hash(sources)) == first
    with open(sources / "kernel.c", "a") as f:
        f.write("/* a change */\n")
    second = guest._elf_for(sources, guest.sources_hash(sources))
    assert second != first and second.is_file()
    assert not list(sources.glob("*.o")) and not (sources / "build").exists(), "the sources stay untouched"


def test_missing_build_tools_are_named_with_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))     # no gcc, ld, objcopy or make here
    with pytest.raises(AbiError, match=r"needs gcc, ld, objcopy, make.*apt-get install binutils gcc make"):
        guest.build(guest.guest_sources(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
