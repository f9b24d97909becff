"""Entry point: registers the `ngram` and `draft_model` drafters ([speculative] method)."""

from lattice_engine import hookimpl, require_plugin_api

require_plugin_api(1, 1, plugin="lattice-spec-decode")

from .draft_model import DraftModelDrafter  # noqa: E402
from .ngram import NgramDrafter  # noqa: E402


@hookimpl
def register_drafters(register):
    register("ngram", NgramDrafter.build)
    register("draft_model", DraftModelDrafter.build)
