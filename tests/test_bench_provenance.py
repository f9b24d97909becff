"""bench/provenance.py: what every bench row carries, and the results files the benches write."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# loaded by path: putting bench/ on sys.path would let its decode.py, serve.py, ... shadow
# other modules for the rest of the session
_spec = importlib.util.spec_from_file_location("bench_provenance", BENCH / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

CPUINFO = """processor\t: 0
model name\t: Example CPU @ 2.0GHz
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512_vnni amx_tile
processor\t: 1
model name\t: Example CPU @ 2.0GHz
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512_vnni amx_tile
"""


def test_cpu_info_keeps_the_kernel_flags_in_a_fixed_order():
    info = provenance.cpu_info(CPUINFO)
    assert info == {"cpu": "Example CPU @ 2.0GHz",
                    "cpu_flags": ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile"]}


def test_environment_keeps_kernel_knobs_and_drops_secrets_and_paths():
    env = {"LATTICE_R16": "0", "LATTICE_Q8": "avx2", "OPENBLAS_CORETYPE": "Haswell",
           "LATTICE_API_KEY": "s3cret", "LATTICE_HF_TOKEN": "t", "LATTICE_HOME": "/somewhere",
           "PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}
    assert provenance.environment(env) == {"LATTICE_Q8": "avx2", "LATTICE_R16": "0",
                                           "OMP_NUM_THREADS": "2",
                                           "OPENBLAS_CORETYPE": "Haswell"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_names_the_checked_out_commit(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    state = provenance.git_state()
    assert state["commit"] == head.stdout.strip()
    assert isinstance(state["dirty"], bool)
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_provenance_has_every_field_a_figure_is_traced_by():
    p = provenance.provenance(threads=3)
    for key in ("commit", "dirty", "date", "cpu", "cpu_flags", "kernels", "q8_0_r16",
                "threads", "env", "versions", "argv", "peak_rss_mb", "children_peak_rss_mb"):
        assert key in p
    assert p["threads"] == 3
    assert p["peak_rss_mb"] > 1
    assert p["date"].endswith("+00:00")
    assert p["versions"]["lattice-engine"]
    json.dumps(p)  # a row must stay JSON


def test_peak_rss_of_a_running_child_and_of_finished_children():
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (64 << 20); "
                              "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        running = provenance.peak_rss_mb(child.pid)
    finally:
        child.communicate("")
    if running is not None:  # Linux
        assert running >= 64
    assert provenance.children_peak_rss_mb() >= 64
    assert provenance.peak_rss_mb(2 ** 22 + 12345) is None  # no such process


def test_append_jsonl_keeps_old_lines_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}')  # a last line without its newline
    provenance.append_jsonl(path, {"b": 2})
    provenance.append_jsonl(path, {"c": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [{"a": 1}, {"b": 2}, {"c": 3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_emit_prints_and_appends_the_row_with_provenance(tmp_path, capsys):
    row = provenance.emit({"x": 1}, tmp_path / "out.jsonl", threads=2)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "out.jsonl").read_text())
    assert printed == written == row
    assert row["x"] == 1 and row["provenance"]["threads"] == 2


def test_a_bench_writes_its_row_with_provenance(tmp_path):
    from lattice_engine import kernels
    if not kernels.available():
        pytest.skip("native kernels not built")
    out = tmp_path / "few_rows.jsonl"
    res = subprocess.run([sys.executable, str(BENCH / "few_rows.py"), "--threads", "1",
                          "--formats", "q8_0", "--m", "1", "--repeats", "1", "--inner", "1",
                          "--results", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())
    assert row == json.loads(res.stdout.strip().splitlines()[-1])
    assert row["provenance"]["kernels"] == kernels.variant()
    assert row["provenance"]["argv"][0] == "bench/few_rows.py"


def test_quant_quality_defaults_to_the_committed_results_files():
    # in a child process: importing quant_quality puts bench/ on sys.path
    code = ("import json, quant_quality as q; print(json.dumps([str(q.ppl_results(32768)), "
            "str(q.ppl_results(4000)), str(q.SPEED_RESULTS)]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=BENCH)
    assert res.returncode == 0, res.stderr
    ppl_32k, ppl_4000, speed = map(Path, json.loads(res.stdout))
    assert ppl_32k == BENCH / "results" / "quant_quality_32k.jsonl" and ppl_32k.exists()
    assert speed == BENCH / "results" / "quant_speed.jsonl" and speed.exists()
    assert ppl_4000.name == "quant_quality_4000t.jsonl"


def test_quant_quality_table_reads_the_committed_rows():
    res = subprocess.run([sys.executable, str(BENCH / "quant_quality.py"), "table"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    committed = [json.loads(line) for line in
                 (BENCH / "results" / "quant_quality_32k.jsonl").read_text().splitlines()]
    table_rows = [line for line in res.stdout.splitlines()
                  if line.startswith("| ") and not line.startswith("| model")]
    assert len(table_rows) == sum(r["kind"] == "ppl" for r in committed) > 0


def test_peak_rss_bench_measures_each_lattice_run_in_its_own_process(tmp_path):
    from conftest import fixture_with_tokenizer
    folder = fixture_with_tokenizer("llama", tmp_path)
    out = tmp_path / "rss.jsonl"
    res = subprocess.run([sys.executable, str(BENCH / "peak_rss.py"), "--model", str(folder),
                          "--quant", "f32", "--threads", "1", "--ppl-tokens", "64",
                          "--skip", "llama.cpp", "--results", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())
    for kind in ("generate", "ppl"):
        run = row["runs"][kind]["lattice"]
        assert "error" not in run, run
        assert 20 < run["peak_rss_mb"] < row["provenance"]["children_peak_rss_mb"] + 1
    assert row["runs"]["ppl"]["lattice"]["output"].startswith("{")  # lattice ppl's JSON
