"""Bad checkpoints and bad config reach the user as one clear line and exit code 2."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, fixture_with_tokenizer
from lattice_engine.cli import main
from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(capsys, argv, *fragments):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("lattice: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_path(capsys, tmp_path):
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "nope")],
                          "does not exist")


def test_truncated_safetensors(capsys, tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)], "is truncated",
                          "re-download")


def test_garbage_safetensors_header(capsys, tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)],
                          "does not fit in the file")


def test_wrong_tensor_shape(capsys, tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)],
                          "'model.layers.1.mlp.up_proj.weight'", "(95, 64)", "(96, 64)")


def test_missing_tensor(tmp_path):
    folder = fixture_with_tokenizer("qwen2", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.0.self_attn.k_proj.bias'"):
        load(folder, backend="numpy")


def test_a_failed_load_leaves_the_garbage_collector_as_it_was(tmp_path):
    """loading.load pauses the collector while it runs; a load that raises must restore it
    (and leave it off when the caller had turned it off)."""
    import gc

    folder = fixture_with_tokenizer("qwen2", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with pytest.raises(CheckpointError):
                load(folder, backend="numpy")
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_unknown_model_type(capsys, tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba9"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)],
                          "model_type 'mamba9' is not supported; supported: ", "llama, qwen2, qwen3")


def test_malformed_config_json(capsys, tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    (folder / "config.json").write_text("{oops")
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)], "not valid JSON")


def test_pickle_checkpoint_is_refused(capsys, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(FIXTURES / "llama" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder)],
                          "never loads pickle")
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(folder / "pytorch_model.bin")],
                          "never loads pickle")


def test_malformed_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    assert_one_line_error(capsys, ["generate", "hi", "--config", str(bad)], "not valid TOML")


def test_unknown_config_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling]\ntemprature = 0.5\n")
    assert_one_line_error(capsys, ["generate", "hi", "--config", str(bad)],
                          "unknown key sampling.temprature", "temperature")


def test_unknown_quant_method_on_cli(capsys, tiny_model_dir):
    # a name no plugin provides (q4_asym would be valid wherever lattice-quant-q4 is installed)
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir), "--quant",
                                   "q3_frob"], "'q3_frob'", "f16, f32")


def test_out_of_range_sampling_on_cli(capsys, tiny_model_dir):
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir),
                                   "--top-p", "0"], "top_p=0.0 is out of range")


def test_cli_closed_pipe_is_quiet():
    """`lattice plugins --all | head -1`: the reader is gone before lattice writes; the
    command ends with 141 (SIGPIPE's shell code) and no traceback on stderr."""
    import os
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "lattice_engine.cli", "plugins", "--all"],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr
