"""Every code block in README.md and docs/*.md is checked here, so none rots.

What a block is decides how it is checked:

- ```python: run for real, in order, one namespace per page (as doctest does). A block
  that needs names it does not make says so in an HTML comment right before it, which a
  forge does not render: ``<!-- docs-test: setup=proxy_machine -->`` provides ``spec``
  and ``pm``; the setups are ``SETUPS`` below, each made once per page and torn down after
  it. ``<!-- docs-test: pytest -->`` marks a block of pytest tests: each ``test_*`` it
  defines is called with the plugin's fixtures it names.
- ```console: a terminal session; each ``$ `` line runs in bash (``hwharness`` is this
  checkout's ``python3 -m harness``) in the page's own directory, and its output, stdout
  and stderr together, must be the lines that follow it, where ``...`` stands for any text.
- a block without a language: command synopses, one a line (``hwharness disk ls IMAGE
  [DIR] [--bus nvme]  # what it does``, or ``make TARGET``). Each subcommand must exist,
  and each option shown, and each value shown for it, must be in that command's
  ``--help``; a make target must be in the Makefile.
- ``<!-- docs-test: tree -->`` before a block without a language: the layout, a folder a
  line. Each must exist, and every folder of ``harness/`` and ``drivers/`` must be listed.

Any other block fails: a block nothing can check should not be in the docs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.fatimages import make_image, tree

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    page: Path
    line: int                   # of the opening fence, 1-based
    language: str
    text: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.language in ("python", "console"):
            return self.language
        if self.language == "" and "tree" in self.directives:
            return "tree"
        if self.language == "":
            return "synopsis"
        return "unchecked"


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks, each with the directives of the comment right before it."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        directives: dict[str, str] = {}
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if (match := DIRECTIVE.fullmatch(before.strip())):
            for word in match.group(1).split():
                key, _, value = word.partition("=")
                directives[key] = value
        found.append(Block(page, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n", directives))
        i = end + 1
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


# ---- the setups a page may ask for ----

@dataclass
class PageRun:
    """What a page's blocks share: their namespace, their directory, what to tear down."""
    request: pytest.FixtureRequest
    directory: Path
    namespace: dict[str, Any]
    stack: contextlib.ExitStack
    made: set[str] = field(default_factory=set)


def setup_stack(run: PageRun) -> None:
    """``stack``: a contextlib.ExitStack, closed after the page."""
    run.namespace["stack"] = run.stack


def setup_scratch_disks(run: PageRun) -> None:
    """``disk.img`` (64 MiB), ``a.img`` and ``b.img`` (16 MiB each), zeros, in the page's directory."""
    for name, size in (("disk.img", 64 << 20), ("a.img", 16 << 20), ("b.img", 16 << 20)):
        with open(run.directory / name, "wb") as f:
            f.truncate(size)


def setup_fat_image(run: PageRun) -> None:
    """``fat.img``: a FAT32 image made by mkfs.fat and filled by mtools (tests/fatimages.py)."""
    make_image(run.directory / "fat.img", 32, tree(random.Random(3)), run.directory)


def setup_cli_images(run: PageRun) -> None:
    """``random.img`` (not a filesystem) and ``fat32.img``, as tests/test_cli.py makes them."""
    make_image(run.directory / "fat32.img", 32, tree(random.Random(3)), run.directory)
    (run.directory / "random.img").write_bytes(random.Random(4).randbytes(1 << 20))


def setup_proxy_machine(run: PageRun) -> None:
    """``spec`` and ``pm``: a booted proxy machine with an e1000 on QEMU's user network."""
    factory = run.request.getfixturevalue("proxy_machine_factory")

    def configure(spec: Any) -> None:
        spec.netdev("user", "net0", restrict=True)
        spec.device("e1000", netdev="net0")
        run.namespace["spec"] = spec

    run.namespace["pm"] = factory(configure, name="docs")


SETUPS: dict[str, Callable[[PageRun], None]] = {
    "stack": setup_stack, "scratch_disks": setup_scratch_disks, "fat_image": setup_fat_image,
    "cli_images": setup_cli_images, "proxy_machine": setup_proxy_machine,
}


def prepare(run: PageRun, block: Block) -> None:
    for name in filter(None, block.directives.get("setup", "").split(",")):
        assert name in SETUPS, f"{block.where}: no setup {name!r}; there are {sorted(SETUPS)}"
        if name not in run.made:
            SETUPS[name](run)
            run.made.add(name)


# ---- running python and console blocks ----

def run_python(run: PageRun, block: Block) -> None:
    before = set(run.namespace)
    code = compile("\n" * block.line + block.text, str(block.page), "exec")    # tracebacks name page lines
    exec(code, run.namespace)
    if "pytest" in block.directives:
        tests = [name for name in run.namespace if name.startswith("test_") and name not in before]
        assert tests, f"{block.where}: a pytest block that defines no test"
        for name in tests:
            function = run.namespace[name]
            arguments = function.__code__.co_varnames[:function.__code__.co_argcount]
            function(*(run.request.getfixturevalue(argument) for argument in arguments))


def expected_pattern(expected: str) -> re.Pattern[str]:
    """The expected output, literally, with ``...`` standing for any text (lines included)."""
    parts = [re.escape(part) for part in expected.split("...")]
    return re.compile(".*?".join(parts), re.DOTALL)


def run_console(run: PageRun, block: Block) -> None:
    session: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        else:
            assert session, f"{block.where}: a console block starts with a `$ ` command"
            session[-1][1].append(line.rstrip())
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.pop("HWHARNESS_DEBUG", None)
    for command, output in session:
        script = f'hwharness() {{ "{sys.executable}" -m harness "$@"; }}\n{command}'
        result = subprocess.run(["bash", "-c", script], cwd=run.directory, env=environment, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        actual = "\n".join(line.rstrip() for line in result.stdout.splitlines())
        expected = "\n".join(output).strip("\n")
        assert expected_pattern(expected).fullmatch(actual), (
            f"{block.where}: `{command}` printed\n{actual}\n--- where the page shows\n{expected}")


def pages_with(*kinds: str) -> list[Path]:
    return [page for page in PAGES if any(b.kind in kinds for b in blocks(page))]


@pytest.mark.qemu
@pytest.mark.parametrize("page", pages_with("python", "console"), ids=page_id)
def test_python_and_console_blocks_run_as_shown(page: Path, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    runnable = [b for b in blocks(page) if b.kind in ("python", "console")]
    with contextlib.ExitStack() as stack, contextlib.chdir(tmp_path):
        run = PageRun(request, tmp_path, {"__name__": f"docs:{page_id(page)}"}, stack)
        for block in runnable:
            prepare(run, block)
            (run_python if block.kind == "python" else run_console)(run, block)


# ---- checking synopses and the tree ----

@functools.lru_cache(maxsize=None)
def help_of(command: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, "-m", "harness", *command, "--help"], cwd=REPO, text=True,
                            capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert result.returncode == 0, f"`hwharness {' '.join(command)} --help` failed: {result.stderr}"
    return result.stdout


def options_in(help_text: str) -> dict[str, set[str] | None]:
    """Each option the help shows -> the values it takes (an empty set: any), None for a flag."""
    options: dict[str, set[str] | None] = {}
    for match in re.finditer(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?:[ =](\{[^}]*\}|[A-Z][A-Z0-9_]*)(?![\w-]))?",
                             help_text):
        name, value = match.groups()
        if value is None:
            options.setdefault(name, None)
        else:
            options[name] = set(value.strip("{}").split(",")) if value.startswith("{") else set()
    return options


def choices_in(help_text: str) -> set[str]:
    return {word for group in re.findall(r"\{([^}]*)\}", help_text) for word in group.split(",")}


LITERAL = re.compile(r"[a-z][a-z0-9-]*")


def check_hwharness(line: str, where: str) -> None:
    command: tuple[str, ...] = ()
    tokens = [t for t in re.split(r"[\s\[\]]+", line) if t][1:]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in ("...", "|"):
            continue
        if token == "--":
            break                               # what follows goes to the guest
        options = options_in(help_of(command))
        if token.startswith("-"):
            name = token.partition("=")[0]
            assert name in options, f"{where}: `hwharness {' '.join(command)}` has no option {name}"
            values = options[name]
            if values is not None and "=" not in token and i < len(tokens):
                value = tokens[i]
                i += 1
                if values and value != "...":
                    shown = set(value.split("|"))
                    assert shown <= values, f"{where}: {name} takes {sorted(values)}, not {sorted(shown - values)}"
            continue
        if LITERAL.fullmatch(token):
            assert token in choices_in(help_of(command)), (
                f"{where}: `hwharness {' '.join(command)}` has no subcommand or choice {token!r}")
            command += (token,)
        # anything else (IMAGE, PATH, t.json) is an argument the person supplies


def check_synopsis(block: Block) -> None:
    makefile = (REPO / "Makefile").read_text()
    for number, raw in enumerate(block.text.splitlines()):
        where = f"{block.where}+{number + 1}"
        line = raw.split("  #")[0].strip()
        if not line or raw.strip().startswith("#"):
            continue
        words = line.split()
        if words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w):
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target}"
        else:
            assert words[0] == "hwharness", f"{where}: a synopsis line is `hwharness ...` or `make ...`: {raw!r}"
            check_hwharness(line, where)


def check_tree(block: Block) -> None:
    listed = set()
    for raw in block.text.splitlines():
        if not raw.strip():
            continue
        path = raw.split()[0]
        assert path.endswith("/") and (REPO / path).is_dir(), f"{block.where}: {path} is not a folder here"
        listed.add(path.rstrip("/"))
    for top in ("harness", "drivers"):
        for folder in sorted((REPO / top).iterdir()):
            if (folder / "__init__.py").exists():
                name = str(folder.relative_to(REPO))
                assert name in listed, f"{block.where}: the tree does not list {name}/"


def test_every_block_is_checked_by_something() -> None:
    unchecked = [f"{b.where}: a ```{b.language} block" for page in PAGES for b in blocks(page) if b.kind == "unchecked"]
    assert not unchecked, f"blocks that nothing checks (python, console, a synopsis, a tree): {unchecked}"


@pytest.mark.parametrize("page", pages_with("synopsis", "tree"), ids=page_id)
def test_synopses_and_trees_match_the_code(page: Path) -> None:
    for block in blocks(page):
        if block.kind == "synopsis":
            check_synopsis(block)
        elif block.kind == "tree":
            check_tree(block)


def test_every_page_says_what_it_is_for() -> None:
    """A page opens with its title and then a sentence on what it is for."""
    for page in PAGES:
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and not lines[1].startswith(("#", "`", "|", "-", "<")), page_id(page)


def test_the_readme_says_the_test_command_ci_runs() -> None:
    assert "make test" in (REPO / "README.md").read_text()
