"""The repository stands on its own: no source names a path of the machine it was written on,
files it promises exist, and committed figures name the script that made them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # a dependency below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("lattice_engine", "plugins", "scripts", "bench")
# home folders and this machine's shared tree, absolute or relative to a sibling checkout
MACHINE_PATH = re.compile(r"/work/|/root/|/home/|/Users/|\.\./shared\b")


def tracked(*folders: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *folders], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.splitlines()]


def test_no_source_names_a_path_outside_the_repository():
    hits = []
    for path in tracked(*PRODUCT):
        # result rows record where a run read its model; they are data, not code that runs
        if path.suffix == ".jsonl" or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                 .splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "paths a user's machine would not have:\n" + "\n".join(hits)


def test_the_qwen3_5_config_is_in_the_repository():
    config = json.loads((ROOT / "data" / "configs" / "qwen3_5-0.8b.config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    script = (ROOT / "scripts" / "make_qwen3_5_checkpoint.py").read_text()
    assert '"data" / "configs" / "qwen3_5-0.8b.config.json"' in script


def test_package_data_files_exist():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, files in pyproject["tool"]["setuptools"]["package-data"].items():
        for name in files:
            assert (ROOT / package / name).exists(), f"pyproject ships {package}/{name}"


def test_real_model_figures_name_the_script_that_writes_them():
    fixture = json.loads((ROOT / "tests" / "fixtures" / "real_models.json").read_text())
    for name, entry in fixture.items():
        how = entry["wikitext2_ppl"]["how"]
        script = how.split()[1]
        assert how.startswith("python ") and (ROOT / script).is_file(), (name, how)
        assert "real_models.json" in (ROOT / script).read_text(), script
