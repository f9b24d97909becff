__version__ = "0.1.0"

from .hookspecs import PLUGIN_API_VERSION, hookimpl  # noqa: E402  (what plugins import)
from .contract import require_plugin_api  # noqa: E402

__all__ = ["__version__", "PLUGIN_API_VERSION", "hookimpl", "require_plugin_api",
           "native_include", "native_plugin_abi"]


def native_include() -> str:
    """The directory holding lattice_plugin.h, the C ABI header a plugin's native code
    compiles against (the core's thread pool, CPU features, lk_extern_matmul)."""
    import os
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def native_plugin_abi() -> "int | None":
    """The C plugin ABI version (LK_PLUGIN_ABI_VERSION) of the core's native module, or
    None when that module is not built. Separate from PLUGIN_API_VERSION, the Python hook
    contract."""
    try:
        from ._native import lib
    except ImportError:
        return None
    return int(lib.lk_plugin_abi_version())
