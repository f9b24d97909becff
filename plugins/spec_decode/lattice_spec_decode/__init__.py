"""lattice-spec-decode: speculative decoding for lattice-engine (a `drafters` plugin).

Drafters: `ngram` (prompt lookup, no weights) and `draft_model` (a smaller model sharing
the target's tokenizer). Both verify with `rejection.rejection_sample`, which keeps the
target's output distribution exactly (greedy requests: token for token)."""

from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter
from .rejection import RejectionVerifier, rejection_sample

__all__ = ["DraftModelDrafter", "NgramDrafter", "RejectionVerifier", "rejection_sample"]
__version__ = "0.1.0"
