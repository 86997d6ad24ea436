"""Only what pyproject.toml cannot say: the proxy guest's sources travel inside the package.

They live in guests/proxy (C and assembler, built by the system's gcc); an
installed hwharness builds them on first use (harness/proxy/guest.py), so
build_py copies them, all but a stray build directory, to
harness/proxy/guest-src in the wheel.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

GUEST = Path(__file__).resolve().parent / "guests" / "proxy"


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "harness" / "proxy" / "guest-src"
        target.mkdir(parents=True, exist_ok=True)
        for source in GUEST.iterdir():
            if source.is_file():
                self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithGuest})
