__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (the decorator plugins import)

__all__ = ["__version__", "hookimpl"]
