"""Plugin discovery and the registry of datasets, augmentations, featurizers and models.

Built-in plugin modules and third-party entry points (group ``sertk``) are
registered with one pluggy manager; each hook implementation is called with a
:class:`ProviderRegistry` that knows which plugin is registering, so a
duplicate name can name both providers.

``SERTK_LOAD_PLUGINS`` (comma-separated entry-point or distribution names)
limits which third-party plugins load; set it empty to load none.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy

from ser_toolkit import __version__, hookspecs
from ser_toolkit.errors import PluginError

ENTRY_POINT_GROUP = "sertk"
KINDS = ("dataset", "augmentation", "featurizer", "model")
_HOOKS = {"dataset": "register_datasets", "augmentation": "register_augmentations",
          "featurizer": "register_featurizers", "model": "register_models"}

BUILTIN_PLUGINS = (
    "ser_toolkit.plugins.ravdess",
    "ser_toolkit.plugins.savee",
    "ser_toolkit.plugins.manifest",
    "ser_toolkit.plugins.synthetic",
    "ser_toolkit.plugins.timestretch",
    "ser_toolkit.plugins.noise",
    "ser_toolkit.plugins.specaugment",
    "ser_toolkit.plugins.ncp",
    "ser_toolkit.plugins.duplicate",
    "ser_toolkit.plugins.hubert",
    "ser_toolkit.plugins.acoustic",
    "ser_toolkit.plugins.opensmile_features",
    "ser_toolkit.plugins.ssl_features",
    "ser_toolkit.plugins.classifiers",
)


@dataclass(frozen=True)
class Provider:
    """Who provides a plugin: the pluggy plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.plugin} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class Entry:
    """One registered dataset, augmentation or model."""

    kind: str
    name: str
    obj: Any
    provider: Provider

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``sertk plugins --json``."""
        params = getattr(self.obj, "params", ())
        out = {
            "kind": self.kind,
            "name": self.name,
            "description": getattr(self.obj, "description", ""),
            "plugin": self.provider.plugin,
            "distribution": self.provider.distribution,
            "version": self.provider.version,
            "params": [p.describe() for p in params],
        }
        label_map = getattr(self.obj, "label_map", None)
        if label_map is not None:
            out["label_map"] = dict(label_map)
        if self.kind == "dataset":
            out["mono"] = getattr(self.obj, "mono", None)  # its down-mix of multi-channel files
        return out


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, obj: Any, provider: Provider) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {provider} registered a {kind} without a 'name'",
                              "set a class attribute name = '...'")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} '{name}' is registered twice: by {existing.provider} and by {provider}",
                "uninstall one of them or disable one with SERTK_LOAD_PLUGINS",
            )
        self._entries[kind][name] = Entry(kind, name, obj, provider)

    def get(self, kind: str, name: str) -> Entry:
        """The entry for ``name``; an unknown name lists what is available."""
        try:
            return self._entries[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} '{name}'",
                              f"available: {available} (see 'sertk plugins')") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = KINDS if kind is None else (kind,)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]


class ProviderRegistry:
    """What a hook implementation receives: ``registry.register(obj)``.

    Attributes may be added in later versions; hook signatures never change.
    """

    def __init__(self, registry: Registry, kind: str, provider: Provider) -> None:
        self._registry = registry
        self.kind = kind
        self.provider = provider

    def register(self, obj: Any) -> Any:
        """Register a dataset/augmentation/featurizer/model class (returns it, so usable as decorator)."""
        self._registry.add(self.kind, obj, self.provider)
        return obj


def _canonical(name: str) -> str:
    """A plugin or distribution name as compared: case, ``_``/``-``/``.`` do not matter."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _names(ep: metadata.EntryPoint) -> set[str]:
    """The names ``SERTK_LOAD_PLUGINS`` may use for ``ep``: its entry-point name and its distribution's."""
    return {_canonical(ep.name), *([_canonical(ep.dist.name)] if ep.dist is not None else [])}


def _wanted(env: str | None, ep: metadata.EntryPoint) -> bool:
    if env is None:
        return True
    names = {_canonical(n) for n in env.split(",") if n.strip()}
    return bool(names & _names(ep))


def _check_wanted(env: str | None, eps: list[metadata.EntryPoint]) -> None:
    """Every name in ``SERTK_LOAD_PLUGINS`` must name an installed plugin (a typo would load nothing, silently)."""
    if not env:
        return
    known = set().union(*(_names(ep) for ep in eps)) if eps else set()
    unknown = [n.strip() for n in env.split(",") if n.strip() and _canonical(n) not in known]
    if unknown:
        installed = ", ".join(sorted(f"{ep.name} (distribution {ep.dist.name if ep.dist is not None else '?'})"
                                     for ep in eps)) or "none"
        raise PluginError(f"SERTK_LOAD_PLUGINS names {', '.join(map(repr, unknown))}, which is no installed "
                          f"plugin (installed entry points: {installed})",
                          "fix the name (an entry point or distribution listed), or set SERTK_LOAD_PLUGINS='' "
                          "to load none")


def build_plugin_manager() -> tuple[pluggy.PluginManager, dict[str, Provider]]:
    """A plugin manager with built-ins and (per ``SERTK_LOAD_PLUGINS``) entry points."""
    pm = pluggy.PluginManager("sertk")
    pm.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        providers[module_name] = Provider(module_name.rsplit(".", 1)[-1], "sertk", __version__)
    env = os.environ.get("SERTK_LOAD_PLUGINS")
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    _check_wanted(env, eps)
    for ep in eps:
        if not _wanted(env, ep) or pm.get_plugin(ep.name) is not None:
            continue
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not hide behind a traceback
            raise PluginError(
                f"plugin '{ep.name}' from {dist} {version} failed to load: "
                f"{type(exc).__name__}: {exc}",
                "fix or uninstall it, or skip it with SERTK_LOAD_PLUGINS (e.g. SERTK_LOAD_PLUGINS='')",
            ) from exc
        pm.register(plugin, name=ep.name)
        providers[ep.name] = Provider(ep.name, dist, version)
    return pm, providers


def build_registry() -> Registry:
    """Call every plugin's registration hooks and collect what they register."""
    pm, providers = build_plugin_manager()
    registry = Registry()
    for kind in KINDS:
        caller = getattr(pm.hook, _HOOKS[kind])
        for impl in reversed(caller.get_hookimpls()):  # registration order
            provider = providers.get(impl.plugin_name, Provider(impl.plugin_name, "unknown", "?"))
            kwargs = {"registry": ProviderRegistry(registry, kind, provider)}
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {provider} failed in {_HOOKS[kind]}: {type(exc).__name__}: {exc}",
                    "fix or uninstall it, or skip it with SERTK_LOAD_PLUGINS",
                ) from exc
    return registry


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return build_registry()


def get(kind: str, name: str) -> Entry:
    """Shortcut: ``get_registry().get(kind, name)``."""
    return get_registry().get(kind, name)
