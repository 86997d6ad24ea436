"""``hwharness bench compare REV``: the working tree against an earlier revision, on this machine.

Every other bench compares Python with a baseline inside one revision (the C
loop, qtest); none of them sees a change make the common path slower for
both. This one checks REV out into a temporary git worktree (its own code,
its own guest), then runs the chosen benches in REV and in the working tree,
each side its own process with its own code, alternating which side goes
first, for several rounds. A key both sides report gets its per-round
values, their medians, ``new_over_base`` (median over median) and the
spread of the per-round ratios (max/min), and says which way is better
where its name tells (``*_iops``, ``*_per_s``... higher; ``*_us``, ``p50``... lower).
Such a key gets a verdict: ``worse`` or ``better`` only where the rounds
separate the sides beyond their own noise, ``within noise`` otherwise. From
five rounds on the test is paired, round by round (a one-sided exact
Wilcoxon signed-rank test on the rounds' log ratios, p <= 0.05: with five
rounds, every round's new side beyond its base), so the host's drift between
rounds cancels; on fewer it is a rank test of the pooled values (with three
rounds a side, every round of one side beyond every round of the other). The
round trip's p50 swings 1.1-2.6 us between runs of one revision against
itself, so a median ratio alone called noise a regression. Each key is its
own test, so where nothing changed about one in ten of them still gets a
verdict (0.05 each way): ``keys_tested`` and ``chance_verdicts`` say how
many, and a verdict is evidence where it repeats in another compare or the
change explains it (86 keys, 11 verdicts, comparing two revisions whose
measured code was the same).

An older revision may lack a bench (it is skipped, and the JSON says so) or
``--quick`` (then both sides run the full bench, so that they do the same
work; the JSON records ``quick`` per bench), and runs its CLI as ``python -m harness.cli`` if it has no
``harness/__main__.py``. ``forward``, ``serve`` and ``boot`` (not among the defaults: they boot
the Linux guest too) need the image ``make images`` builds, which git does not keep: REV's
checkout builds its own with REV's ``images/linux_guest.py`` (its init, its modules) from the
packages the working tree's build downloaded, so both sides boot the same kernel and a change
to the image is measured like a change to the code. A revision without that script borrows the
working tree's image; the JSON's ``images`` says which.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ...errors import AbiError, BadInput, HarnessError
from ...machine.linux import IMAGES, LINUX_DIR
from ...machine.machine import left_by_the_dead, owned_prefix
from ...proxy.abi import load_abi
from ...proxy.guest import guest_elf
from ...proxy.machine import IOMMU_ENV

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "hwharness-compare-"

# what each bench name runs: the CLI's words after the program name
BENCHES: dict[str, list[str]] = {
    "roundtrip": ["bench", "roundtrip"],
    "latency-spin": ["latency", "--mode", "spin"],
    "latency-sleep": ["latency", "--mode", "sleep"],
    "ahci": ["bench", "ahci"],
    "nvme": ["bench", "nvme"],
    "e1000": ["bench", "e1000"],
    "instructions": ["bench", "instructions"],
    "forward": ["bench", "forward"],
    "serve": ["bench", "serve"],
    "boot": ["bench", "boot"],
}
# Benches that boot the Linux image `make images` builds (outputs git ignores, so REV's
# checkout has none until it builds its own: base_images); where it and its script lie in a tree
LINUX_IMAGE = LINUX_DIR.relative_to(IMAGES.parent)
IMAGE_SCRIPT = (IMAGES / "linux_guest.py").relative_to(IMAGES.parent)
BOOTS_LINUX = {"forward", "serve", "boot"}
IMAGE_TIMEOUT = 600.0
# Benches that measure the guest alone: both sides run the working tree's code, the base
# side with REV's guest (so a revision from before the bench is measured too, if its
# guest speaks this harness's ABI).
GUEST_ONLY = {"instructions"}
GROUPS = {"latency": ["latency-spin", "latency-sleep"]}
DEFAULT_ONLY = "roundtrip,latency,ahci,nvme,e1000"
GUEST_SOURCES = Path("guests") / "proxy"
SIDE_TIMEOUT = 1800.0           # one bench on one side; a full (not --quick) bench of an old revision is long

HIGHER = ("iops", "per_s", "mbps", "mb_s", "pps", "ops_s", "throughput", "frames_s", "bytes_s")
LOWER = ("_us", "_ms", "_ns", "_s", "p50", "p90", "p99", "latency", "instructions")
# ratios, settings and context, not figures, wherever in a key's path (a thread's share of the
# cores, an -icount shift, the idle wait a bench was told to take, the seconds a figure's runs
# took: what its cores are shared over, and named after the figure, which is compared itself);
# "count" as a word, so that `init_icount_s` is a figure
NEITHER = re.compile(r"ratio|_over_|cost|spread|foreign|cores|(?<![a-z])count|load|shift|timed_s|^idle_s$")


class CompareError(HarnessError):
    """A revision could not be checked out or built, or a bench failed on one side."""


def better(key: str) -> str | None:
    """"higher" or "lower" where the key's name says which is better, else None. A leaf that
    names no unit takes a time unit from its parents (``phases_p50_s.firmware`` is seconds); a
    parent named after a throughput holds facts about that figure (``work.rx_pps_64.units_per_run``),
    not the figure."""
    parts = key.lower().split(".")
    if any(NEITHER.search(part) for part in parts):
        return None
    for depth, part in enumerate(reversed(parts)):
        if any(word in part for word in HIGHER):
            return "higher" if depth == 0 else None
        if any(part.endswith(word) or word in part for word in LOWER):
            return "lower"
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a bench's JSON by its dotted path; lists (per-round detail) are left out."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.rstrip(".")] = float(value)
    return out


@dataclass
class Tree:
    """A checkout whose own code runs the benches."""

    label: str
    path: Path
    commit: str

    @property
    def cli(self) -> list[str]:
        module = "harness" if (self.path / "harness" / "__main__.py").exists() else "harness.cli"
        return [sys.executable, "-m", module]

    def run(self, words: list[str], accel: str, quick: bool, out: Path) -> dict[str, Any]:
        """One bench on this tree: its JSON."""
        argv = self.cli + words + ["--accel", accel, "--json", str(out)] + (["--quick"] if quick else [])
        done = subprocess.run(argv, cwd=self.path, env=_own_code(self.path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=SIDE_TIMEOUT)
        if done.returncode:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise CompareError(f"{self.label}: `{' '.join(words)}` failed ({done.returncode}):\n{tail}")
        return json.loads(out.read_text())

    def help(self, words: list[str]) -> str | None:
        """The bench's --help, or None where this tree's CLI does not know it (an old revision)."""
        probe = subprocess.run(self.cli + words + ["--help"], cwd=self.path, env=_own_code(self.path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        return probe.stdout if probe.returncode == 0 else None


def _own_code(path: Path) -> dict[str, str]:
    """The environment for a tree's process: its own packages first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop(IOMMU_ENV, None)                # both sides as users get them
    return env


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise CompareError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def repository() -> Path:
    """The git checkout this harness runs from; bench compare needs one."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        raise BadInput(f"bench compare runs from a git checkout of hwharness; {root} is not one")
    return root


def sweep_killed(repo: Path) -> None:
    """Remove what compares that were killed (SIGKILL, a lost machine) left behind: their
    worktrees, which git keeps registered, and their scratch directories. Ctrl-C and SIGTERM
    unwind and leave nothing; only a process that could not is swept."""
    for d in left_by_the_dead(Path(tempfile.gettempdir()), SCRATCH_PREFIX):
        if (d / ".git").is_file():              # a worktree: git forgets it too
            try:
                _git(repo, "worktree", "remove", "--force", str(d))
            except CompareError:                # another repository's, or half made
                pass
        shutil.rmtree(d, ignore_errors=True)
    _git(repo, "worktree", "prune")


class Worktree:
    """REV checked out beside the repository for the length of a ``with``, its guest built."""

    def __init__(self, repo: Path, rev: str) -> None:
        self.repo, self.rev = repo, rev
        try:
            self.commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        except CompareError:
            raise BadInput(f"bench compare: {rev!r} is not a revision of {repo}") from None
        self.dir = Path(tempfile.mkdtemp(prefix=owned_prefix(self.commit[:8], SCRATCH_PREFIX)))

    def __enter__(self) -> Tree:
        _git(self.repo, "worktree", "add", "--detach", str(self.dir), self.commit)
        built = subprocess.run(["make", "-C", str(self.dir), "guest", f"PYTHON={sys.executable}"],
                               env=_own_code(self.dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if built.returncode:
            self.__exit__()
            raise CompareError(f"{self.rev}: its guest did not build:\n{built.stdout[-2000:]}")
        return Tree(self.rev, self.dir, self.commit)

    def __exit__(self, *_: object) -> None:
        _git(self.repo, "worktree", "remove", "--force", str(self.dir))


def base_images(name: str, base: Tree, new: Tree) -> str | None:
    """REV's Linux image for bench ``name`` if it boots one: built in REV's checkout by REV's
    own script, its downloads (the .deb files and their unpacked trees, read only) linked from
    the working tree's cache, everything it writes its own; or, where REV has no such script,
    the working tree's image linked. How REV got it, or None where there is nothing to do (the
    bench boots none, an earlier bench got it, or the working tree has none: the bench says so)."""
    own, theirs = new.path / LINUX_IMAGE, base.path / LINUX_IMAGE
    if name not in BOOTS_LINUX or not own.exists() or theirs.exists():
        return None
    theirs.parent.mkdir(parents=True, exist_ok=True)
    if not (base.path / IMAGE_SCRIPT).exists():
        theirs.symlink_to(own.resolve(), target_is_directory=True)
        return f"borrowed the working tree's (no {IMAGE_SCRIPT})"
    cache = theirs / "cache"
    cache.mkdir(parents=True)
    for entry in (own / "cache").iterdir():
        if entry.suffix == ".deb" or (entry / ".extracted").exists():
            (cache / entry.name).symlink_to(entry.resolve())
    done = subprocess.run([sys.executable, str(base.path / IMAGE_SCRIPT), str(theirs)], cwd=base.path / "images",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=IMAGE_TIMEOUT)
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-5:])
        raise CompareError(f"{base.label}: {IMAGE_SCRIPT} failed ({done.returncode}):\n{tail}")
    return f"built by its own {IMAGE_SCRIPT}"


def guest_unusable(tree: Tree) -> str | None:
    """Why the working tree's code cannot drive ``tree``'s guest (another ABI), or None."""
    try:
        load_abi(guest_elf(tree.path / GUEST_SOURCES))
    except AbiError as exc:
        return f"its guest does not speak this harness's ABI: {exc}"
    return None


SIGNIFICANT = 0.05              # the tests' p at or below which a verdict is more than noise
DEALS = 20000                   # deals (or sign flips) a test enumerates at most (C(14, 7) = 3432)
# The fewest rounds whose paired test can reach SIGNIFICANT (every round one way: p = 1/2^n).
PAIRED_ROUNDS = math.ceil(math.log2(1 / SIGNIFICANT))


def mean_ranks(values: Iterable[float]) -> dict[float, float]:
    """Each value's rank among ``values`` (1 the smallest), ties at their mean rank."""
    ordered = sorted(values)
    return {v: statistics.mean(i + 1 for i, w in enumerate(ordered) if w == v) for v in set(ordered)}


def share_at_least(totals: list[float], observed: float) -> float:
    """The share of ``totals`` at least ``observed``: a permutation test's one-sided p."""
    return sum(total >= observed - 1e-9 for total in totals) / len(totals)


def rank_p(lower: list[float], higher: list[float]) -> float:
    """The one-sided p of a Mann-Whitney rank test that ``higher``'s values lie above ``lower``'s.

    If both sides come from one distribution, every way of dealing the pooled
    values into groups of these sizes is equally likely; p is the share of the
    deals whose second group's rank sum (ties get their mean rank) is at least
    the one observed. Rounds are few, so the deals are enumerated (sampled,
    with a fixed seed, past ``DEALS``).
    """
    rank = mean_ranks(lower + higher)
    ranks = [rank[v] for v in lower + higher]
    observed = sum(rank[v] for v in higher)
    n, k = len(ranks), len(higher)
    if math.comb(n, k) <= DEALS:
        deals: Iterable[tuple[int, ...]] = itertools.combinations(range(n), k)
    else:
        dealer = random.Random(0)
        deals = (tuple(dealer.sample(range(n), k)) for _ in range(DEALS))
    return share_at_least([sum(ranks[i] for i in deal) for deal in deals], observed)


def signed_rank_p(base: list[float], new: list[float]) -> float:
    """The one-sided p of a Wilcoxon signed-rank test that ``new`` lies above ``base``, round by round.

    A round's two sides run one after the other, so the host's drift between rounds (its
    speed swings by half within the hour here) cancels in the round's ratio, where a test
    of the pooled values counts it as noise. If nothing changed, each round's log ratio is
    as likely below zero as above, so every flip of their signs is equally likely; p is the
    share of the flips whose sum of the positive ratios' ranks (by size, ties at their mean
    rank) is at least the one observed. A round whose sides are equal is no evidence.
    """
    logs = [math.log(n / b) for b, n in zip(base, new) if b > 0 and n > 0 and n != b]
    if not logs:
        return 1.0
    rank = mean_ranks(abs(x) for x in logs)
    ranks = [rank[abs(x)] for x in logs]
    observed = sum(r for r, x in zip(ranks, logs) if x > 0)
    if 2 ** len(ranks) <= DEALS:
        flips: Iterable[tuple[bool, ...]] = itertools.product((False, True), repeat=len(ranks))
    else:
        flipper = random.Random(0)
        flips = (tuple(flipper.random() < 0.5 for _ in ranks) for _ in range(DEALS))
    return share_at_least([sum(r for r, up in zip(ranks, flip) if up) for flip in flips], observed)


def verdict(base: list[float], new: list[float], way: str) -> tuple[str, float, float, str]:
    """``worse``, ``better`` or ``within noise`` for a key whose ``way`` is better, both p's,
    and the test: the paired one (:func:`signed_rank_p`) from PAIRED_ROUNDS rounds on, the
    rank test of the pooled values (:func:`rank_p`) on fewer, where no paired test can
    reach SIGNIFICANT."""
    if len(base) >= PAIRED_ROUNDS:
        test, p_up, p_down = "signed-rank", signed_rank_p(base, new), signed_rank_p(new, base)
    else:
        test, p_up, p_down = "rank", rank_p(base, new), rank_p(new, base)   # new above; new below
    p_worse, p_better = (p_down, p_up) if way == "higher" else (p_up, p_down)
    if p_worse <= SIGNIFICANT:
        return "worse", p_worse, p_better, test
    if p_better <= SIGNIFICANT:
        return "better", p_worse, p_better, test
    return "within noise", p_worse, p_better, test


def summarise(per_round: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Every key both sides reported in every round: values, medians, new over base, spread."""
    if not per_round:
        return {}
    keys = set.intersection(*(set(base) & set(new) for base, new in per_round))
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        base = [b[key] for b, _ in per_round]
        new = [n[key] for _, n in per_round]
        mb, mn = statistics.median(base), statistics.median(new)
        ratios = [n / b for b, n in zip(base, new) if b]
        entry: dict[str, Any] = {"base": base, "new": new, "base_median": mb, "new_median": mn,
                                 "new_over_base": mn / mb if mb else None,
                                 "ratio_spread": max(ratios) / min(ratios) if ratios and min(ratios) > 0 else None,
                                 "better": better(key)}
        if entry["new_over_base"] is not None and entry["better"]:
            entry["verdict"], entry["p_worse"], entry["p_better"], entry["test"] = verdict(base, new, entry["better"])
            entry["worse"] = entry["verdict"] == "worse"
        out[key] = entry
    return out


def expand(only: str) -> list[str]:
    names: list[str] = []
    for name in (n.strip() for n in only.split(",") if n.strip()):
        for part in GROUPS.get(name, [name]):
            if part not in BENCHES:
                raise BadInput(f"bench compare --only: no bench {name!r} (choose from "
                               f"{', '.join(sorted(set(BENCHES) | set(GROUPS)))})")
            if part not in names:
                names.append(part)
    return names


def rounds_of(rounds: int) -> Iterator[bool]:
    """For each round, whether the base goes first: alternating, the base first in round 0."""
    for r in range(rounds):
        yield r % 2 == 0


def run(rev: str, accel: str = "auto", only: str = DEFAULT_ONLY, quick: bool = False, rounds: int = 3,
        say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Compare the working tree with ``rev``; see the module's docstring. ``say`` gets progress lines."""
    names = expand(only)
    if rounds < 1:
        raise BadInput("bench compare --rounds: at least 1")
    repo = repository()
    head = _git(repo, "rev-parse", "HEAD")
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    new = Tree("working tree", repo, head)
    result: dict[str, Any] = {"bench": "compare", "base": rev, "accel": accel, "rounds": rounds, "quick": quick,
                              "new": {"commit": head, "dirty": dirty}, "benches": {}, "skipped": {}, "images": {}}
    sweep_killed(repo)
    with Worktree(repo, rev) as base:
        result["base_commit"] = base.commit
        with tempfile.TemporaryDirectory(prefix=owned_prefix("results", SCRATCH_PREFIX)) as scratch:
            for name in names:
                words = BENCHES[name]
                runs = {"base": (base, words), "new": (new, words)}
                if name in GUEST_ONLY:
                    why = guest_unusable(base)
                    if why:
                        result["skipped"][name] = why
                        say(f"{name}: skipped ({why})")
                        continue
                    runs["base"] = (new, words + ["--guest-sources", str(base.path / GUEST_SOURCES)])
                image = base_images(name, base, new)
                if image:
                    result["images"][name] = image
                    say(f"{name}: {base.label}'s Linux image {image}")
                trees = {tree.label: tree for tree, _ in runs.values()}
                helps = {label: tree.help(words) for label, tree in trees.items()}
                missing = [label for label, text in helps.items() if text is None]
                if missing:
                    result["skipped"][name] = f"not in {', '.join(missing)}"
                    say(f"{name}: skipped ({result['skipped'][name]})")
                    continue
                # the same work on both sides: --quick only where both have it
                both_quick = quick and all("--quick" in (text or "") for text in helps.values())
                per_round: list[tuple[dict[str, float], dict[str, float]]] = []
                order_log = []
                for r, base_first in enumerate(rounds_of(rounds)):
                    sides = ["base", "new"]
                    figures: dict[str, dict[str, float]] = {}
                    for side in (sides if base_first else sides[::-1]):
                        tree, argv = runs[side]
                        started = time.monotonic()
                        data = tree.run(argv, accel, both_quick, Path(scratch) / f"{name}-{side}-{r}.json")
                        figures[side] = flatten(data)
                        say(f"{name} round {r + 1}/{rounds}: {side} ({tree.label}) "
                            f"{time.monotonic() - started:.0f} s")
                    per_round.append((figures["base"], figures["new"]))
                    order_log.append("base first" if base_first else "new first")
                keys = summarise(per_round)
                tested = sum("verdict" in e for e in keys.values())
                result["benches"][name] = {
                    "keys_tested": tested, "chance_verdicts": chance_verdicts(tested),
                    "order": order_log, "quick": both_quick, "keys": keys,
                    "base_code": "the working tree's, with REV's guest" if name in GUEST_ONLY else "REV's",
                    "worse": sorted(k for k, e in keys.items() if e.get("worse")),
                }
    tested = sum(b["keys_tested"] for b in result["benches"].values())
    result.update(keys_tested=tested, chance_verdicts=chance_verdicts(tested))
    return result


def chance_verdicts(tested: int) -> float:
    """How many of ``tested`` keys get a verdict, at most, where nothing changed (p <= SIGNIFICANT,
    either way)."""
    return round(2 * SIGNIFICANT * tested, 1)


def table(result: dict[str, Any]) -> str:
    """The keys whose better direction is known, one line each: medians and new over base."""
    lines = [f"new ({result['new']['commit'][:10]}{'+dirty' if result['new']['dirty'] else ''}) over "
             f"base ({result['base']} = {result.get('base_commit', '?')[:10]}), {result['rounds']} rounds, "
             f"{result['accel']}"]
    for name, bench in result["benches"].items():
        lines.append(f"{name}:")
        for key, e in bench["keys"].items():
            if e["better"] is None or e["new_over_base"] is None:
                continue
            mark = f"  {e['verdict']}" if e.get("verdict") != "within noise" else ""
            spread = f"{e['ratio_spread']:.2f}" if e["ratio_spread"] else "-"
            lines.append(f"  {key:<48} {e['base_median']:>12.4g} -> {e['new_median']:>12.4g}  "
                         f"x{e['new_over_base']:.3f} (spread {spread}, {e['better']} is better){mark}")
    for name, why in result["skipped"].items():
        lines.append(f"{name}: skipped, {why}")
    if result.get("keys_tested"):
        lines.append(f"{result['keys_tested']} keys tested: even where nothing changed, about "
                     f"{result['chance_verdicts']:g} of them would get a verdict by chance; "
                     "trust one that repeats or that the change explains")
    return "\n".join(lines)
