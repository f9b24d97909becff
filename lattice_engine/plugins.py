"""The plugin manager: built-ins by module path, third-party plugins by entry point.

Plugins of the entry-point group "lattice_engine" are loaded once per process. The env var
LATTICE_PLUGINS (comma-separated entry-point names; empty means none) or the config file's
`[plugins] load = [...]` limits which are loaded; naming one that is not installed is an
error. Registries are built once from every hook and refuse duplicate names.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import pluggy

from . import hookspecs
from .contract import check_registration
from .errors import PluginError

ENTRY_POINT_GROUP = "lattice_engine"
ALLOWLIST_ENV = "LATTICE_PLUGINS"

BUILTIN_MODULES = (
    "lattice_engine.builtins",
)

REGISTRY_HOOKS = {
    "architectures": "register_architectures",
    "weight_formats": "register_weight_formats",
    "quant_methods": "register_quant_methods",
    "weight_transforms": "register_weight_transforms",
    "samplers": "register_samplers",
    "logits_processors": "register_logits_processors",
    "adapters": "register_adapters",
    "drafters": "register_drafters",
    "encoders": "register_encoders",
}


@dataclass
class Registry:
    """Everything the plugins registered, by kind then name, with the owning plugin."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, kind: str, name: str, value: Any, owner: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {owner!r} registered a {kind} entry with name {name!r}; "
                              f"names must be non-empty strings")
        table = self.items.setdefault(kind, {})
        owners = self.owners.setdefault(kind, {})
        if name in table:
            raise PluginError(f"{kind} name {name!r} is registered twice: by {owners[name]!r} "
                              f"and by {owner!r}; uninstall or disable one of them "
                              f"(set {ALLOWLIST_ENV} to the plugins you want)")
        table[name] = value
        owners[name] = owner

    def get(self, kind: str, name: str) -> Any:
        table = self.items.get(kind, {})
        if name not in table:
            choices = ", ".join(sorted(table)) or "(none)"
            raise PluginError(f"unknown {kind[:-1].replace('_', ' ')} {name!r}; "
                              f"registered: {choices}")
        return table[name]

    def names(self, kind: str) -> list[str]:
        return list(self.items.get(kind, {}))


class PluginManager:
    """Owns the pluggy manager and the registry built from it."""

    def __init__(self, allowlist: Optional[Iterable[str]] = None, *,
                 load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("lattice_engine")
        self.pm.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (dist, version)
        for module_name in BUILTIN_MODULES:
            self.pm.register(importlib.import_module(module_name), name=module_name)
        if load_entry_points:
            self._load_entry_points(allowlist)
        self._registry: Optional[Registry] = None

    def _load_entry_points(self, allowlist: Optional[Iterable[str]]) -> None:
        wanted = None if allowlist is None else {n.strip() for n in allowlist if n.strip()}
        found = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found:
                raise PluginError(
                    f"two installed distributions publish plugin {ep.name!r}: "
                    f"{found[ep.name].value!r} and {ep.value!r}; uninstall one")
            found[ep.name] = ep
        if wanted is not None:
            missing = sorted(wanted - set(found))
            if missing:
                raise PluginError(
                    f"plugin(s) {', '.join(missing)} are allow-listed but not installed; "
                    f"installed: {', '.join(sorted(found)) or '(none)'}; "
                    f"pip install the plugin or remove it from {ALLOWLIST_ENV} / [plugins] load")
        for name, ep in found.items():
            if wanted is not None and name not in wanted:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must name itself
                raise PluginError(f"plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
            self.pm.register(plugin, name=name)
            dist = ep.dist
            self.distributions[name] = (dist.name if dist else "?", dist.version if dist else "?")

    def register(self, plugin: Any, name: str) -> None:
        """Register an in-process plugin object (tests, embedding applications)."""
        self.pm.register(plugin, name=name)
        self._registry = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._registry = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        registry = Registry()
        for kind, hook_name in REGISTRY_HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            # Call each implementation separately so the registry knows who owns what, in
            # pluggy's call order (get_hookimpls lists them last-called first): tryfirst
            # implementations register first, then the others last-registered first, then
            # trylast. The order is what logits processors run in.
            for impl in reversed(hook.get_hookimpls()):
                owner = impl.plugin_name

                def register(*args, _kind=kind, _owner=owner):
                    name, value = _split_registration(_kind, args, _owner)
                    check_registration(_kind, _owner, name, value, registry)
                    registry.add(_kind, name, value, _owner)

                try:
                    impl.function(register)
                except PluginError:
                    raise
                except Exception as exc:  # a plugin's bug must name the plugin and the hook
                    raise PluginError(f"plugin {owner!r} raised in {hook_name}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        return registry

    def describe(self, include_builtins: bool = False) -> list[dict]:
        """name, version and hooks of each plugin, as `lattice plugins` prints them."""
        out = []
        for name, plugin in self.pm.list_name_plugin():
            builtin = name in BUILTIN_MODULES
            if builtin and not include_builtins:
                continue
            hooks = sorted(impl_name for impl_name in REGISTRY_HOOKS.values()
                           if any(i.plugin_name == name
                                  for i in getattr(self.pm.hook, impl_name).get_hookimpls()))
            entry = {"name": name, "hooks": hooks,
                     "registers": {kind: sorted(n for n, o in owners.items() if o == name)
                                   for kind, owners in self.registry.owners.items()
                                   if name in owners.values()}}
            if name in self.distributions:
                entry["distribution"], entry["version"] = self.distributions[name]
            elif builtin:
                from . import __version__
                entry["version"] = __version__
                entry["builtin"] = True
            out.append(entry)
        return out


def _split_registration(kind: str, args: tuple, owner: str) -> tuple[str, Any]:
    """register(name, value) for named kinds, register(obj) for objects carrying .name."""
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1 and hasattr(args[0], "name"):
        return args[0].name, args[0]
    raise PluginError(f"plugin {owner!r} called register for {kind} with {len(args)} "
                      f"argument(s); expected (name, value) or an object with a .name")


_default: Optional[PluginManager] = None


def allowlist_from_env() -> Optional[list[str]]:
    raw = os.environ.get(ALLOWLIST_ENV)
    return None if raw is None else [n for n in raw.split(",") if n.strip()]


def get_plugin_manager(allowlist: Optional[Iterable[str]] = None) -> PluginManager:
    """The process-wide manager, built on first use. The env var wins over `allowlist`."""
    global _default
    if _default is None:
        env = allowlist_from_env()
        _default = PluginManager(env if env is not None else allowlist)
    return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; a changed allowlist)."""
    global _default
    _default = None
