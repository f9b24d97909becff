"""The float32 matmuls the encoders opt into (BERT-family embedders, vision towers): their
many-row passes have no decode rows whose bits must match, so they may take kernels that
sum in another order than the float32 kernels, whichever this machine runs:

- `bf16x3` on AMX-BF16 (Sapphire Rapids and later): products split into bf16 parts,
  relative error ~4e-6 per product (`testing.tolerance.U_BF16X3`);
- `panels` on AVX2 CPUs without AVX-512: float32, each output one FMA chain along K
  (blocked), within the float32 error model of any summation order.

`weight(w)` packs a float32 weight [N, K] for the first of them this machine runs (None:
neither, or the shape does not fit; keep the float32 kernels), `matmul(x, packed)` runs it.
A row's result does not depend on the batch it is in, with either. `weight(w, bf16x3=False)`
takes only float32 products (the vision tower: bf16x3 moved its tiny-fixture logits by
1.7e-4, past its 1e-4 parity with transformers).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from . import bf16x3 as _bf16x3
from . import panels

EncoderWeight = Union[_bf16x3.Bf16x3Weight, panels.PanelWeight]


def weight(w: np.ndarray, bf16x3: bool = True) -> Optional[EncoderWeight]:
    """w packed for this machine's encoder matmul, or None (see the module doc)."""
    return (bf16x3 and _bf16x3.Bf16x3Weight.of(w)) or panels.PanelWeight.of(w)


def matmul(x: np.ndarray, packed: EncoderWeight) -> np.ndarray:
    """x [..., K] @ W^T -> float32 [..., N] by the kernel `packed` was made for."""
    if isinstance(packed, _bf16x3.Bf16x3Weight):
        return _bf16x3.matmul(x, packed)
    return panels.matmul(x, packed)


def is_bf16x3(packed) -> bool:
    """Whether `packed` runs bf16x3 products (their error unit is U_BF16X3, not u)."""
    return isinstance(packed, _bf16x3.Bf16x3Weight)
