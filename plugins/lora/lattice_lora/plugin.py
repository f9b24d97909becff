"""The entry point of lattice-lora: registers the "lora" adapter kind."""

from lattice_engine import hookimpl, require_plugin_api

require_plugin_api(1, 2, plugin="lattice-lora")  # register_adapters came with 1.2


@hookimpl
def register_adapters(register):
    from .peft_io import LORA
    register(LORA)
