"""The registry of training methods: one decorator per method file, read by everything else.

A method is one file. It defines a `Method` subclass and registers it:

    @register_method(
        "l2w",
        summary="learning to weight samples with a meta-learned weight network",
        paper="Learning to Weight Samples for Dynamic Early-exiting Networks (Han et al., ECCV 2022, arXiv:2209.08310)",
        search_space={"q": SearchRange(0.5, 1.0), "delta": SearchRange(0.1, 1.0)},
    )
    class L2W(Method): ...

`register_method`, `list_methods` and `get_method` keep the methods on a
`keras_ee.registry.Registry`, the one shape of the datasets' and model presets' tables (as
timm's `register_model` / `list_models`). The registry then gives `keras-ee train --method`
its choices and help, `keras-ee methods`
its table, `experiment.make_method` the class and the typed options (from the constructor's
signature and defaults, or declared with `option_types`), and `python -m tuning.search` the
search space. Artifacts and callbacks are hooks of the method itself
(`Method.save_artifacts`, `Method.callbacks`).

The authors' code as an option: a method whose authors' public code departs from its paper
declares the departures, `reference_code={option: the code's value}` (with `reference_note`,
a line on where they come from). The method then takes `reference="paper"` (default) or
`reference="code"` (`--method-option reference=code`), which sets every listed option to the
code's value at once; an option given explicitly wins. `MethodSpec.canonical` (what a run's
config.json stores) writes the resolved values out, so a run keeps its settings on resume.
`keras-ee methods` lists the changes, `option: paper -> code`.

Methods from outside the package, without touching keras-ee:

- an entry point in the plug-in's `pyproject.toml`:

      [project.entry-points."keras_ee.methods"]
      my_method = "my_pkg.methods:MyMethod"

  read with `importlib.metadata` the first time a name is looked up;
- or a path, `--method my_pkg.methods:MyMethod` (any importable module). A class that is
  not registered gets a spec from its own signature (and `search_space` attribute).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import re
import traceback
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from keras_ee.registry import Registry

_C = TypeVar("_C", bound="type[Method]")

if TYPE_CHECKING:
    from keras_ee.training.methods import Method

ENTRY_POINT_GROUP = "keras_ee.methods"
# The `reference` option's values: the paper's settings (default) or the authors' code's.
REFERENCES = ("paper", "code")
# `--method package.module:Class`: a dotted module name, a colon, a class name.
_METHOD_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclasses.dataclass(frozen=True)
class SearchRange:
    """A float hyper-parameter range for keras-tuner (`hp.Float(name, low, high, sampling=...)`)."""

    low: float
    high: float
    sampling: str = "linear"

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"SearchRange needs low < high; received {self.low} and {self.high}.")
        if self.sampling not in ("linear", "log", "reverse_log"):
            raise ValueError(f"SearchRange `sampling` must be linear, log or reverse_log; received {self.sampling!r}.")


@dataclasses.dataclass(frozen=True)
class SearchChoice:
    """A categorical hyper-parameter for keras-tuner (`hp.Choice(name, values)`)."""

    values: tuple


@dataclasses.dataclass(frozen=True)
class MethodOption:
    """One constructor option of a method: its default and the type a command-line value converts to."""

    name: str
    default: object
    type: object  # a type, a typing construct (Literal, Optional, ...) or None for "any JSON value"

    def describe(self) -> str:
        return f"{self.name} ({_type_name(self.type)}, default {self.default!r})"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of one method."""

    name: str
    cls: type[Method]
    summary: str
    paper: str
    options: dict
    search_space: dict
    aliases: dict
    reference_code: dict | None = None  # None: the method has no `reference` option
    reference_note: str = ""

    def convert(self, options: dict) -> dict:
        """Options with aliases resolved and command-line strings converted to the declared types.

        With `reference="code"`, every option of `reference_code` not given is set to the
        authors' code's value.

        Raises:
            ValueError: an unknown option or a value of the wrong type, listing the valid
                options with their types.
        """
        out = {}
        for name, (key, value) in self._named(options).items():
            if name == "reference":
                out[name] = check_reference(self.name, value)
                continue
            try:
                out[name] = _convert(value, self.options[name].type)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"bad options for method {self.name!r}: {key}={value!r}: {e}; valid options: "
                    f"{self.describe_options()}."
                ) from None
        return {**self.code_values(out.get("reference", "paper"), out), **out}

    def code_values(self, reference: str, given: dict) -> dict:
        """The options that `reference` sets (the code's values under "code") and `given` does not."""
        if reference != "code":
            return {}
        return {name: value for name, value in (self.reference_code or {}).items() if name not in given}

    def canonical(self, options: dict) -> dict:
        """`options` under the options' own names (aliases resolved), values as given, and with
        `reference="code"` the code's values of the options not given: what a run's config.json
        stores (so a run keeps its resolved settings). Refuses what `convert` refuses by name
        (unknown options, two names of one option) and a bad `reference`."""
        named = {name: value for name, (_, value) in self._named(options).items()}
        reference = check_reference(self.name, named["reference"]) if "reference" in named else "paper"
        return {**named, **self.code_values(reference, named)}

    def code_changes(self) -> list[tuple[str, object, object]]:
        """`(option, paper value, code value)` for every option `reference="code"` changes."""
        return [(name, self.options[name].default, value) for name, value in (self.reference_code or {}).items()]

    def resolved(self, options: dict) -> dict:
        """Every option's value with `options`: converted, the others at their defaults (what the
        method is built with). Two configs whose options resolve alike run the same method, e.g.
        one that leaves `q` out and one that writes its default."""
        return {**{name: option.default for name, option in self.options.items()}, **self.convert(options)}

    def _named(self, options: dict) -> dict:
        """`{option name: (key as given, value)}`, refusing unknown keys and two keys of one option."""
        if not isinstance(options, dict):
            raise ValueError(f"options for method {self.name!r} must be a mapping; received {options!r}.")
        out: dict[str, Any] = {}
        for key, value in options.items():
            name = self.aliases.get(key, key)
            if name == "reference" and name not in self.options:
                raise ValueError(
                    f"bad options for method {self.name!r}: reference={value!r}: the method has no `reference` "
                    f"option (authors' code: {self.reference_note or 'none known'}); valid options: "
                    f"{self.describe_options()}."
                )
            if name not in self.options:
                raise ValueError(
                    f"bad options for method {self.name!r}: unknown option {key!r}; valid options: "
                    f"{self.describe_options()}."
                )
            if name in out:
                first, first_value = out[name]
                raise ValueError(
                    f"bad options for method {self.name!r}: {first}={first_value!r} and {key}={value!r} are two "
                    f"names of the option {name!r}; give it once."
                )
            out[name] = (key, value)
        return out

    def create(self, options: dict) -> Any:
        """An instance of the method with `options` (converted, then passed to the constructor)."""
        kwargs = self.convert(options)
        try:
            return self.cls(**kwargs)
        except (TypeError, ValueError) as e:  # the constructor's own checks, named
            raise ValueError(f"bad options for method {self.name!r}: {e}") from e

    def describe_options(self) -> str:
        return ", ".join(o.describe() for o in self.options.values()) or "none"


# Filled by `register_method` as the method files are imported; `list_methods` and
# `get_method` import the package's own first and read the plug-ins' entry points once.
_METHODS: Registry[MethodSpec] = Registry(
    "training method", hint="(or package.module:Class for a method outside keras-ee)"
)
_entry_points_loaded = False


def register_method(
    name: str,
    *,
    summary: str,
    paper: str = "",
    search_space: dict | None = None,
    option_types: dict | None = None,
    aliases: dict | None = None,
    reference_code: dict | None = None,
    reference_note: str = "",
) -> Callable[[_C], _C]:
    """Class decorator that registers a `Method` subclass under `name`.

    Args:
        name: the name users type (`--method NAME`); lower case, no spaces.
        summary: one line on what the method does.
        paper: the paper it implements (title, venue, arXiv id).
        search_space: `{option: SearchRange | SearchChoice}` for `python -m tuning.search`
            (keys may be aliases, e.g. `lambda`).
        option_types: types of options whose default does not tell (default None).
        aliases: `{alias: option}`, e.g. `{"lambda": "cost_weight"}`.
        reference_code: `{option: value}` where the authors' code departs from the paper:
            the method then takes `reference="paper" | "code"` (also in its constructor),
            and "code" sets these options (those given explicitly win). `{}`: the authors'
            code exists and departs in no option (`reference="code"` is accepted and changes
            nothing). None (default): no `reference` option. A method built on registered
            ones (L2W + IMTA) also takes theirs.
        reference_note: one line on the authors' code (where the values come from, or why
            there are none), shown by `keras-ee methods`.

    Example:
    >>> @register_method("my_method", summary="...", search_space={"beta": SearchRange(0, 1)})
    ... class MyMethod(Method):
    ...     def __init__(self, beta=0.5, **kwargs): ...
    """
    if not isinstance(name, str) or not name or name != name.strip() or " " in name:
        raise ValueError(f"a method name must be a non-empty word; received {name!r}.")

    def decorate(cls: _C) -> _C:
        spec = _spec_for(cls, name, summary, paper, search_space, option_types, aliases, reference_code, reference_note)
        if spec.reference_code is not None:
            _accept_reference(cls, spec)
        if name in _METHODS:
            existing = _METHODS.get(name).cls
            # The same class defined again (a module reloaded) replaces itself; another is refused.
            if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(
                    f"a training method named {name!r} is already registered "
                    f"(by {existing.__module__}.{existing.__qualname__})."
                )
        _METHODS.register(name, spec, replace=True)
        cls.method_name = name
        return cls

    return decorate


def _spec_for(
    cls: type,
    name: str,
    summary: str,
    paper: str,
    search_space: dict | None,
    option_types: dict | None,
    aliases: dict | None,
    reference_code: dict | None = None,
    reference_note: str = "",
) -> MethodSpec:
    from keras_ee.training.methods import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a registered method must be a keras_ee.training.Method subclass; received {cls!r}.")
    option_types = dict(option_types or {})
    reference_code = None if reference_code is None else dict(reference_code)
    # A method built on registered ones (L2W + IMTA) keeps their declared option types and
    # their authors' code values.
    for base in reversed(cls.__mro__[1:]):
        for spec in _specs():
            if spec.cls is base:
                for opt in spec.options.values():
                    if opt.name != "reference":
                        option_types.setdefault(opt.name, opt.type)
                if spec.reference_code is not None:
                    reference_code = {**spec.reference_code, **(reference_code or {})}
    if not reference_note:  # a variant of a registered method (HDKD's DBT...) shares its note
        reference_note = next((s.reference_note for base in cls.__mro__[1:] for s in _specs() if s.cls is base), "")
    hints = _constructor_hints(cls)
    options = {}
    for p in _constructor_parameters(cls, Method):
        default = None if p.default is inspect.Parameter.empty else p.default
        kind = option_types.get(p.name, hints.get(p.name))
        if kind is None and default is not None:
            kind = type(default)
        options[p.name] = MethodOption(p.name, default, kind)
    aliases = dict(aliases or {})
    for alias, target in aliases.items():
        if target not in options:
            raise ValueError(f"method {name!r}: alias {alias!r} names the unknown option {target!r}.")
    space = dict(search_space or {})
    for key, rng in space.items():
        if aliases.get(key, key) not in options:
            raise ValueError(f"method {name!r}: search space names the unknown option {key!r}.")
        if not isinstance(rng, (SearchRange, SearchChoice)):
            raise TypeError(
                f"method {name!r}: search space of {key!r} must be a SearchRange or SearchChoice; received {rng!r}."
            )
    for key, value in (reference_code or {}).items():
        if key not in options:
            raise ValueError(f"method {name!r}: reference_code names the unknown option {key!r}.")
        try:
            _convert(value, options[key].type)
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {name!r}: reference_code {key}={value!r}: {e}.") from None
    if reference_code is not None:
        options["reference"] = MethodOption("reference", "paper", typing.Literal[REFERENCES])
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return MethodSpec(
        name=name,
        cls=cls,
        summary=summary or (doc[0] if doc else cls.__name__),
        paper=paper,
        options=options,
        search_space=space,
        aliases=aliases,
        reference_code=reference_code,
        reference_note=reference_note,
    )


def check_reference(method: str, value: object) -> str:
    """`value` if it is one of `REFERENCES`; else a one-line `ValueError` naming them."""
    if isinstance(value, str) and value in REFERENCES:
        return value
    raise ValueError(
        f"bad options for method {method!r}: reference={value!r}; expected 'paper' (the paper's settings, "
        "the default) or 'code' (the authors' code's)."
    )


def _accept_reference(cls: type, spec: MethodSpec) -> None:
    """Give `cls`'s constructor the `reference` option (the same resolution as `MethodSpec.convert`).

    `Class(reference="code", ...)` sets the options of `spec.reference_code` that are not
    passed; the instance keeps `reference`. Signature inspection (`_constructor_parameters`)
    still sees the constructor's own parameters (`functools.wraps` sets `__wrapped__`).
    """
    init: Any = getattr(cls, "__init__")  # noqa: B009  (mypy calls `cls.__init__` unsound)

    # Options given by position (`Baseline([1, 2])`) are named first, so that the options the
    # user gave explicitly win over `reference`'s values however they were passed.
    signature = inspect.signature(init)
    positional = [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, reference: str = "paper", **kwargs: Any) -> None:
        if len(args) > len(positional):
            raise TypeError(
                f"{cls.__name__}() takes at most {len(positional)} options by position; received {len(args)}."
            )
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{cls.__name__}() got two values for option {name!r}.")
            kwargs[name] = value
        reference = check_reference(spec.name, reference)
        kwargs.update(spec.code_values(reference, kwargs))
        init(self, **kwargs)
        self.reference = reference

    # The constructor's own signature plus `reference` (keyword only): what `help()` and
    # Keras' auto-config read (Keras cannot bind `*args` to names itself).
    params = list(signature.parameters.values())
    if "reference" not in signature.parameters:
        at = len(params) - (params[-1].kind == inspect.Parameter.VAR_KEYWORD if params else 0)
        params.insert(at, inspect.Parameter("reference", inspect.Parameter.KEYWORD_ONLY, default="paper"))
    __init__.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    setattr(cls, "__init__", __init__)  # noqa: B010  (a class attribute, which mypy would call unsound)


def _constructor_parameters(cls: type, base: type) -> list[inspect.Parameter]:
    """The named constructor parameters of `cls`, and of its bases while `**kwargs` passes them on.

    A method built by cooperative inheritance (L2W + IMTA: `class L2WIMTA(IMTA, L2W)`, each
    `__init__` taking its own options and `**kwargs`) has the options of all of them.
    The walk stops at `base` (`Method`, whose `**kwargs` are Keras layer arguments).
    """
    params: list[inspect.Parameter] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass is base or not issubclass(klass, base) or "__init__" not in vars(klass):
            continue
        more = False
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.VAR_KEYWORD:
                more = True
            elif p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in seen:
                seen.add(p.name)
                params.append(p)
        if not more:
            break
    return params


def _constructor_hints(cls: type) -> dict:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            try:
                hints.update(typing.get_type_hints(vars(klass)["__init__"]))
            except Exception:  # unresolvable annotations: fall back to the defaults' types
                pass
    return hints


def _load_builtins() -> None:
    # The package's own methods register themselves on import.
    importlib.import_module("keras_ee.training.methods")
    importlib.import_module("keras_ee.training.l2w")
    importlib.import_module("keras_ee.training.imta")
    importlib.import_module("keras_ee.training.l2w_imta")
    importlib.import_module("keras_ee.training.gating")
    importlib.import_module("keras_ee.training.hdkd")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib import metadata

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the others
            import warnings

            warnings.warn(f"keras-ee method plug-in {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
            continue
        if getattr(cls, "method_name", None) not in _METHODS:
            spec = _spec_for(cls, ep.name, "", "", getattr(cls, "search_space", None), None, None)
            _METHODS.register(ep.name, spec, replace=True)


def _specs() -> list[MethodSpec]:
    """The specs registered so far (without importing anything: `register_method` reads them)."""
    return [_METHODS.get(name) for name in _METHODS.names()]


def list_methods() -> list[str]:
    """The registered method names (the package's and the plug-ins'), sorted."""
    _load_builtins()
    _load_entry_points()
    return sorted(_METHODS.names())


def get_method(name: object) -> MethodSpec:
    """The spec of a registered method, or of `package.module:Class`.

    Raises:
        ValueError: not a string, an unknown name (listing the known ones) or a path that
            does not import to a `Method` subclass.
    """
    if isinstance(name, str) and ":" in name:
        return _from_path(name)
    _load_builtins()
    _load_entry_points()
    return _METHODS.get(name)


def _from_path(path: str) -> MethodSpec:
    if not _METHOD_PATH.fullmatch(path):
        raise ValueError(
            f"method {path!r}: expected the form package.module:Class (a module to import, a colon, the name "
            "of a keras_ee.training.Method subclass in it)."
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as e:  # the plug-in's file, not keras-ee: say where, without a traceback
        raise ValueError(
            f"method {path!r}: module {module_name!r} has a syntax error in {e.filename}, line {e.lineno}: {e.msg}."
        ) from None
    except ImportError as e:
        raise ValueError(f"method {path!r}: cannot import module {module_name!r} ({e}).") from None
    except Exception as e:  # the module raised while it ran; KERAS_EE_DEBUG=1 shows the traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise ValueError(
            f"method {path!r}: importing module {module_name!r} raised {type(e).__name__}: {e} "
            f"({where.filename}, line {where.lineno})."
        ) from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"method {path!r}: module {module_name!r} has no attribute {attr!r}.")
    from keras_ee.training.methods import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {path!r} is not a keras_ee.training.Method subclass.")
    registered = getattr(cls, "method_name", None)
    if registered in _METHODS and _METHODS.get(registered).cls is cls:
        return dataclasses.replace(_METHODS.get(registered), name=path)
    return _spec_for(cls, path, "", "", getattr(cls, "search_space", None), None, None)


def methods_table() -> str:
    """`keras-ee methods`: name, paper and options with defaults of every method."""
    lines = []
    for name in list_methods():
        spec = _METHODS.get(name)
        lines.append(f"{name}: {spec.summary}")
        if spec.paper:
            lines.append(f"    paper: {spec.paper}")
        lines.append(f"    options: {spec.describe_options()}")
        if spec.reference_code is not None:
            changes = ", ".join(f"{option}: {paper!r} -> {code!r}" for option, paper, code in spec.code_changes())
            lines.append(f"    reference=code: {changes or 'changes no option'}")
        if spec.reference_note:
            lines.append(f"    authors' code: {spec.reference_note}")
        if spec.aliases:
            lines.append("    aliases: " + ", ".join(f"{a} = {t}" for a, t in spec.aliases.items()))
        if spec.search_space:
            lines.append("    tuned: " + ", ".join(_describe_search(k, r) for k, r in spec.search_space.items()))
    return "\n".join(lines)


def _describe_search(key: str, rng: SearchRange | SearchChoice) -> str:
    if isinstance(rng, SearchRange):
        return f"{key} in [{rng.low:g}, {rng.high:g}]" + ("" if rng.sampling == "linear" else f" ({rng.sampling})")
    return f"{key} in {list(rng.values)}"


# --- conversion of command-line values ------------------------------------------------


def _type_name(kind: object) -> str:
    if kind is None:
        return "any"
    if kind is type(None):
        return "None"
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(kind))
    if origin is typing.Union or type(kind).__name__ == "UnionType":
        return " | ".join(_type_name(a) for a in typing.get_args(kind))
    if origin in (list, tuple):
        return f"{origin.__name__}"
    return getattr(kind, "__name__", str(kind))


def _convert(value: Any, kind: Any) -> Any:
    """`value` (a JSON-decoded command-line value or a Python one) as `kind`."""
    if kind is None or kind is typing.Any:
        return value
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ValueError(f"expected one of {list(allowed)}")
        return value
    if origin is typing.Union or type(kind).__name__ == "UnionType":
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"expected {_type_name(kind)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list")
        return origin(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    if isinstance(kind, type) and not isinstance(value, kind):
        raise ValueError(f"expected {kind.__name__}")
    return value
