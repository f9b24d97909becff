"""`lattice quantize`: load a model with a quant method and write it as a quantized
checkpoint (see `lattice_engine.io.quantized`) that loads again without re-quantizing."""

from __future__ import annotations

from pathlib import Path

from .models.base import WeightLoader
from .quant.methods import QuantSpec


class RecordingLoader(WeightLoader):
    """A WeightLoader that remembers every tensor it handed out, by HF name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.matrices: dict = {}
        self.vectors: dict = {}

    def matrix(self, name, shape, role):
        m = super().matrix(name, shape, role)
        self.matrices[name] = m
        return m

    def vector(self, name, shape):
        v = super().vector(name, shape)
        self.vectors[name] = v
        return v


def quantize_checkpoint(source: str, out: str | Path, quant: QuantSpec,
                        plugin_manager=None) -> dict:
    """Quantize `source` (path or catalog name) with `quant` and write it to `out`.

    Returns a summary: method, group size, bytes of weights, formats used.
    """
    from . import loading
    from .io.quantized import save_quantized

    loaded = loading.load(source, quant=quant, backend="numpy",
                          plugin_manager=plugin_manager, loader_class=RecordingLoader)
    loader: RecordingLoader = loaded.loader
    ckpt = loaded.checkpoint
    config = {k: v for k, v in ckpt.config.items() if k != "quantization"}
    save_quantized(Path(out), config, loader.matrices, loader.vectors, loaded.quant,
                   getattr(loader.method, "group_size", None), tokenizer=ckpt.tokenizer,
                   tokenizer_config=ckpt.tokenizer_config,
                   generation_config=ckpt.generation_config)
    counts: dict[str, int] = {}
    for m in loader.matrices.values():
        counts[m.format.name] = counts.get(m.format.name, 0) + 1
    return {"out": str(out), "method": loaded.quant,
            "group_size": getattr(loader.method, "group_size", None),
            "matrix_bytes": sum(m.nbytes for m in loader.matrices.values()),
            "formats": counts}
