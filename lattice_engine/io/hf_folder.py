"""Reading a Hugging Face model folder: config, safetensors (single or sharded), tokenizer.

Pickle checkpoints (.bin, .pt, .pth, .ckpt) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .safetensors_reader import open_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path} is missing; an HF model folder needs config.json")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; the index is corrupt")
        bad = [v for v in weight_map.values()
               if not isinstance(v, str) or v in ("", ".", "..") or "/" in v or "\\" in v]
        if bad:
            raise CheckpointError(f"{index}: weight_map names shard {repr(bad[0])[:80]}; each "
                                  f"value must be a file name in the folder; the index is "
                                  f"corrupt")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [repr(f.name)[:80] for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {', '.join(missing[:8])} named in "
                                  f"{index.name} are missing; download all shards")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lattice never loads "
            f"pickle (it can run arbitrary code). Convert them to safetensors first, e.g. "
            f"with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no *.safetensors weights")


def load_hf_folder(folder: Path) -> Checkpoint:
    folder = Path(folder)
    config = read_json(folder / "config.json", required=True)
    tensors, shapes = {}, {}
    for file in safetensors_files(folder):
        loaders, file_shapes = open_safetensors(file)
        tensors.update(loaders)
        shapes.update(file_shapes)
    if "quantization" in config:  # written by `lattice quantize`
        from .quantized import wrap_packed
        wrap_packed(config["quantization"], tensors, shapes, folder)
    tokenizer = None
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.exists():
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{tokenizer_file} cannot be read: {exc}") from exc
    return Checkpoint(
        config=config, tensors=tensors, shapes=shapes, tokenizer=tokenizer,
        tokenizer_config=read_json(folder / "tokenizer_config.json"),
        generation_config=read_json(folder / "generation_config.json"),
        source=str(folder))
