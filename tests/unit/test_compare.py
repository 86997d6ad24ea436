"""bench compare's arithmetic, without QEMU: which keys it compares and how."""

import shutil
from pathlib import Path

import pytest

from harness.errors import BadInput
from harness.tools.bench.compare import (PAIRED_ROUNDS, CompareError, Tree, base_images, better, chance_verdicts, expand, flatten,
                                         rank_p, rounds_of, signed_rank_p, summarise, table, verdict)


def test_flatten_keeps_numbers_by_path_and_drops_lists_and_flags() -> None:
    data = {"accel": "tcg", "iommu": True, "results": {"qd1": {"python_iops": 100, "p50_us": 2.5}},
            "per_round": [{"python_iops": 1}]}
    assert flatten(data) == {"results.qd1.python_iops": 100.0, "results.qd1.p50_us": 2.5}


@pytest.mark.parametrize("key, expected", [
    ("results.qd1.python_iops", "higher"), ("results.seq.python_mb_s", "higher"),
    ("results.pio.proxy_p50_us", "lower"), ("latency.end_to_end.p99", "lower"),
    ("results.qd1.ratio_python_over_native", None), ("iommu_cost", None), ("foreign_cores", None),
    ("phases_p50_s.firmware", "lower"), ("init_icount_s", "lower"), ("restore_count", None),
    ("foreign_cores.boots", None), ("host_load_before", None), ("restart_steps_p50_ms.noticed", "lower"),
    # facts about a figure are not the figure: a thread's share of the cores, the work per run
    ("cpu_cores.randread_4k_qd1_iops.vcpu", None), ("work.rx_pps_64.units_per_run", None),
    ("foreign_cores.restores_standby", None), ("peer.spread.peer_linux_fwd_pps_64", None), ("icount_shift", None),
    ("timed_s.fwd_pps_1514", None), ("after_idle.idle_s", None), ("after_idle.boot_p50_s", "lower"),
])
def test_which_way_is_better_comes_from_the_name(key: str, expected: str | None) -> None:
    assert better(key) == expected


def test_summarise_compares_medians_and_flags_the_worse_direction() -> None:
    rounds = [({"a_iops": 100.0, "b_us": 10.0, "only_base": 1.0}, {"a_iops": 90.0, "b_us": 8.0}),
              ({"a_iops": 110.0, "b_us": 12.0, "only_base": 1.0}, {"a_iops": 99.0, "b_us": 9.0}),
              ({"a_iops": 105.0, "b_us": 11.0, "only_base": 1.0}, {"a_iops": 94.5, "b_us": 8.8})]
    keys = summarise(rounds)
    assert set(keys) == {"a_iops", "b_us"}, "only keys both sides report in every round"
    a = keys["a_iops"]
    assert a["base"] == [100.0, 110.0, 105.0] and a["new_median"] == 94.5
    assert a["new_over_base"] == pytest.approx(94.5 / 105.0) and a["worse"] is True
    assert a["verdict"] == "worse"                         # every new round below every base round
    assert a["ratio_spread"] == pytest.approx(1.0)        # every round 0.9
    assert keys["b_us"]["worse"] is False and keys["b_us"]["verdict"] == "better"   # lower latency is better


def test_the_rank_test_is_exact_on_few_rounds() -> None:
    # three rounds a side: 20 ways to deal six values, one of them puts all three new on top
    assert rank_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(1 / 20)
    assert rank_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == 1.0
    assert rank_p([1.0, 1.0], [1.0, 1.0]) == 1.0          # ties are no evidence either way


def test_the_paired_test_is_exact_and_needs_five_rounds() -> None:
    assert PAIRED_ROUNDS == 5                              # 1/2^5 = 0.031, the first flip count under 0.05
    up = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert signed_rank_p(up, [v * 1.1 for v in up]) == pytest.approx(1 / 32)
    assert signed_rank_p([v * 1.1 for v in up], up) == 1.0
    assert signed_rank_p(up, up) == 1.0                   # equal rounds are no evidence either way


def test_rounds_paired_in_time_see_through_the_hosts_drift() -> None:
    # the host's speed drifts between rounds (boot p50 of the same code 1.1-1.6 s within the
    # hour); each round's new side is 0.9 of its base, which the pooled values hide
    base = [1.27, 1.12, 1.38, 1.56, 1.20]
    new = [v * 0.9 for v in base]
    assert rank_p(new, base) > 0.05, "the pooled values overlap"
    assert verdict(base, new, "lower")[0::3] == ("better", "signed-rank")
    assert verdict(base[:4], new[:4], "lower")[0::3] == ("within noise", "rank")


def test_a_median_ratio_the_rounds_do_not_separate_is_within_noise() -> None:
    # a revision against itself, measured quietly (the round trip's p50, six rounds a side):
    # the medians differ by 1.19x and the rounds overlap
    base = [1.582, 1.923, 1.912, 1.102, 1.442, 1.102]
    new = [1.423, 1.833, 2.614, 1.753, 1.792, 1.793]
    assert verdict(base, new, "lower")[0] == "within noise"
    assert verdict([1.1, 1.2, 1.15], [1.5, 1.6, 1.55], "lower")[0] == "worse"
    assert verdict([1.1, 1.2, 1.15], [1.5, 1.6, 1.55], "higher")[0] == "better"


def test_rounds_alternate_which_side_goes_first() -> None:
    assert list(rounds_of(4)) == [True, False, True, False]


def test_only_expands_groups_and_refuses_unknown_benches() -> None:
    assert expand("roundtrip,latency") == ["roundtrip", "latency-spin", "latency-sleep"]
    with pytest.raises(BadInput, match="no bench 'disk'"):
        expand("roundtrip,disk")


def checkouts(tmp_path: Path) -> tuple[Tree, Tree]:
    """A working tree with a built Linux image and its download cache, and a bare REV checkout."""
    new, base = Tree("working tree", tmp_path / "new", "n"), Tree("main", tmp_path / "base", "b")
    image = new.path / "images" / "linux"
    (image / "cache" / "linux-image_1_amd64").mkdir(parents=True)
    (image / "cache" / "linux-image_1_amd64" / ".extracted").touch()
    (image / "cache" / "linux-image_1_amd64.deb").write_text("deb")
    (image / "cache" / "blockread").write_text("the working tree's build")
    (image / "manifest.json").write_text('{"side": "new"}')
    (base.path / "images").mkdir(parents=True)
    return new, base


@pytest.mark.parametrize("bench", ("forward", "serve", "boot"))
def test_a_base_without_the_image_script_borrows_the_working_trees_image(tmp_path, bench: str) -> None:
    new, base = checkouts(tmp_path)
    assert base_images("e1000", base, new) is None
    assert not (base.path / "images" / "linux").exists(), "only the benches that boot it get one"
    assert "borrowed" in base_images(bench, base, new)
    assert (base.path / "images" / "linux" / "manifest.json").read_text() == '{"side": "new"}'
    assert base_images(bench, base, new) is None              # a second bench: already there
    assert expand(bench) == [bench]


def test_a_base_with_the_image_script_builds_its_own_from_the_downloads_alone(tmp_path) -> None:
    new, base = checkouts(tmp_path)
    # REV's script: records what its cache holds, writes its own program build and manifest
    (base.path / "images" / "linux_guest.py").write_text(
        "import sys, pathlib\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "(out / 'seen').write_text(' '.join(sorted(p.name for p in (out / 'cache').iterdir())))\n"
        "(out / 'cache' / 'blockread').write_text('the base build')\n"
        "(out / 'manifest.json').write_text('{\"side\": \"base\"}')\n")
    assert "built" in base_images("boot", base, new)
    image = base.path / "images" / "linux"
    assert (image / "seen").read_text() == "linux-image_1_amd64 linux-image_1_amd64.deb"
    assert (image / "manifest.json").read_text() == '{"side": "base"}'
    assert not image.is_symlink()
    assert (new.path / "images" / "linux" / "cache" / "blockread").read_text() == "the working tree's build"
    (base.path / "images" / "linux_guest.py").write_text("raise SystemExit('no kernel package')\n")
    shutil.rmtree(image)
    with pytest.raises(CompareError, match="no kernel package"):
        base_images("serve", base, new)


def test_the_table_says_how_many_verdicts_chance_alone_gives() -> None:
    keys = summarise([({"a_iops": 100.0 + i, "b_us": 10.0 + i}, {"a_iops": 100.0 - i, "b_us": 10.0 - i})
                      for i in range(3)])
    tested = sum("verdict" in e for e in keys.values())
    assert tested == 2 and chance_verdicts(tested) == 0.2 and chance_verdicts(86) == 8.6
    result = {"new": {"commit": "abc", "dirty": False}, "base": "HEAD~", "base_commit": "def", "rounds": 3,
              "accel": "tcg", "benches": {"x": {"keys": keys, "keys_tested": tested}}, "skipped": {},
              "keys_tested": tested, "chance_verdicts": chance_verdicts(tested)}
    assert table(result).splitlines()[-1].startswith("2 keys tested: even where nothing changed, about 0.2")
