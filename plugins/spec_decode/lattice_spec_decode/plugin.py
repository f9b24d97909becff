"""Entry point: registers the `ngram`, `draft_model`, and Qwen3.5's `mtp` and `self`
drafters ([speculative] method)."""

from lattice_engine import hookimpl, require_plugin_api

require_plugin_api(1, 1, plugin="lattice-spec-decode")

from .draft_model import DraftModelDrafter  # noqa: E402
from .ngram import NgramDrafter  # noqa: E402
from .self_draft import MTPDrafter, SelfDrafter  # noqa: E402


@hookimpl
def register_drafters(register):
    register("ngram", NgramDrafter.build)
    register("draft_model", DraftModelDrafter.build)
    register("mtp", MTPDrafter.build)
    register("self", SelfDrafter.build)
