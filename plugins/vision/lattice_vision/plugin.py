"""Entry point of lattice-vision: registers the Qwen vision encoder."""

from lattice_engine import hookimpl, require_plugin_api

require_plugin_api(1, 3, plugin="lattice-vision")  # register_encoders came with 1.3

from .encoder import QwenVisionEncoder  # noqa: E402


@hookimpl
def register_encoders(register):
    register(QwenVisionEncoder())


@hookimpl
def register_architectures(register):
    from .qwen3_vl import Model
    register("qwen3_vl", Model)
