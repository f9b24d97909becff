"""Qwen3.5-MoE: Qwen3.5's hybrid layers (qwen3_5.py: Gated DeltaNet and gated full
attention) with a sparse MoE MLP in every layer (`moe.SparseMoE`): softmax over all
experts, top-k, always renormalised, plus a shared expert scaled by
sigmoid(shared_expert_gate . x). Loads `Qwen3_5MoeForCausalLM` (model_type
"qwen3_5_moe_text") and `Qwen3_5MoeForConditionalGeneration` ("qwen3_5_moe", text weights
under `model.language_model.*`), with the experts per expert or fused
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import CheckpointError
from . import qwen3_5
from .moe import SparseMoE


@dataclass(kw_only=True)
class ModelArgs(qwen3_5.ModelArgs):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0
    # the dense width is unused (every MLP is sparse); the error model reads it as the MLP
    # width, so it defaults to the widest expert
    intermediate_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lattice_online_rotation:
            raise CheckpointError("lattice_online_rotation is not supported for qwen3_5_moe; "
                                  "rebuild the checkpoint without the rotation transform")
        if not self.intermediate_size:
            self.intermediate_size = max(self.moe_intermediate_size,
                                         self.shared_expert_intermediate_size)


class Model(qwen3_5.Model):
    config_class = ModelArgs

    def mlp_factory(self, cfg: ModelArgs, index: int):
        return lambda c, w, prefix: SparseMoE(
            w, prefix, hidden=c.hidden_size, num_experts=c.num_experts,
            top_k=c.num_experts_per_tok, intermediate=c.moe_intermediate_size,
            normalize=True, shared_intermediate=c.shared_expert_intermediate_size)

    def moe_layers(self) -> list[SparseMoE]:
        return [b.mlp for b in self.layers]

    @staticmethod
    def _mlp_step_spec(m) -> Optional[dict]:
        """A MoE layer runs in the fused step as its C description (lk_moe_forward)."""
        if not isinstance(m, SparseMoE):
            return qwen3_5.Model._mlp_step_spec(m)
        native = m.native()
        return None if native is None else {"moe": native}
