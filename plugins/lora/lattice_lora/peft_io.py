"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

Reading checks the files against the base model before anything is resident: each
`lora_A` / `lora_B` pair must name a linear module the model has, with A [r, in] and
B [out, r] for that module's [out, in] and the rank the config gives it (`r`,
`rank_pattern`); the scale is lora_alpha / r (`alpha_pattern`), or lora_alpha / sqrt(r)
with `use_rslora`. What PEFT can express but this engine does not apply (DoRA, trained
biases, `modules_to_save`, embedding / lm_head adapters, fan_in_fan_out) is refused with
the config key and the fix. Every refusal is a `RequestError` naming the module, shape or
key, and what would fit.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lattice_engine.adapters import AdapterWeights, LowRank, named_linears
from lattice_engine.errors import CheckpointError, RequestError
from lattice_engine.io.safetensors_reader import open_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B)"
                  r"(?:\.(?P<adapter>[^.]+))?\.weight$")


def pattern_key(patterns, module: str) -> Optional[str]:
    """The `rank_pattern` / `alpha_pattern` key that applies to `module`, as PEFT matches
    them (the key is a regex for the module name's tail after a dot), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _targets(target_modules, module: str) -> bool:
    """Whether PEFT's `target_modules` (a list of name tails, a regex string, or
    "all-linear") selects `module`."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _suffixes(names) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RequestError(f"{folder} has no {CONFIG_FILE}; a PEFT LoRA adapter folder holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise RequestError(f"{path} must hold a JSON object")
    return cfg


def check_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse what PEFT can express but this engine does not apply."""
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise RequestError(f"{where}: peft_type = {cfg.get('peft_type')!r}; only LORA adapters "
                           f"load here")
    refusals = [
        ("modules_to_save", bool(cfg.get("modules_to_save")),
         "fully trained copies of whole modules are not supported; retrain without "
         "modules_to_save (or merge the adapter into the base model with PEFT)"),
        ("use_dora", bool(cfg.get("use_dora")), "DoRA is not supported; use a plain LoRA"),
        ("bias", cfg.get("bias", "none") not in (None, "none"),
         "trained biases are not supported; use bias = \"none\""),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out")),
         "transposed (Conv1D) targets do not exist in these models; use false"),
        ("trainable_token_indices", bool(cfg.get("trainable_token_indices")),
         "trainable embedding rows are not supported"),
        ("lora_bias", bool(cfg.get("lora_bias")), "a bias on lora_B is not supported; use false"),
        ("target_parameters", bool(cfg.get("target_parameters")),
         "LoRA on bare parameters (MoE experts) is not supported; target linear modules"),
        ("layer_replication", bool(cfg.get("layer_replication")),
         "replicated layers are not supported"),
    ]
    for key, bad, fix in refusals:
        if bad:
            raise RequestError(f"{where}: {key} = {cfg.get(key)!r}: {fix}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise RequestError(f"{where}: {key} = {v!r} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise RequestError(f"{where}: {key} must be an object of module pattern -> number")


def load_peft(path, model, name: Optional[str] = None) -> AdapterWeights:
    """A PEFT LoRA adapter folder as `AdapterWeights` for `model`, checked against it."""
    folder = Path(path)
    if not folder.is_dir():
        raise RequestError(f"adapter path {folder} is not a folder; give the folder that "
                           f"holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = read_config(folder)
    check_config(cfg, str(folder / CONFIG_FILE))
    label = name or folder.name
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded: re-save with " \
                "safe_serialization=True)" if (folder / "adapter_model.bin").exists() else ""
        raise RequestError(f"{folder} has no {WEIGHTS_FILE}{extra}")
    try:
        loaders, shapes = open_safetensors(wpath)
    except (CheckpointError, OSError, ValueError) as exc:
        raise RequestError(f"cannot read adapter weights: {exc}") from exc
    linears = named_linears(model)
    base = cfg.get("base_model_name_or_path") or "(not recorded)"
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = _KEY.match(key)
        if m is None:
            hint = (" (an embedding / lm_head adapter or a modules_to_save copy: not "
                    "supported)" if "lora_embedding" in key or "modules_to_save" in key
                    else "")
            raise RequestError(f"{wpath}: tensor {key!r} is not a LoRA factor "
                               f"(<module>.lora_A.weight / lora_B.weight){hint}")
        pairs.setdefault(m["module"], {})[m["which"]] = key
    if not pairs:
        raise RequestError(f"{wpath} holds no LoRA factors")
    unknown = sorted(set(pairs) - set(linears))
    if unknown:
        raise RequestError(
            f"adapter {label!r} (for base model {base}) targets module {unknown[0]!r}"
            f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}, which "
            f"{type(model).__name__} does not have; its linear modules are "
            f"{_suffixes(linears)} under {_common_prefix(linears)}: load the adapter on the "
            f"base model it was trained for")
    target = cfg.get("target_modules")
    if target:
        names = [target] if isinstance(target, str) and target != "all-linear" and \
            not any(c in target for c in ".*[(|\\") else target
        if isinstance(names, list):
            missing = [t for t in names if not any(_targets([t], n) for n in linears)]
            if missing:
                raise RequestError(
                    f"{folder / CONFIG_FILE}: target_modules names {missing}, which "
                    f"{type(model).__name__} does not have; its linear modules are "
                    f"{_suffixes(linears)}")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[str, LowRank] = {}
    for module, keys in sorted(pairs.items()):
        if set(keys) != {"lora_A", "lora_B"}:
            have = next(iter(keys))
            raise RequestError(f"{wpath}: module {module!r} has {have} but not "
                               f"{'lora_B' if have == 'lora_A' else 'lora_A'}; the file is "
                               f"incomplete")
        rk = pattern_key(rank_pattern, module)
        ak = pattern_key(alpha_pattern, module)
        r = rank_pattern[rk] if rk is not None else r0
        alpha = alpha_pattern[ak] if ak is not None else alpha0
        out_f, in_f = linears[module].weight.rows, linears[module].weight.cols
        a_shape, b_shape = shapes[keys["lora_A"]], shapes[keys["lora_B"]]
        if a_shape != (r, in_f) or b_shape != (out_f, r):
            raise RequestError(
                f"adapter {label!r} (for base model {base}): module {module!r} has "
                f"lora_A {a_shape} and lora_B {b_shape}, but this model's {module} is "
                f"[{out_f}, {in_f}] and the config gives it rank {r}"
                f"{f' (rank_pattern {rk!r})' if rk is not None else ''}, so they must be "
                f"({r}, {in_f}) and ({out_f}, {r}); load the adapter on the base model it "
                f"was trained for")
        try:
            a = np.asarray(loaders[keys["lora_A"]](), dtype=np.float32)
            b = np.asarray(loaders[keys["lora_B"]](), dtype=np.float32)
        except (ValueError, OSError) as exc:
            raise RequestError(f"cannot read {module} from {wpath}: {exc}") from exc
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise RequestError(f"{wpath}: module {module!r} has non-finite factors")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = LowRank(a, b, scale)
    meta = {"config": cfg}
    return AdapterWeights(name or folder.name, modules, "lora", meta)


def _common_prefix(names) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return ".".join(common) or "(root)"


def _peft_config(weights: AdapterWeights) -> dict[str, Any]:
    """An adapter_config.json that reproduces `weights` in PEFT: the saved factors carry the
    update at lora_alpha = r (scale 1 folded into B when the scale differs per module)."""
    ranks = {m: lr.rank for m, lr in weights.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    base = dict(weights.meta.get("config") or {})
    cfg = {
        "peft_type": "LORA", "task_type": base.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base.get("base_model_name_or_path"),
        "r": r, "lora_alpha": r, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights.modules}),
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "inference_mode": True,
    }
    return cfg


def save_peft_safetensors(weights: AdapterWeights, path) -> Path:
    """Write `weights` as a PEFT LoRA adapter folder (adapter_config.json and
    adapter_model.safetensors) that `PeftModel.from_pretrained` loads to the same update.
    Each file is written to a temporary name in the folder and renamed into place."""
    from safetensors.numpy import save_file
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lr in weights.modules.items():
        # the update is scale * B @ A; stored with alpha = r (PEFT scale 1)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(lr.a, np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
            lr.b * np.float32(lr.scale), np.float32)
    cfg = _peft_config(weights)
    _atomic(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p),
                                                       metadata={"format": "pt"}))
    _atomic(folder / CONFIG_FILE,
            lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8"))
    return folder


def _atomic(dest: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class LoraKind:
    """The "lora" adapter kind (`register_adapters`): PEFT folders in and out."""

    name = "lora"

    def load(self, path, model, name: Optional[str] = None) -> AdapterWeights:
        return load_peft(path, model, name)

    def save(self, weights: AdapterWeights, path) -> None:
        save_peft_safetensors(weights, path)

    def train_step(self, model, weights: AdapterWeights, tokens, options: dict, state):
        """One `adapt_step` with OptimizerSettings(**options)."""
        from .train import OptimizerSettings, adapt_step
        unknown = sorted(set(options) - set(OptimizerSettings.__dataclass_fields__))
        if unknown:
            raise RequestError(f"unknown optimizer option(s) {', '.join(unknown)}; known: "
                               f"{', '.join(OptimizerSettings.__dataclass_fields__)}")
        if "betas" in options and isinstance(options["betas"], list):
            options = dict(options, betas=tuple(options["betas"]))
        try:
            settings = OptimizerSettings(**options)
        except TypeError as exc:
            raise RequestError(f"bad optimizer options: {exc}") from None
        r = adapt_step(model, weights, tokens, settings, state)
        return r.weights, r.loss, r.grad_norm, r.state


LORA = LoraKind()
