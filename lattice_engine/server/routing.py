"""Prefix-aware routing over engine replicas (pure Python; Ray Serve drives it, see
`ray_serve`).

A request's routing key is a hash of the token ids of its first full KV blocks (up to
`prefix_blocks` of them): two requests whose prompts share those blocks get the same key,
and a replica's prefix cache can only serve a request the blocks of which it has already
computed. Keys map to replicas by consistent hashing (a ring with `vnodes` points per
replica), so when a replica dies or one is added only the keys of its arcs move. The
preferred replica is skipped for the least loaded one when it has more than
`max_imbalance` requests in flight beyond the least loaded replica, or when the prompt
has no full block (nothing to reuse). `round-robin` ignores the key (the baseline of
bench/serve.py).

`merge_metrics` joins the Prometheus text of several replicas into one exposition with a
`replica="..."` label on every sample.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import ConfigError

POLICIES = ("prefix", "round-robin")
ACTIVE: list = []  # the PrefixRouters of this process's Ray handles (for /metrics)


@dataclass(frozen=True)
class RouteHint:
    """What the ingress tells the router about a request: its prefix key (None: no full
    block, or a body the ingress could not read: the replica answers with the error), or
    the one replica it must go to (`replica`, for per-replica calls)."""
    key: Optional[int] = None
    replica: Optional[str] = None


def _hash64(data: bytes) -> int:
    # a stable hash (Python's hash() is salted per process): the same prompt gets the same
    # key in every ingress process and every run
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_key(token_ids: Sequence[int], block_size: int, prefix_blocks: int) -> Optional[int]:
    """The hash of the token ids of the prompt's first min(prefix_blocks, full blocks)
    blocks of `block_size` tokens; None when the prompt has no full block."""
    if block_size < 1 or prefix_blocks < 1:
        raise ConfigError(f"block_size = {block_size}, prefix_blocks = {prefix_blocks}: "
                          f"both must be integers >= 1")
    full = min(len(token_ids) // block_size, prefix_blocks)
    if full == 0:
        return None
    head = token_ids[:full * block_size]
    return _hash64(b"".join(int(t).to_bytes(4, "little", signed=False) for t in head))


class HashRing:
    """Consistent hashing: each member owns `vnodes` points on a 64-bit ring; a key
    belongs to the member of the first point at or after it (wrapping around)."""

    def __init__(self, vnodes: int = 64):
        if not isinstance(vnodes, int) or vnodes < 1:
            raise ConfigError(f"vnodes = {vnodes!r} is out of range: it must be an integer "
                              f">= 1")
        self.vnodes = vnodes
        self._members: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self, members: frozenset[str]) -> None:
        ring = sorted((_hash64(f"{m}#{i}".encode()), m) for m in members
                      for i in range(self.vnodes))
        self._members = members
        self._points = [p for p, _ in ring]
        self._owners = [m for _, m in ring]

    def owner(self, key: int, members: Iterable[str]) -> str:
        members = frozenset(members)
        if not members:
            raise ValueError("the ring has no members: no replica is live")
        if members != self._members:
            self._rebuild(members)
        i = bisect.bisect_left(self._points, key)
        return self._owners[i % len(self._owners)]


class PrefixRouter:
    """Picks a replica for a request from the live ones and their in-flight counts."""

    def __init__(self, policy: str = "prefix", *, vnodes: int = 64, max_imbalance: int = 4):
        if policy not in POLICIES:
            raise ConfigError(f"routing = {policy!r} is not valid; choices: "
                              f"{', '.join(POLICIES)}")
        if not isinstance(max_imbalance, int) or max_imbalance < 0:
            raise ConfigError(f"max_imbalance = {max_imbalance!r} is out of range: it must "
                              f"be an integer >= 0")
        self.policy = policy
        self.max_imbalance = max_imbalance
        self.ring = HashRing(vnodes)
        self._turn = itertools.count()
        self._ties = itertools.count()
        # how requests were placed: affinity (the ring's choice), overloaded (the ring's
        # choice was skipped for the least loaded), no_prefix (no full block),
        # round_robin
        self.decisions = {"affinity": 0, "overloaded": 0, "no_prefix": 0, "round_robin": 0}

    def least_loaded(self, loads: Mapping[str, int]) -> str:
        """The replica with the fewest requests in flight; ties taken in turn (requests
        routed at the same moment all see the same counts, and would all go to one)."""
        low = min(loads.values())
        tied = sorted(m for m in loads if loads[m] == low)
        return tied[next(self._ties) % len(tied)]

    def choose(self, key: Optional[int], loads: Mapping[str, int]) -> str:
        """The replica for a request with prefix key `key`; `loads` maps each live
        replica to its requests in flight."""
        if not loads:
            raise ValueError("no replica is live")
        if self.policy == "round-robin":
            self.decisions["round_robin"] += 1
            members = sorted(loads)
            return members[next(self._turn) % len(members)]
        if key is None:
            self.decisions["no_prefix"] += 1
            return self.least_loaded(loads)
        preferred = self.ring.owner(key, loads)
        if loads[preferred] - min(loads.values()) > self.max_imbalance:
            self.decisions["overloaded"] += 1
            return self.least_loaded(loads)
        self.decisions["affinity"] += 1
        return preferred


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?(\s.*)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def merge_metrics(texts: Mapping[str, str], label: str = "replica") -> str:
    """Prometheus text of several replicas as one exposition: each metric family's HELP and
    TYPE once, then every replica's samples of it with `label="<replica>"` first among
    their labels. Families keep the order they first appear in."""
    families: dict[str, dict] = {}
    for replica, text in texts.items():
        tag = f'{label}="{_escape(str(replica))}"'
        family = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = families.setdefault(parts[2], {"HELP": None, "TYPE": None,
                                                            "samples": []})
                    family[parts[1]] = family[parts[1]] or line
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue  # not a sample line: dropped rather than corrupting the output
            name, _, labels, rest = m.groups()
            if family is None:
                family = families.setdefault(name, {"HELP": None, "TYPE": None,
                                                    "samples": []})
            merged = f"{tag},{labels}" if labels else tag
            family["samples"].append(f"{name}{{{merged}}}{rest}")
    out: list[str] = []
    for f in families.values():
        out += [line for line in (f["HELP"], f["TYPE"]) if line is not None]
        out += f["samples"]
    return "\n".join(out) + "\n"
