"""Performance regression gate: callgrind instruction counts of a fixed set of kernel calls,
compared with the baseline committed next to this file.

    python bench/perf_gate/gate.py              # measure, compare, exit 1 on a regression
    python bench/perf_gate/gate.py --record     # re-record baseline.json (say why in the commit)

What is measured: driver.c, built here from native/src/*.c and the quant_q4 plugin's
q4_kernels.c with the compiler command and flags the Python modules are built with (so the
gate always measures the working tree, installed or not), runs each entry (q8_0 / f16 /
q4_sym_g32 matvec and 4-row matmul, decode attention, the gated delta rule's recurrent step
and a chunked prefill chunk, one fused decode step of the llama and Qwen3.5 test
fixtures' shapes, the MoE MLP's expert dispatch over 1 and 8 rows, and the encoders'
float32 panel matmul and packed attention) once to warm up and once between callgrind client requests, single
threaded. Instruction counts (Ir) do not depend on what else the machine runs, so the
threshold can be tight: an entry more than 7% above its baseline fails the gate.

Variants are forced, never detected: `avx2` (the AVX2 kernels of the core, the q8_0 avx2
kernel and quant_q4's avx2 kernels) and `generic` (scalar C). The AVX-VNNI and AVX-512
kernels are not measured: valgrind 3.19 cannot execute those instructions (and its
emulated CPU does not report them), so counts come from the same code on every x86-64 CI
machine whatever its own CPU. A variant that cannot run (a CPU without AVX2) is reported
as NOT MEASURED and the gate exits 2 rather than passing.

Exit codes: 0 pass, 1 regression or baseline entry missing, 2 the gate could not measure
(build, valgrind, a variant that cannot run, no baseline).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASELINE = os.path.join(HERE, "baseline.json")
DRIVER = os.path.join(HERE, "driver.c")
THRESHOLD_PCT = 7.0
VARIANTS = ("avx2", "generic")
# not measurable under valgrind 3.19 (no AVX-VNNI / AVX-512 decoding): named in the output
UNMEASURED = ("q8_0 avxvnni / avx512vnni, f16/f32 512-bit few-rows and prefill, "
              "q4 avxvnni / avx512vnni")
LLAMA_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "llama")
QWEN35_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "qwen3_5_text")


# ---- comparison (pure: tests/test_perf_gate.py drives it with synthetic numbers) ---------

@dataclass
class Row:
    variant: str
    name: str
    baseline: int | None
    measured: int | None
    status: str  # ok, REGRESSED, improved, NEW, MISSING

    @property
    def change_pct(self) -> float | None:
        if not self.baseline or self.measured is None:
            return None
        return 100.0 * (self.measured - self.baseline) / self.baseline


def compare(baseline: dict[str, dict[str, int]], measured: dict[str, dict[str, int]],
            threshold_pct: float = THRESHOLD_PCT) -> list[Row]:
    """Rows for every (variant, entry) of the measured variants: baseline[variant][name]
    and measured[variant][name] are instruction counts. An entry more than threshold_pct
    above its baseline is REGRESSED, more than threshold_pct below it `improved`; an entry
    only measured is NEW, one only in the baseline MISSING."""
    rows = []
    for variant in measured:
        base, got = baseline.get(variant, {}), measured[variant]
        for name in list(base) + [n for n in got if n not in base]:
            b, m = base.get(name), got.get(name)
            if b is None:
                status = "NEW"
            elif m is None:
                status = "MISSING"
            elif m > b * (1 + threshold_pct / 100):
                status = "REGRESSED"
            elif m < b * (1 - threshold_pct / 100):
                status = "improved"
            else:
                status = "ok"
            rows.append(Row(variant, name, b, m, status))
    return rows


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def render(rows: list[Row], threshold_pct: float = THRESHOLD_PCT,
           unavailable: list[str] = ()) -> str:
    """The table, one block per variant, and the summary."""
    width = max([len(r.name) for r in rows] + [5])
    lines = []
    for variant in dict.fromkeys(r.variant for r in rows):
        lines.append(f"variant {variant}:")
        lines.append(f"  {'entry':<{width}}  {'baseline Ir':>14}  {'measured Ir':>14}  "
                     f"{'change':>8}  status")
        for r in rows:
            if r.variant != variant:
                continue
            pct = r.change_pct
            change = "-" if pct is None else f"{pct:+.2f}%"
            lines.append(f"  {r.name:<{width}}  {_n(r.baseline):>14}  {_n(r.measured):>14}  "
                         f"{change:>8}  {r.status}")
    lines.append(summary(rows, threshold_pct, unavailable))
    return "\n".join(lines)


def summary(rows: list[Row], threshold_pct: float = THRESHOLD_PCT,
            unavailable: list[str] = ()) -> str:
    bad = [r for r in rows if r.status == "REGRESSED"]
    missing = [r for r in rows if r.status == "MISSING"]
    new = [r for r in rows if r.status == "NEW"]
    better = [r for r in rows if r.status == "improved"]
    out = []
    if bad:
        out.append(f"FAIL: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} more than "
                   f"{threshold_pct:g}% above the baseline: " +
                   "; ".join(f"{r.variant} / {r.name} {r.change_pct:+.1f}%" for r in bad))
    if missing:
        out.append(f"FAIL: {len(missing)} baseline entr{'y' if len(missing) == 1 else 'ies'} "
                   f"not measured any more: " + "; ".join(f"{r.variant} / {r.name}"
                                                          for r in missing) +
                   " (if intended, re-record the baseline with --record)")
    if new:
        out.append(f"note: {len(new)} entr{'y' if len(new) == 1 else 'ies'} without a baseline "
                   f"(not gated until the baseline is re-recorded with --record): " +
                   "; ".join(f"{r.variant} / {r.name}" for r in new))
    if better:
        out.append(f"note: {len(better)} entr{'y' if len(better) == 1 else 'ies'} more than "
                   f"{threshold_pct:g}% below the baseline: consider re-recording it "
                   f"(--record) so later regressions are measured from there")
    for v in unavailable:
        out.append(f"FAIL: variant {v} could not be measured on this machine (its CPU, as "
                   f"valgrind presents it, cannot run it); the gate does not pass without "
                   f"it (--variants chooses the variants)")
    if not bad and not missing and not unavailable:
        out.insert(0, f"PASS: no entry more than {threshold_pct:g}% above the baseline "
                      f"({sum(r.status in ('ok', 'improved') for r in rows)} compared)")
    return "\n".join(out)


def exit_code(rows: list[Row], unavailable: list[str]) -> int:
    if unavailable:
        return 2
    return 1 if any(r.status in ("REGRESSED", "MISSING") for r in rows) else 0


# ---- build -------------------------------------------------------------------------

def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extra_args(builder_path: str, name: str, fallback: list[str]) -> list[str]:
    """The extra_compile_args a cffi builder script gives its sources."""
    try:
        ffi = _load(builder_path, name).make_builder(relative=False)
        return list(ffi._assigned_source[3]["extra_compile_args"])
    except Exception as exc:  # pragma: no cover - cffi internals moved
        print(f"perf gate: could not read the flags of {os.path.relpath(builder_path, ROOT)} "
              f"({exc!r}); using {' '.join(fallback)}", file=sys.stderr)
        return fallback


def compile_command() -> list[str]:
    """The compiler and flags setuptools compiles extension sources with (as for
    lattice_engine._native and lattice_quant_q4._q4_native)."""
    try:
        from setuptools._distutils import ccompiler, sysconfig as dsc
    except ImportError:  # pragma: no cover
        from distutils import ccompiler, sysconfig as dsc
    cc = ccompiler.new_compiler()
    dsc.customize_compiler(cc)
    return list(cc.compiler_so)


def build(outdir: str) -> tuple[str, dict]:
    """Compile the driver and the kernels into outdir/driver; returns its path and the
    build description recorded with the baseline."""
    cc = compile_command()
    core_args = _extra_args(os.path.join(ROOT, "native", "build_native.py"), "_pg_build_native",
                            ["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function"])
    q4_args = _extra_args(os.path.join(ROOT, "plugins", "quant_q4", "build_q4.py"),
                          "_pg_build_q4", ["-O3", "-std=gnu11", "-Wall"])
    sources_mod = _load(os.path.join(ROOT, "native", "build_native.py"), "_pg_build_native")
    # the plugin sees only the public ABI header (lattice_engine/include), as when it is built
    plugin_include = ["-I", os.path.join(ROOT, "lattice_engine", "include")]
    include = ["-I", os.path.join(ROOT, "native", "include")] + plugin_include
    jobs = [(os.path.join(ROOT, "native", "src", s), core_args + include)
            for s in sources_mod.SOURCES]
    jobs.append((os.path.join(ROOT, "plugins", "quant_q4", "native", "q4_kernels.c"),
                 q4_args + plugin_include))
    jobs.append((DRIVER, core_args + include))

    def one(job):
        src, args = job
        obj = os.path.join(outdir, os.path.basename(src)[:-2] + ".o")
        r = subprocess.run(cc + args + ["-c", src, "-o", obj], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {os.path.relpath(src, ROOT)} failed:\n{r.stderr}")
        return obj

    # the q8_0 kernel files (one per variant) are the long poles: start them first
    jobs.sort(key=lambda j: not os.path.basename(j[0]).startswith("matmul_q8_0"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, cores or 1))) as ex:
        objs = list(ex.map(one, jobs))
    exe = os.path.join(outdir, "driver")
    r = subprocess.run([cc[0]] + objs + ["-o", exe, "-lm", "-lpthread"], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"linking the driver failed:\n{r.stderr}")
    info = {"compiler": _first_line([cc[0], "--version"]),
            "cflags_core": " ".join(cc[1:] + core_args), "cflags_q4": " ".join(cc[1:] + q4_args)}
    return exe, info


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return "unknown"


# ---- measure -------------------------------------------------------------------------

def driver_args() -> list[str]:
    """The fused steps' shapes, from the tiny test checkpoints' configs."""
    with open(os.path.join(LLAMA_FIXTURE, "config.json")) as f:
        lc = json.load(f)
    with open(os.path.join(QWEN35_FIXTURE, "config.json")) as f:
        qc = json.load(f)
    l_hd = lc.get("head_dim") or lc["hidden_size"] // lc["num_attention_heads"]
    q_hd = qc["head_dim"]
    rope = qc.get("rope_parameters", {})
    q_half = int(q_hd * rope.get("partial_rotary_factor", qc.get("partial_rotary_factor", 1.0))) // 2
    kinds = "".join("f" if k == "full_attention" else "l" for k in qc["layer_types"])
    return [str(v) for v in (
        lc["vocab_size"], lc["hidden_size"], lc["intermediate_size"], lc["num_hidden_layers"],
        lc["num_attention_heads"], lc["num_key_value_heads"], l_hd, l_hd // 2,
        qc["vocab_size"], qc["hidden_size"], qc["intermediate_size"], qc["num_hidden_layers"],
        qc["num_attention_heads"], qc["num_key_value_heads"], q_hd, q_half,
        qc["linear_num_key_heads"], qc["linear_num_value_heads"], qc["linear_key_head_dim"],
        qc["linear_value_head_dim"], qc["linear_conv_kernel_dim"], kinds)]


def clean_env() -> dict[str, str]:
    """Only PATH: no LATTICE_* / Q4_* tuning, LATTICE_ISA or GLIBC_TUNABLES can change
    the code paths measured."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


_DESC = re.compile(r"^desc: Trigger: Client Request: (.*)$")


def parse_dumps(outdir: str, prefix: str) -> dict[str, int]:
    """{entry name: Ir} from callgrind's dumps prefix.N (one per CALLGRIND_DUMP_STATS_AT)."""
    counts = {}
    dumps = [f for f in os.listdir(outdir) if f.startswith(prefix + ".")]
    for fname in sorted(dumps, key=lambda f: int(f.rsplit(".", 1)[1]) if
                        f.rsplit(".", 1)[1].isdigit() else 0):
        name = total = None
        with open(os.path.join(outdir, fname)) as f:
            for line in f:
                m = _DESC.match(line.rstrip("\n"))
                if m:
                    name = m.group(1)
                elif line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
        if name is not None and total is not None:
            counts[name] = total
    return counts


def measure(exe: str, variant: str, workdir: str) -> tuple[dict[str, int] | None, str]:
    """(counts, driver output) for one variant; counts None if it cannot run here."""
    prefix = f"callgrind.{variant}"
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
           f"--callgrind-out-file={os.path.join(workdir, prefix)}", exe, variant] + driver_args()
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=workdir)
    out = (r.stdout + r.stderr).strip()
    if r.returncode == 3:
        return None, out
    if r.returncode:
        raise RuntimeError(f"the driver ({variant}) failed under valgrind (exit "
                           f"{r.returncode}):\n{out}")
    return parse_dumps(workdir, prefix), out


# ---- main ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true",
                    help="measure and rewrite the baseline (commit it, saying why)")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--threshold", type=float, default=None,
                    help=f"percent above baseline that fails (default: the baseline's, "
                         f"{THRESHOLD_PCT:g})")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        ap.error(f"unknown variant in {args.variants!r}")
    if not shutil.which("valgrind"):
        print("perf gate: valgrind is not installed: cannot measure", file=sys.stderr)
        return 2
    valgrind = _first_line(["valgrind", "--version"])

    baseline = None
    if not args.record:
        try:
            with open(args.baseline) as f:
                baseline = json.load(f)
        except FileNotFoundError:
            print(f"perf gate: no baseline at {args.baseline}; record one with --record",
                  file=sys.stderr)
            return 2
    threshold = args.threshold if args.threshold is not None else \
        (baseline or {}).get("threshold_pct", THRESHOLD_PCT)

    with tempfile.TemporaryDirectory(prefix="perf_gate_") as tmp:
        try:
            exe, info = build(tmp)
        except RuntimeError as exc:
            print(f"perf gate: {exc}", file=sys.stderr)
            return 2
        t_build = time.monotonic() - t0
        measured, unavailable, notes, forced, cpu_seen = {}, [], [], {}, None
        with concurrent.futures.ThreadPoolExecutor(len(variants)) as ex:
            futures = {v: ex.submit(measure, exe, v, tmp) for v in variants}
            for v in variants:
                try:
                    counts, out = futures[v].result()
                except RuntimeError as exc:
                    print(f"perf gate: {exc}", file=sys.stderr)
                    return 2
                cpu = [l[4:] for l in out.splitlines() if l.startswith("cpu ")]
                cpu_seen = cpu_seen or (cpu[0] if cpu else None)
                if counts is None:
                    unavailable.append(v)
                    notes.append(f"variant {v}: NOT MEASURED: {out.splitlines()[-1]}")
                else:
                    measured[v] = counts
                    said = [l for l in out.splitlines() if l.startswith("variant ")]
                    notes += said
                    forced[v] = said[0].split(": ", 1)[-1] if said else v

    print(f"perf gate: callgrind instruction counts (Ir), fail above +{threshold:g}%")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or "libc unknown"
    except (AttributeError, ValueError, OSError):
        libc = "libc unknown"
    info["libc"] = libc
    info["cpu_seen"] = cpu_seen or "unknown"
    print(f"  {valgrind}; {info['compiler']}; {libc}; build {t_build:.0f} s, total "
          f"{time.monotonic() - t0:.0f} s")
    print(f"  CPU as the driver sees it under valgrind: {info['cpu_seen']}")
    for n in notes:
        print(f"  {n}")
    print(f"  not measured (valgrind cannot run them): {UNMEASURED}")

    if args.record:
        if unavailable:
            print(f"perf gate: not recording: variant(s) {', '.join(unavailable)} could not "
                  f"run here", file=sys.stderr)
            return 2
        kept = {}
        if os.path.exists(args.baseline):  # a partial re-record keeps the other variants
            with open(args.baseline) as f:
                kept = {v: d for v, d in json.load(f).get("variants", {}).items()
                        if v not in measured}
            for v in kept:
                print(f"  keeping the baseline's variant {v} (not measured in this run)")
        record = {
            "note": "written by bench/perf_gate/gate.py --record; the commit that changes "
                    "it says why",
            "threshold_pct": threshold,
            "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "valgrind": valgrind, **info,
            "variants": {v: kept[v] if v in kept else {"kernels": forced[v],
                                                        "counts": measured[v]}
                         for v in VARIANTS if v in kept or v in measured},
        }
        tmp_path = args.baseline + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp_path, args.baseline)
        for v, c in measured.items():
            print(f"variant {v}:")
            for name, ir in c.items():
                print(f"  {name:<60} {ir:>14,}")
        print(f"recorded {sum(map(len, measured.values()))} entries to "
              f"{os.path.relpath(args.baseline)}")
        return 0

    for key, now in (("valgrind", valgrind), ("compiler", info["compiler"]),
                     ("libc", info["libc"]), ("cpu_seen", info["cpu_seen"])):
        if baseline.get(key) != now:
            print(f"  WARNING: {key} differs from the baseline's ({baseline.get(key)!r}, "
                  f"now {now!r}): counts may shift for that reason alone")
    for key in ("cflags_core", "cflags_q4"):
        if baseline.get(key) != info[key]:
            print(f"  WARNING: {key} differ from the baseline's ({baseline.get(key)!r}, now "
                  f"{info[key]!r})")
    base_counts = {v: d["counts"] for v, d in baseline.get("variants", {}).items()}
    for v in variants:
        if v not in base_counts and v in measured:
            print(f"  note: the baseline has no variant {v}")
    rows = compare(base_counts, measured, threshold)
    print(render(rows, threshold, unavailable))
    return exit_code(rows, unavailable)


if __name__ == "__main__":
    sys.exit(main())
