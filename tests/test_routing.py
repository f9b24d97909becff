"""The replica router's pure parts (lattice_engine.server.routing): prefix keys from full KV
blocks, the consistent-hash ring, the placement policy and the merged /metrics text. No
Ray needed (tests/test_ray_serve.py runs them inside Ray Serve)."""

from __future__ import annotations

import random
import re

import pytest

from lattice_engine.errors import ConfigError
from lattice_engine.server.routing import HashRing, PrefixRouter, merge_metrics, prefix_key


def test_prefix_key_covers_the_first_full_blocks_only():
    rng = random.Random(0)
    head = [rng.randrange(50000) for _ in range(64)]
    a = prefix_key(head + [1, 2, 3], block_size=16, prefix_blocks=4)
    b = prefix_key(head + [9] * 40, block_size=16, prefix_blocks=4)
    assert a is not None and a == b  # tokens past the 4 blocks do not count
    changed = list(head)
    changed[63] += 1  # the last token of the 4th block
    assert prefix_key(changed, 16, 4) != a
    # with fewer full blocks than prefix_blocks, the partial block does not count
    assert prefix_key(head[:40], 16, 4) == prefix_key(head[:32] + [7] * 8, 16, 4)
    assert prefix_key(head[:40], 16, 4) != prefix_key(head[:48], 16, 4)
    assert prefix_key(head[:15], 16, 4) is None  # no full block: nothing to reuse
    assert prefix_key([], 16, 4) is None
    with pytest.raises(ConfigError, match="block_size = 0"):
        prefix_key(head, 0, 4)


def test_ring_moves_only_the_keys_of_a_member_that_leaves():
    ring = HashRing(vnodes=64)
    keys = [random.Random(k).getrandbits(64) for k in range(2000)]
    three = ["r0", "r1", "r2"]
    before = {k: ring.owner(k, three) for k in keys}
    share = {m: sum(1 for o in before.values() if o == m) / len(keys) for m in three}
    assert all(0.2 < s < 0.47 for s in share.values()), share  # vnodes spread the load
    after = {k: ring.owner(k, ["r0", "r2"]) for k in keys}
    for k in keys:
        if before[k] != "r1":
            assert after[k] == before[k]  # keys of the live members stay put
        else:
            assert after[k] in ("r0", "r2")
    # and back: a member that returns gets its own arcs again
    assert {k: ring.owner(k, three) for k in keys} == before
    with pytest.raises(ValueError, match="no replica is live"):
        ring.owner(1, [])


def test_router_prefers_the_ring_until_the_replica_is_too_busy():
    router = PrefixRouter("prefix", max_imbalance=2)
    key = prefix_key(list(range(32)), 16, 4)
    loads = {"a": 0, "b": 0}
    home = router.choose(key, loads)
    other = "b" if home == "a" else "a"
    loads[home] = 2  # 2 beyond the least loaded: still within the bound
    assert router.choose(key, loads) == home
    loads[home] = 3  # beyond it: the least loaded
    assert router.choose(key, loads) == other
    assert router.choose(None, {"a": 5, "b": 1}) == "b"  # no full block: least loaded
    # equal loads (requests routed at once see the same counts): taken in turn
    assert {router.choose(None, {"a": 0, "b": 0}) for _ in range(2)} == {"a", "b"}
    assert router.decisions == {"affinity": 2, "overloaded": 1, "no_prefix": 3,
                                "round_robin": 0}


def test_round_robin_ignores_the_key():
    router = PrefixRouter("round-robin")
    key = prefix_key(list(range(32)), 16, 4)
    picks = [router.choose(key, {"a": 0, "b": 0, "c": 0}) for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ConfigError, match="routing = 'random' is not valid"):
        PrefixRouter("random")


def test_merged_metrics_label_every_sample_and_keep_families_together():
    one = ("# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n"
           "# HELP h Seconds.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\n"
           "h_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n")
    two = one.replace("x_total 3", "x_total 5").replace("h_count 2", "h_count 4")
    text = merge_metrics({"r1": one, "r2": two})
    lines = text.splitlines()
    assert lines.count("# HELP x_total Things.") == 1 and lines.count("# TYPE h histogram") == 1
    assert lines[:4] == ["# HELP x_total Things.", "# TYPE x_total counter",
                         'x_total{replica="r1"} 3', 'x_total{replica="r2"} 5']
    h = lines.index("# TYPE h histogram")
    assert lines[h + 1:] == ['h_bucket{replica="r1",le="0.1"} 1',
                             'h_bucket{replica="r1",le="+Inf"} 2', 'h_sum{replica="r1"} 0.3',
                             'h_count{replica="r1"} 2', 'h_bucket{replica="r2",le="0.1"} 1',
                             'h_bucket{replica="r2",le="+Inf"} 2', 'h_sum{replica="r2"} 0.3',
                             'h_count{replica="r2"} 4']
    assert 'replica="a\\"b"' in merge_metrics({'a"b': "y 1\n"})  # label values escaped


@pytest.mark.parametrize("argv,message", [
    (["--replicas", "2", "--threads", "2"], "--threads 2 sets one engine's threads; with "
                                            "replicas use --threads-per-replica"),
    (["--replicas", "0"], "ray.replicas = 0 is out of range"),
    (["--replicas", "2", "--threads-per-replica", "0"],
     "ray.threads_per_replica = 0 is out of range"),
    (["--ray-address", " "], r"ray.address \(--ray-address\) is empty"),
])
def test_serve_replica_flags_are_checked_before_anything_starts(capsys, argv, message):
    from lattice_engine.cli import main
    assert main(["serve", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
