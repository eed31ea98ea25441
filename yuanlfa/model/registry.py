"""The research API: local filters and core attentions registered by name.

A filter replaces LFA's convolution stack: it takes the normed layer input x [s, b, h] and
returns the filtered [s, b, h] that feeds the fused Q/K projection (V always reads x). A core
attention replaces softmax attention: it takes q [s, b, heads, d] and k, v [past + s, b, heads,
d] (RoPE applied, heads already split by tensor parallelism) and returns [s, b, heads, d].
Select them with ``model.filter`` / ``model.attention``; ``model.plugins`` imports user files
(on every rank, before the model is built) so their decorators run::

    @register_filter("my_filter")
    class MyFilter(nn.Module):
        receptive_field = 3  # each output reads its input and the 3 before it (None: all)
        tp_plan = {"up": "column", "down": "row"}  # optional; unnamed parameters: replicated

        def __init__(self, cfg: ModelConfig) -> None: ...
        def forward(self, x, doc_start=None): ...  # doc_start: bool [s, b] or None

What a plug-in declares, and what the library does with it:

- ``receptive_field`` (filters, required): ``r`` means output t depends only on inputs t-r..t
  (nothing carried from further back); ``None`` means the whole sequence. Under sequence
  parallelism the filter then sees its shard with the previous shard's last r tokens prepended
  (or the whole gathered sequence), and cached decoding keeps the last r inputs.
- ``tp_plan`` (optional): submodule or parameter path -> ``"column"`` / ``"row"`` (an nn.Linear
  made column/row-parallel, Megatron style: a column layer's output features are split over tp,
  a row layer's input features, its output summed) or ``"split:D"`` (a parameter split along dim
  D, e.g. per-head parameters of an attention on dim 0). Everything else is replicated.
- Initial values: by default those the module's constructor draws, with the random generator
  seeded from (train.seed, the module's global name), so every layout starts identically.
  A classmethod ``init_parameter(name, shape, cfg, generator) -> Tensor`` overrides that.
- Construction: ``cls(cfg)`` with the ModelConfig, or a classmethod ``from_config(cfg)``.
- Costs (optional): ``register_filter(name, cost=fn)`` (or a ``cost`` attribute on the class)
  with ``fn(cfg) -> yuanlfa.planner.ComponentCost``: its parameters, FLOPs, saved activations
  and tp communication, for yuanlfa-info and yuanlfa-plan. Without it those tools count the
  parameters of the built module and report the rest as unknown.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from yuanlfa.config import ConfigError, ModelConfig
from yuanlfa.model.seeds import name_seed

Kind = Literal["filter", "attention"]
# Where each kind lives inside a layer; parameter names are layers.N.attn.<attr>.<name>.
MODULE_ATTR: dict[Kind, str] = {"filter": "lf_gate", "attention": "core"}
CONFIG_FIELD: dict[Kind, str] = {"filter": "model.filter", "attention": "model.attention"}
FORWARD_FORM: dict[Kind, str] = {
    "filter": "forward(self, x, doc_start=None) -> Tensor [s, b, h]",
    "attention": "forward(self, q, k, v, doc_start=None) -> Tensor [s, b, heads, d]",
}
STYLES = ("replicated", "column", "row")
_SPLIT = re.compile(r"^split:(\d+)$")
_NAME = re.compile(r"^layers\.(\d+)\.attn\.(lf_gate|core)\.(.+)$")


class RegistryError(ConfigError):
    """A plug-in that cannot be used, or a name nothing registered."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind
    cls: type[nn.Module]
    builtin: bool
    declared_cost: Callable[[ModelConfig], Any] | None = None

    @property
    def cost(self) -> Callable[[ModelConfig], Any] | None:
        """The plug-in's cost declaration (``cfg -> ComponentCost``), or None."""
        return self.declared_cost or getattr(self.cls, "cost", None)

    @property
    def origin(self) -> str:
        module = sys.modules.get(self.cls.__module__)
        where = getattr(module, "__file__", None) or self.cls.__module__
        return f"{self.cls.__qualname__} in {where}"

    @property
    def tp_plan(self) -> dict[str, str]:
        return dict(getattr(self.cls, "tp_plan", None) or {})

    def build(self, cfg: ModelConfig) -> nn.Module:
        factory = getattr(self.cls, "from_config", None)
        if factory is not None:
            module = factory(cfg)
        elif self.cls.__init__ is nn.Module.__init__:
            module = self.cls()  # no constructor of its own (e.g. a parameter-free attention)
        else:
            module = self.cls(cfg)
        if not isinstance(module, nn.Module):
            raise RegistryError(
                f"{self.kind} {self.name!r} ({self.origin}) built a {type(module).__name__}, "
                "not a torch.nn.Module"
            )
        return module


_REGISTRY: dict[Kind, dict[str, Entry]] = {"filter": {}, "attention": {}}
_LOADED: set[str] = set()


def _forward_params(cls: type) -> list[inspect.Parameter]:
    params = list(inspect.signature(cls.forward).parameters.values())
    return params[1:]  # self


def _check_class(name: str, kind: Kind, cls: Any) -> None:
    """Raise a RegistryError naming exactly what the class lacks."""
    what = f"{kind} {name!r} ({getattr(cls, '__qualname__', cls)!s})"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RegistryError(f"{what}: register a torch.nn.Module subclass, got {cls!r}")
    if cls.forward is nn.Module.forward:
        raise RegistryError(f"{what}: has no forward; define {FORWARD_FORM[kind]}")
    params = _forward_params(cls)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        names_ok = True
    else:
        names_ok = any(p.name == "doc_start" for p in params)
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "doc_start"
    ]
    needed = 1 if kind == "filter" else 3
    if len(positional) < needed and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise RegistryError(
            f"{what}: forward takes {len(positional)} positional inputs, needs {needed}; define "
            f"{FORWARD_FORM[kind]}"
        )
    if not names_ok:
        raise RegistryError(
            f"{what}: forward lacks a doc_start parameter (bool [s, b], True where a packed "
            f"document starts, or None); define {FORWARD_FORM[kind]}"
        )
    if not hasattr(cls, "from_config"):
        _check_constructor(what, cls)
    if kind == "filter":
        if not hasattr(cls, "receptive_field"):
            raise RegistryError(
                f"{what}: does not declare receptive_field; set the class attribute to the "
                "number of earlier tokens each output reads (0 for a pointwise filter, None "
                "for the whole sequence), used for sequence-parallel halos and decoding"
            )
        _check_receptive_field(what, cls.receptive_field)
    declared = getattr(cls, "cost", None)
    if declared is not None and not callable(declared):
        raise RegistryError(
            f"{what}: its cost attribute must be a callable cfg -> yuanlfa.planner.ComponentCost, "
            f"got {type(declared).__name__}"
        )
    plan = getattr(cls, "tp_plan", None)
    if plan is not None:
        if not isinstance(plan, dict):
            raise RegistryError(
                f"{what}: tp_plan must be a dict of submodule/parameter path -> style, got "
                f"{type(plan).__name__}"
            )
        for path, style in plan.items():
            if style_dim(style) is None and style not in STYLES:
                raise RegistryError(
                    f"{what}: tp_plan[{path!r}] = {style!r} is not a style; use column, row "
                    "(nn.Linear), split:D (a parameter split along dim D) or replicated"
                )


def _check_constructor(what: str, cls: type) -> None:
    """``cls(cfg)`` must work: one positional input, anything else optional."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params[1:] if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or required:
        raise RegistryError(
            f"{what}: the library builds it as cls(cfg) with the ModelConfig, but __init__ takes "
            f"({', '.join(p.name for p in params)}); accept cfg (other arguments optional) or "
            "define a classmethod from_config(cfg)"
        )


def _check_receptive_field(what: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise RegistryError(f"{what}: receptive_field must be an int >= 0 or None, got {value!r}")


def style_dim(style: str) -> int | None:
    """The split dim of a ``split:D`` style (None for other styles)."""
    match = _SPLIT.match(str(style))
    return int(match.group(1)) if match else None


def _register(
    kind: Kind,
    name: str,
    override: bool,
    builtin: bool,
    cost: Callable[[ModelConfig], Any] | None = None,
) -> Callable[[type], type]:
    if not isinstance(name, str) or not name:
        raise RegistryError(f"register_{kind}: the name must be a non-empty string, got {name!r}")

    if kind == "filter" and name == "none":
        raise RegistryError("register_filter: 'none' means no filter; choose another name")
    if cost is not None and not callable(cost):
        raise RegistryError(
            f"register_{kind}({name!r}): cost must be a callable cfg -> ComponentCost, got "
            f"{type(cost).__name__}"
        )

    def decorate(cls: type) -> type:
        _check_class(name, kind, cls)
        table = _REGISTRY[kind]
        old = table.get(name)
        same = old is not None and (
            old.cls is cls or (old.cls.__qualname__, old.cls.__module__) == (
                cls.__qualname__, cls.__module__
            )
        )  # fmt: skip
        if old is not None and not same and not override:
            raise RegistryError(
                f"{kind} {name!r} is already registered by {old.origin}; choose another name "
                "or pass override=True"
            )
        table[name] = Entry(name, kind, cls, builtin, cost)
        return cls

    return decorate


def register_builtin(kind: Kind, name: str) -> Callable[[type], type]:
    """The library's own variants (their parameters are never sharded, their init is theirs)."""
    return _register(kind, name, override=False, builtin=True)


def register_filter(
    name: str, *, override: bool = False, cost: Callable[[ModelConfig], Any] | None = None
) -> Callable[[type], type]:
    """Class decorator: make a local filter selectable as ``model.filter: name``; ``cost``
    (``cfg -> yuanlfa.planner.ComponentCost``) declares what it costs, for the planner."""
    return _register("filter", name, override, builtin=False, cost=cost)


def register_attention(
    name: str, *, override: bool = False, cost: Callable[[ModelConfig], Any] | None = None
) -> Callable[[type], type]:
    """Class decorator: make a core attention selectable as ``model.attention: name``; ``cost``
    as for :func:`register_filter`."""
    return _register("attention", name, override, builtin=False, cost=cost)


def _builtins() -> None:
    # The library's own variants register on import (yuanlfa.model.variants).
    importlib.import_module("yuanlfa.model.variants")


def registered(kind: Kind) -> list[str]:
    """The names ``model.filter`` (with ``none``) or ``model.attention`` accept right now."""
    _builtins()
    return sorted([*_REGISTRY[kind], *(["none"] if kind == "filter" else [])])


def get_entry(kind: Kind, name: str) -> Entry:
    """The registered entry, or a RegistryError listing the names and the closest ones."""
    _builtins()
    table = _REGISTRY[kind]
    if name in table:
        return table[name]
    names = registered(kind)
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise RegistryError(
        f"{CONFIG_FIELD[kind]}: no {kind} named {name!r}{hint}; registered: "
        f"{', '.join(names)}. A plug-in's name is known once model.plugins imports the file "
        f"that registers it (@register_{kind})"
    )


def load_plugins(specs: Iterable[str]) -> None:
    """Import each plug-in once per process: a .py file (path, relative to the working directory)
    or an importable module name."""
    for spec in specs:
        if spec in _LOADED:
            continue
        is_file = spec.endswith(".py") or "/" in spec or "\\" in spec
        try:
            if is_file:
                _import_file(spec)
            else:
                _import_module(spec)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"model.plugins: importing {spec!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        _LOADED.add(spec)


def _import_file(spec: str) -> None:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"model.plugins: {spec!r} not found (looked at {path}); give a .py file (relative "
            "to the working directory) or an importable module name"
        )
    # One module per file, under a name stable across processes (pickling, repeated loads).
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"yuanlfa_plugin_{stem}_{digest}"
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"model.plugins: {spec!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _import_module(spec: str) -> None:
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and spec.startswith(exc.name):
            raise ConfigError(
                f"model.plugins: no module {spec!r} (and no such .py file); give a path to a .py "
                "file or a module on the Python path"
            ) from None
        raise


def check_model_config(cfg: ModelConfig) -> None:
    """Import the plug-ins and resolve model.filter / model.attention; a ConfigError otherwise."""
    load_plugins(cfg.plugins)
    if cfg.filter_name != "none":
        get_entry("filter", cfg.filter_name)
    get_entry("attention", cfg.attention)


def build_component(kind: Kind, cfg: ModelConfig) -> nn.Module | None:
    """A layer's filter (None for ``none``) or core attention, per the config."""
    load_plugins(cfg.plugins)
    if kind == "filter" and cfg.filter_name == "none":
        return None
    entry = get_entry(kind, cfg.filter_name if kind == "filter" else cfg.attention)
    module = entry.build(cfg)
    if kind == "filter":
        _check_receptive_field(f"filter {entry.name!r}", module.receptive_field)
    for name, param in module.named_parameters():
        if param.dim() == 0:
            raise RegistryError(
                f"{kind} {entry.name!r} ({entry.origin}): parameter {name!r} is 0-dimensional; "
                "give it shape (1,) (checkpoints and sharding address tensors by rows)"
            )
    return module


def component_of(name: str, cfg: ModelConfig) -> tuple[Entry, str, str] | None:
    """(entry, module prefix, parameter path inside it) when ``name`` is a parameter of a layer's
    filter or core attention, else None."""
    match = _NAME.match(name)
    if match is None:
        return None
    index, attr, rest = match.groups()
    if attr == "lf_gate":
        if cfg.filter_name == "none":
            return None
        entry = get_entry("filter", cfg.filter_name)
    else:
        entry = get_entry("attention", cfg.attention)
    return entry, f"layers.{index}.attn.{attr}", rest


def param_style(plan: dict[str, str], path: str) -> int | None:
    """The tp split dim of parameter ``path`` (relative to its component) under ``plan``, or None
    when it is replicated. column: weight and bias split on dim 0; row: weight on dim 1 (the
    bias, added after the sum, stays replicated)."""
    if path in plan:
        style = plan[path]
        dim = style_dim(style)
        if dim is not None:
            return dim
        if style == "replicated":
            return None
        raise RegistryError(
            f"tp_plan[{path!r}] = {style!r}: column and row apply to an nn.Linear submodule, "
            "a parameter takes split:D or replicated"
        )
    module_path, _, leaf = path.rpartition(".")
    style = plan.get(module_path)
    if style == "column":
        return 0
    if style == "row":
        return 1 if leaf == "weight" else None
    return None


def split_dim(name: str, cfg: ModelConfig) -> int | None:
    """The tp split dim of a plug-in's parameter by its global name (None: replicated, or not a
    plug-in parameter). Built-in components shard nothing."""
    found = component_of(name, cfg)
    if found is None or found[0].builtin:
        return None
    entry, _, path = found
    return param_style(entry.tp_plan, path)


def init_parameter(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial fp32 value of a filter or core-attention parameter (full, unsharded)."""
    found = component_of(name, cfg)
    if found is None:
        raise ValueError(f"{name!r} is not a parameter of a filter or core attention")
    entry, prefix, path = found
    rule = getattr(entry.cls, "init_parameter", None)
    if rule is not None:
        gen = torch.Generator().manual_seed(name_seed(seed, name))
        value = rule(path, shape, cfg, gen)
        if value is not None:
            return _checked(name, value, shape, entry)
    value = _constructed_values(entry, prefix, cfg, seed).get(path)
    if value is None:
        raise RegistryError(
            f"{entry.kind} {entry.name!r} ({entry.origin}): its constructor made no parameter "
            f"{path!r}, but the model has {name!r}"
        )
    return _checked(name, value.clone(), shape, entry)


def _checked(name: str, value: torch.Tensor, shape: tuple[int, ...], entry: Entry) -> torch.Tensor:
    if tuple(value.shape) != tuple(shape):
        raise RegistryError(
            f"{entry.kind} {entry.name!r}: initial value of {name} has shape "
            f"{tuple(value.shape)}, the parameter {tuple(shape)}"
        )
    return value.detach().to(torch.float32)


@functools.lru_cache(maxsize=2)
def _constructed_values(
    entry: Entry, prefix: str, cfg: ModelConfig, seed: int
) -> dict[str, torch.Tensor]:
    """The module's own initial values, built on the CPU with the global generator seeded from
    (seed, module name): deterministic, independent of layout and device. Cached because a
    module's parameters are materialized one after another."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(name_seed(seed, prefix))
        module = entry.build(cfg)
    return {n: p.detach() for n, p in module.named_parameters()}
