__version__ = "0.1.0"

from .hookspecs import PLUGIN_API_VERSION, hookimpl  # noqa: E402  (what plugins import)

__all__ = ["__version__", "PLUGIN_API_VERSION", "hookimpl"]
