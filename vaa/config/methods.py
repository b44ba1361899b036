"""Typed schemas of training methods (``method=``) and fine-tuning-stage defenses
(``ft_defense=``): each lives beside its method, in the method's own module, and registers
itself with a decorator, so adding a method with hyperparameters is one Python file and one
YAML (README, "Adding a method"); no shared registry is edited.

A schema is a dataclass derived from :class:`MethodConfig` (or :class:`DefenseConfig`)::

    @method_schema                       # stored in Hydra's ConfigStore as _schema_method_<name>
    @dataclass
    class ScaledConfig(MethodConfig):
        _target_: str = "vaa.methods.scaled.Scaled"
        name: str = "scaled"
        scale: float = 0.5               # typed: method.scale=abc fails when the config is composed

        @staticmethod
        def check(c):                    # optional range rules, run before anything is built
            c.positive("scale")

and ``conf/method/scaled.yaml`` starts with ``defaults: [/_schema_method_scaled@_here_, _self_]``.
The schema is stored without a config group (under ``_schema_<group>_<name>``), so Hydra never
lists it as an option of ``method`` (Hydra's "schema in a different place" pattern).
:func:`import_method_modules` imports every module of ``vaa.methods`` so their schemas register
before Hydra composes a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

from hydra.core.config_store import ConfigStore

SCHEMAS: dict[tuple[str, str], type] = {}  # (group, option name) -> schema dataclass


def schema_name(group: str, name: str) -> str:
    """The ConfigStore name an option's YAML pulls in: ``/_schema_<group>_<name>@_here_``."""
    return f"_schema_{group}_{name}"


def store_schema(group: str, name: str, node) -> None:
    """Store ``node`` (a dataclass) at the root of Hydra's ConfigStore (no group: never listed)."""
    SCHEMAS[(group, name)] = node
    ConfigStore.instance().store(name=schema_name(group, name), node=node)


def schema(group: str, name: Optional[str] = None) -> Callable[[type], type]:
    """Class decorator: register a schema for an option of ``group``. ``name`` defaults to the
    class's ``name`` field (the option it types); a plain class is made a dataclass."""

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        store_schema(group, name or cls.name, cls)
        return cls

    return register


def method_schema(cls: type) -> type:
    """``@method_schema``: the schema of a ``method=<cls.name>`` option."""
    return schema("method")(cls)


def defense_schema(cls: type) -> type:
    """``@defense_schema``: the schema of an ``ft_defense=<cls.name>`` option."""
    return schema("ft_defense")(cls)


@dataclass
class MethodConfig:
    """Base schema of an alignment method: ``_target_`` is its class, every other field a
    keyword argument of the class. ``method=sft`` uses this schema as is."""

    _target_: str = "vaa.methods.sft.SFT"
    name: str = "sft"


@dataclass
class DefenseConfig:
    """A fine-tuning-stage defense (``ft_defense``): the attack's training step. ``none`` is SFT."""

    _target_: str = "vaa.methods.sft.SFT"
    name: str = "none"


store_schema("method", "sft", MethodConfig)
store_schema("ft_defense", "none", DefenseConfig)


def import_method_modules(package: str = "vaa.methods") -> list[str]:
    """Import every module of ``package`` (not subpackages) so their ``@method_schema`` /
    ``@defense_schema`` classes register. Returns the module names."""
    pkg = importlib.import_module(package)
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg]
    for n in names:
        importlib.import_module(n)
    return names
