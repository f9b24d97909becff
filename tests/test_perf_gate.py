"""The perf gate's comparison (bench/perf_gate/gate.py) on synthetic counts: thresholds,
the table, exit codes, dump parsing. No valgrind, no build: CI runs the gate itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

GATE_DIR = Path(__file__).resolve().parent.parent / "bench" / "perf_gate"


@pytest.fixture(scope="module")
def gate():
    spec = importlib.util.spec_from_file_location("perf_gate", GATE_DIR / "gate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


BASE = {"avx2": {"matvec": 1000, "few": 1000, "attn": 1000, "gone": 500},
        "generic": {"matvec": 20000}}


def statuses(rows):
    return {(r.variant, r.name): r.status for r in rows}


def test_threshold_and_statuses(gate):
    measured = {"avx2": {"matvec": 1069, "few": 1071, "attn": 929, "new": 7},
                "generic": {"matvec": 20000}}
    rows = gate.compare(BASE, measured, 7.0)
    assert statuses(rows) == {
        ("avx2", "matvec"): "ok", ("avx2", "few"): "REGRESSED", ("avx2", "attn"): "improved",
        ("avx2", "gone"): "MISSING", ("avx2", "new"): "NEW", ("generic", "matvec"): "ok"}
    assert gate.exit_code(rows, []) == 1


def test_regression_table_names_the_entry(gate):
    measured = {"avx2": {"matvec": 1000, "few": 1100, "attn": 1000, "gone": 500},
                "generic": {"matvec": 20000}}
    rows = gate.compare(BASE, measured, 7.0)
    text = gate.render(rows, 7.0)
    line = next(l for l in text.splitlines() if l.strip().startswith("few"))
    assert "1,000" in line and "1,100" in line and "+10.00%" in line and "REGRESSED" in line
    assert "FAIL: 1 entry more than 7% above the baseline: avx2 / few +10.0%" in text
    assert "PASS" not in text
    assert gate.exit_code(rows, []) == 1


def test_unchanged_passes(gate):
    rows = gate.compare(BASE, BASE, 7.0)
    assert {r.status for r in rows} == {"ok"}
    text = gate.render(rows, 7.0)
    assert text.splitlines()[-1].startswith("PASS") and "(5 compared)" in text
    assert gate.exit_code(rows, []) == 0


def test_improvement_and_new_entries_do_not_fail(gate):
    measured = {"avx2": {"matvec": 500, "few": 1000, "attn": 1000, "gone": 500, "extra": 1},
                "generic": {"matvec": 20000}}
    rows = gate.compare(BASE, measured, 7.0)
    text = gate.render(rows, 7.0)
    assert gate.exit_code(rows, []) == 0
    assert "-50.00%" in text and "consider re-recording" in text
    assert "without a baseline" in text and "avx2 / extra" in text


def test_missing_entry_fails_and_says_how_to_fix(gate):
    measured = {"avx2": {"matvec": 1000, "few": 1000, "attn": 1000}}
    rows = gate.compare(BASE, measured, 7.0)
    text = gate.render(rows, 7.0)
    assert gate.exit_code(rows, []) == 1
    assert "not measured any more: avx2 / gone" in text and "--record" in text
    # only measured variants are compared: generic was not asked for
    assert all(r.variant == "avx2" for r in rows)


def test_a_variant_that_cannot_run_does_not_pass(gate):
    rows = gate.compare(BASE, {"generic": {"matvec": 20000}}, 7.0)
    assert gate.exit_code(rows, []) == 0
    assert gate.exit_code(rows, ["avx2"]) == 2
    text = gate.render(rows, 7.0, ["avx2"])
    assert "PASS" not in text and "FAIL: variant avx2 could not be measured" in text


def test_parse_dumps(gate, tmp_path):
    # callgrind writes one file per CALLGRIND_DUMP_STATS_AT, prefix.N; the final dump at
    # exit (no client request) is ignored
    for i, (name, ir) in enumerate([("q8_0 matvec 1x1024x1024", 550464), ("attention", 42)], 1):
        (tmp_path / f"callgrind.avx2.{i}").write_text(
            f"version: 1\ncreator: callgrind-3.19.0\ncmd: driver avx2\npart: {i}\n"
            f"desc: I1 cache:\ndesc: Timerange: Basic block 0 - 10\n"
            f"desc: Trigger: Client Request: {name}\n\npositions: line\nevents: Ir\n"
            f"summary: {ir}\n\nfl=(1) x.c\nfn=(1) f\n0 {ir}\n\ntotals: {ir}\n")
    (tmp_path / "callgrind.avx2").write_text(
        "desc: Trigger: Program termination\nevents: Ir\nsummary: 0\ntotals: 0\n")
    (tmp_path / "callgrind.generic.1").write_text(
        "desc: Trigger: Client Request: other\nsummary: 5\ntotals: 5\n")
    assert gate.parse_dumps(str(tmp_path), "callgrind.avx2") == {
        "q8_0 matvec 1x1024x1024": 550464, "attention": 42}


def test_driver_shapes_come_from_the_fixtures(gate):
    args = gate.driver_args()
    assert len(args) == 22 and args[-1] == "llfl"  # + the variant: the driver's argc 24
    assert all(a.isdigit() for a in args[:-1])


def test_committed_baseline_is_complete(gate):
    base = json.loads((GATE_DIR / "baseline.json").read_text())
    assert base["threshold_pct"] == gate.THRESHOLD_PCT
    assert set(base["variants"]) == set(gate.VARIANTS)
    for key in ("valgrind", "compiler", "libc", "cpu_seen", "cflags_core", "cflags_q4"):
        assert base[key]
    for v in base["variants"].values():
        assert v["counts"] and all(isinstance(n, int) and n > 0 for n in v["counts"].values())
