"""Qwen3-MoE: Qwen3's decoder (per-head q/k RMSNorm) whose MLP is a sparse mixture of
experts (`moe.SparseMoE`: softmax router, top-k, `norm_topk_prob`) in the layers
`decoder_sparse_step` picks and `mlp_only_layers` does not list; the others keep a dense
SwiGLU MLP of `intermediate_size`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CheckpointError
from .moe import SparseMoE
from .transformer import DecoderConfig, DecoderModel


@dataclass
class ModelArgs(DecoderConfig):
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts and not self.moe_intermediate_size:
            raise CheckpointError("moe_intermediate_size is missing; a qwen3_moe config with "
                                  "num_experts needs it")
        bad = [i for i in self.mlp_only_layers
               if not isinstance(i, int) or isinstance(i, bool) or not
               0 <= i < self.num_hidden_layers]
        if bad:
            raise CheckpointError(f"mlp_only_layers lists {bad}, which are not layer indices "
                                  f"0..{self.num_hidden_layers - 1}; fix config.json")
        if self.lattice_online_rotation:
            raise CheckpointError("lattice_online_rotation is not supported for qwen3_moe; "
                                  "rebuild the checkpoint without the rotation transform")

    def sparse(self, index: int) -> bool:
        """Whether layer `index` has the MoE MLP (transformers' rule)."""
        return index not in self.mlp_only_layers and self.num_experts > 0 and \
            (index + 1) % self.decoder_sparse_step == 0


class Model(DecoderModel):
    config_class = ModelArgs
    qk_norm = True

    @classmethod
    def sanitize(cls, config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        # transformers 5 writes the expert count as num_local_experts
        if "num_experts" not in config and "num_local_experts" in config:
            config["num_experts"] = config["num_local_experts"]
        return config

    def mlp_factory(self, cfg: ModelArgs, index: int):
        if not cfg.sparse(index):
            return None
        return lambda c, w, prefix: SparseMoE(
            w, prefix, hidden=c.hidden_size, num_experts=c.num_experts,
            top_k=c.num_experts_per_tok, intermediate=c.moe_intermediate_size,
            normalize=c.norm_topk_prob)

    def moe_layers(self) -> list[SparseMoE]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, SparseMoE)]

    @staticmethod
    def _mlp_step_spec(m) -> Optional[dict]:
        """A MoE layer runs in the fused step as its C description (lk_moe_forward)."""
        if not isinstance(m, SparseMoE):
            return DecoderModel._mlp_step_spec(m)
        native = m.native()
        return None if native is None else {"moe": native}
