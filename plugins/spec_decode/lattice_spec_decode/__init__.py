"""lattice-spec-decode: speculative decoding for lattice-engine (a `drafters` plugin).

Drafters: `ngram` (prompt lookup, no weights), `draft_model` (a smaller model sharing
the target's tokenizer), and for Qwen3.5 targets `mtp` (the checkpoint's multi-token-
prediction head) and `self` (the target's linear-attention layers on its own recurrent
state). All verify with `rejection.rejection_sample`, which keeps the
target's output distribution exactly (greedy requests: token for token)."""

from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter
from .rejection import RejectionVerifier, rejection_sample
from .self_draft import MTPDrafter, SelfDrafter

__all__ = ["DraftModelDrafter", "MTPDrafter", "NgramDrafter", "SelfDrafter", "RejectionVerifier", "rejection_sample"]
__version__ = "0.1.0"
