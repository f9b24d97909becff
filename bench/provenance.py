"""Where a bench row came from: every bench adds `provenance()` to the row it prints (and
appends to `--results FILE`), so a figure in the README can be traced to the tree, the
machine and the kernels that produced it.

    {"commit": "<sha>", "dirty": false, "date": "2026-11-27T00:15:02+00:00",
     "cpu": "<model name>", "cpu_flags": ["avx2", ...], "kernels": "avx2, q8_0 avx512vnni",
     "q8_0_r16": true, "threads": 2, "env": {"OPENBLAS_CORETYPE": ...},
     "versions": {"lattice-engine": "0.1.0", ...}, "argv": ["bench/NAME.py", ...],
     "peak_rss_mb": 812.4, "children_peak_rss_mb": 1139.0}

Peak RSS is in every row: the bench process's own, and the largest of the worker processes
it has waited for (benches that run each engine in its own process also report each
engine's in their row).

Benches import it as `from provenance import ...` (a script's own folder is on sys.path).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the CPU features the native kernels (or llama.cpp, the peer) choose code paths by, in
# /proc/cpuinfo's spelling
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

# environment variables that change which code runs or how many threads it gets; LATTICE_*
# is taken as a prefix (the native tuning knobs: LATTICE_ISA, LATTICE_Q8, LATTICE_R16, ...)
# minus anything secret, which must not end up in a committed results file
ENV_NAMES = ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# the engines measured side by side; read from the installed metadata, without importing them
DISTRIBUTIONS = ("lattice-engine", "lattice-quant-q4", "lattice-quarot", "lattice-spec-decode",
                 "numpy", "llama_cpp_python", "torch", "transformers")


def git_state(root: Path = ROOT) -> dict:
    """{"commit": full sha, "dirty": tracked files differ from it}; None for both outside a
    git checkout (an unpacked sdist) or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        # untracked files (results being written, local checkpoints) do not change the code
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"cpu": model name, "cpu_flags": the KERNEL_FLAGS it has}. Read from /proc/cpuinfo
    (Linux); elsewhere the model is platform.processor() and the flags are None (unknown,
    not "none")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return {"cpu": platform.processor() or platform.machine() or None,
                    "cpu_flags": None}
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model or platform.processor() or platform.machine() or None,
            "cpu_flags": [f for f in KERNEL_FLAGS if f in flags]}


def kernel_state(threads: int | None = None) -> dict:
    """The native kernel variant, whether q8_0 runs in the q8_0_r16 layout (and the q4
    formats in their _r16 layouts, with lattice-quant-q4), and the thread
    count (`threads` when the bench sets it in its worker processes, else this process's)."""
    from lattice_engine import kernels
    from lattice_engine.quant.core_formats import r16_pays

    try:  # the 4-bit formats' _r16 layout, when the lattice-quant-q4 plugin is installed
        from lattice_quant_q4.kernels import r16_pays as q4_r16_pays
        q4 = {"q4_r16": q4_r16_pays()}
    except ImportError:
        q4 = {}
    if not kernels.available():
        return {"kernels": kernels.variant(), "q8_0_r16": False, "threads": threads, **q4}
    return {"kernels": kernels.variant(), "q8_0_r16": r16_pays(),
            "threads": threads if threads is not None else kernels.threads(), **q4}


def environment(env: dict | None = None) -> dict:
    env = os.environ if env is None else env
    return {k: v for k, v in sorted(env.items())
            if (k in ENV_NAMES or k.startswith("LATTICE_"))
            and not any(w in k.upper() for w in SECRET_WORDS) and k != "LATTICE_HOME"}


def versions() -> dict:
    """Installed versions of DISTRIBUTIONS; the ones not installed are left out."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def peak_rss_mb(pid: int | None = None) -> float | None:
    """Peak resident set size in MB: of the running process `pid` (Linux: VmHWM in
    /proc/PID/status; None when it cannot be read), or of this process (ru_maxrss)."""
    if pid is None:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_script(script: str, argv: list[str], label: str | None = None) -> dict:
    """Run `python script *argv` (a bench's own worker mode, so every engine measures in a
    process of its own) and return the JSON object on its last stdout line, or
    {"error": its last stderr line}. Each result is echoed to stderr as it arrives (prefixed
    by `label`, default the last argument): a long run that is cut short still says something."""
    out = subprocess.run([sys.executable, script] + argv, capture_output=True, text=True,
                         env=dict(os.environ))
    if out.returncode != 0:
        result = {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    else:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"# {argv[-1] if label is None else label}: {json.dumps(result)}", file=sys.stderr,
          flush=True)
    return result


def children_peak_rss_mb() -> float | None:
    """The largest peak RSS (MB) of the child processes this one has waited for; None if
    it has waited for none."""
    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(kb / 1024, 1) if kb else None


def provenance(threads: int | None = None) -> dict:
    """Everything above, plus the UTC date, the command line (script relative to the repo
    when it is inside it, so rows do not carry a machine's paths) and the peak RSS of this
    process and of its largest finished child."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return {**git_state(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **cpu_info(), **kernel_state(threads), "env": environment(),
            "versions": versions(), "argv": ([str(script)] if script else []) + sys.argv[1:],
            "peak_rss_mb": peak_rss_mb(), "children_peak_rss_mb": children_peak_rss_mb()}


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line to `path` atomically: the old lines and the new one are written
    to a temp file in the same folder, then renamed over it, so an interrupted run leaves
    the file as it was instead of a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(old + (json.dumps(row) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def emit(row: dict, results: str | Path | None = None, threads: int | None = None) -> dict:
    """Add `provenance(threads)` to `row`, append it to `results` when given, print it as
    the bench's last line (the JSON object callers parse), and return it."""
    row = {**row, "provenance": provenance(threads)}
    if results:
        append_jsonl(results, row)
    print(json.dumps(row), flush=True)
    return row


def add_results_option(parser, default: str | None = None) -> None:
    parser.add_argument("--results", default=default, metavar="FILE",
                        help="also append the row (with its provenance) to this JSONL file, "
                             "e.g. bench/results/NAME.jsonl")
