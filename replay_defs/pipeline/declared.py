"""Pipelines declared in the user's own file, and sinks chosen by the environment.

- `EVENT_REPLAY_PIPELINES` names a YAML file (`*.yaml`, `*.yml`), a Python file (`*.py`) or an
  importable module (`my_company.pipelines`). A YAML file holds `pipelines:`, a list of
  `PipelineSpec`s written as mappings (keys: the dataclass fields, see `examples/pipelines.yaml`);
  a Python one defines `PIPELINES` (and may define `REFILLS`), tuples of specs.
- `EVENT_REPLAY_SHIPPED_PIPELINES`: which shipped pipelines (`replay_defs/pipelines.py`) are
  served beside the declared ones: `all` (the default), `none`, or a comma-separated list of names.
- `EVENT_REPLAY_SINK__<PIPELINE>` (the name in upper case) replaces a pipeline's redrive sink, a
  shipped or a declared one: `<kind>[:<destination>][?<option>=<value>&...]`, e.g.
  `kafka:orders-replayed`, `redis:orders?mode=list`, `rabbitmq:events?routing_key=replay.{type}`,
  `sqs:orders-redrive?max_visible=1000`, `outbox`. The destination is the first field of the
  sink's `<X>SinkSpec` (`replay_defs/sinks/`), the options its other fields.
- `EVENT_REPLAY_DEAD_LETTERS__<SYSTEM>` (a pipeline's, a refill's name, or `PROCESSED_EVENTS`, in
  upper case) adds dead-letter sources whose growth a sensor acts on (`sensors/dead_letters.py`):
  `<kind>:<name>[?<option>=<value>&...]`, several comma-separated, e.g.
  `sqs:telemetry-processing-redrive-queue-dlq?growth=50`. The options are the `DeadLettersSpec`
  fields (`running` defaults to true here) and what the system's launch needs (its run config).

Everything here only builds the frozen classes of `spec.py` (their own checks run as usual) and
every error is a `DeclarationError` that names the file or variable, the pipeline and the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml  # a Dagster dependency

from replay_defs.pipeline.spec import DeadLettersSpec, PipelineSpec
from replay_defs.sinks import sink_types
from replay_defs.sinks.base import SinkSpec

PIPELINES_ENV = "EVENT_REPLAY_PIPELINES"
SHIPPED_ENV = "EVENT_REPLAY_SHIPPED_PIPELINES"
SINK_ENV_PREFIX = "EVENT_REPLAY_SINK__"
DEAD_LETTERS_ENV_PREFIX = "EVENT_REPLAY_DEAD_LETTERS__"
REQUIRED = ...  # a launch option with no default (`dead_letters_from_env`)
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class DeclarationError(ValueError):
    """A declaration that cannot be served, with where it is: file, pipeline, key."""


class _Bad(Exception):
    """A bad value at a key path (`schema.fields[2].type`), before the file and pipeline are known."""

    def __init__(self, at: str, message: str):
        super().__init__(f"{at}: {message}" if at else message)


# ---- what the code location serves ---------------------------------------------------------------


def serve(shipped: tuple, shipped_refills: tuple, env: Mapping[str, str]) -> tuple[tuple, tuple]:
    """(pipelines, refills) to serve: the shipped ones `SHIPPED_ENV` keeps, then the declared ones,
    each with the sink its `EVENT_REPLAY_SINK__<NAME>` sets."""
    shipped, shipped_refills = _kept(shipped, shipped_refills, env.get(SHIPPED_ENV, "all"))
    declared, declared_refills = load(env[PIPELINES_ENV]) if env.get(PIPELINES_ENV) else ((), ())
    taken = {s.name for s in (*shipped, *shipped_refills)}
    seen: set[str] = set()
    for spec in (*declared, *declared_refills):
        if spec.name in taken:
            raise DeclarationError(
                f"{PIPELINES_ENV}: {env[PIPELINES_ENV]} declares {spec.name!r}, the name of a shipped pipeline: "
                f"rename it, or leave the shipped one out with {SHIPPED_ENV}"
            )
        if spec.name in seen:
            raise DeclarationError(f"{PIPELINES_ENV}: {env[PIPELINES_ENV]} declares {spec.name!r} twice")
        seen.add(spec.name)
    return with_sinks_from_env((*shipped, *declared), (*shipped_refills, *declared_refills), env)


def _kept(shipped: tuple, refills: tuple, setting: str) -> tuple[tuple, tuple]:
    setting = setting.strip()
    if setting == "all":
        return shipped, refills
    if setting == "none":
        return (), ()
    names = {n.strip() for n in setting.split(",") if n.strip()}
    known = {s.name for s in (*shipped, *refills)}
    if not names or names - known:
        raise DeclarationError(
            f"{SHIPPED_ENV}={setting!r}: use all, none or names of shipped pipelines ({', '.join(sorted(known))})"
        )
    return tuple(s for s in shipped if s.name in names), tuple(s for s in refills if s.name in names)


def with_sinks_from_env(pipelines: tuple, refills: tuple, env: Mapping[str, str]) -> tuple[tuple, tuple]:
    """The specs with the redrive sink of each `EVENT_REPLAY_SINK__<NAME>` replaced. A variable that
    names no pipeline is an error, not ignored: it would be a typo that silently sends elsewhere."""
    by_var: dict[str, object] = {}
    for spec in (*pipelines, *refills):
        var = SINK_ENV_PREFIX + spec.name.upper()
        if var in by_var and var in env:
            raise DeclarationError(f"{var}: pipelines {by_var[var].name!r} and {spec.name!r} share this variable")
        by_var[var] = spec
    sinks = {}
    for var, text in env.items():
        if not var.startswith(SINK_ENV_PREFIX):
            continue
        if var not in by_var:
            names = ", ".join(s.name for s in (*pipelines, *refills))
            raise DeclarationError(f"{var} names no pipeline; the pipelines are {names}")
        try:
            sinks[by_var[var].name] = sink_from_text(text)
        except _Bad as exc:
            raise DeclarationError(f"{var}={text!r}: {exc}") from None

    def resink(spec):
        if spec.name not in sinks:
            return spec
        try:
            return dataclasses.replace(spec, redrive=dataclasses.replace(spec.redrive, sink=sinks[spec.name]))
        except ValueError as exc:
            raise DeclarationError(f"{SINK_ENV_PREFIX}{spec.name.upper()}: {exc}") from None

    return tuple(map(resink, pipelines)), tuple(map(resink, refills))


def dead_letters_var(system: str) -> str:
    return DEAD_LETTERS_ENV_PREFIX + system.upper()


def dead_letters_from_env(
    systems: Mapping[str, Mapping[str, tuple[type, object]]], env: Mapping[str, str]
) -> dict[str, tuple[tuple[DeadLettersSpec, dict], ...]]:
    """Dead-letter sources of each system from its `EVENT_REPLAY_DEAD_LETTERS__<NAME>`, each with
    its launch options. `systems`: name -> launch options (option -> (type, default or REQUIRED)).
    A variable that names no system is an error: a typo would silently watch nothing."""
    by_var = {dead_letters_var(name): name for name in systems}
    found = {}
    for var, text in env.items():
        if not var.startswith(DEAD_LETTERS_ENV_PREFIX):
            continue
        if var not in by_var:
            names = ", ".join(dead_letters_var(n) for n in systems)
            raise DeclarationError(f"{var} names no served system (the name is upper case): set one of {names}")
        name = by_var[var]
        try:
            sources = tuple(dead_letters_from_text(part, systems[name]) for part in text.split(",") if part.strip())
        except _Bad as exc:
            raise DeclarationError(f"{var}={text!r}: {exc}") from None
        if not sources:
            raise DeclarationError(f"{var} is set but empty: give <kind>:<name>[?option=value&...] or unset it")
        labels = [s.label for s, _ in sources]
        if len(set(labels)) < len(labels):
            raise DeclarationError(f"{var}={text!r}: a source is listed twice")
        found[name] = sources
    return found


def dead_letters_from_text(text: str, launch: Mapping[str, tuple[type, object]]) -> tuple[DeadLettersSpec, dict]:
    """A dead-letter source and its launch options from `<kind>:<name>[?<option>=<value>&...]`.
    Raises `_Bad` (its callers say where the text came from)."""
    head, _, query = text.strip().partition("?")
    kind, _, name = head.partition(":")
    if not kind or not name:
        raise _Bad("", f"{text.strip()!r}: expected <kind>:<name>[?option=value&...], e.g. sqs:my-dlq?growth=50")
    hints = get_type_hints(DeadLettersSpec)
    own = [f.name for f in dataclasses.fields(DeadLettersSpec) if f.name not in ("kind", "name")]
    values: dict = {"kind": kind, "name": name, "running": True}  # set in the environment: meant to run
    options: dict = {}
    given: set[str] = set()
    for option in filter(None, query.split("&")):
        key, eq, raw = option.partition("=")
        if key in given:
            raise _Bad("", f"option {key!r} is given twice")
        if not eq or (key not in own and key not in launch):
            raise _Bad(
                "", f"{option!r} is not an option of this dead-letter source (options: {', '.join([*own, *launch])})"
            )
        given.add(key)
        if key in own:
            values[key] = _from_text(hints[key], raw, key)
        else:
            options[key] = _from_text(launch[key][0], raw, key)
    for key, (_, default) in launch.items():
        if key not in options:
            if default is REQUIRED:
                raise _Bad("", f"{head}: option {key!r} is required for this system (?{key}=...)")
            options[key] = default
    return _build_dataclass(DeadLettersSpec, values, ""), options


# ---- loading a declaration -------------------------------------------------------------------------


def load(ref: str) -> tuple[tuple[PipelineSpec, ...], tuple]:
    """(pipelines, refills) declared by `ref`: a YAML file, a `.py` file or a module name."""
    if ref.endswith((".yaml", ".yml")):
        return load_yaml(ref), ()
    if ref.endswith(".py") or _MODULE_NAME.fullmatch(ref):
        return _load_python(ref)
    raise DeclarationError(f"{PIPELINES_ENV}={ref!r}: name a .yaml/.yml file, a .py file or an importable module")


def load_yaml(path: str | Path) -> tuple[PipelineSpec, ...]:
    """The pipelines of a YAML file: `pipelines:`, a list of mappings, one per `PipelineSpec`."""
    label = Path(path).name
    try:
        with open(path, encoding="utf-8") as f:  # a file object: YAML's errors then name the file
            doc = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader that refuses duplicate keys
    except OSError as exc:
        raise DeclarationError(f"{PIPELINES_ENV}: cannot read {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DeclarationError(f"{label}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"pipelines"} or not isinstance(doc["pipelines"], list):
        raise DeclarationError(f"{label}: the file must hold one key, `pipelines:`, a list of pipelines")
    specs = []
    for i, body in enumerate(doc["pipelines"]):
        name = body.get("name") if isinstance(body, dict) else None
        where = f"pipeline {name!r}" if isinstance(name, str) else f"pipelines[{i}]"
        try:
            specs.append(_build(PipelineSpec, body, ""))
        except _Bad as exc:
            raise DeclarationError(f"{label}: {where}: {exc}") from None
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise DeclarationError(f"{label}: pipeline {name!r} is declared twice")
    return tuple(specs)


def _load_python(ref: str) -> tuple[tuple, tuple]:
    try:
        if ref.endswith(".py"):
            path = Path(ref).resolve()
            if not path.is_file():
                raise DeclarationError(f"{PIPELINES_ENV}: no file {ref}")
            # Registered under a name of its own, so worker processes can unpickle what it defines.
            name = "event_replay_declared_" + re.sub(r"\W", "_", path.stem)
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref)
    except DeclarationError:
        raise
    except ValueError as exc:  # a spec's own check, raised while the module builds it
        raise DeclarationError(f"{ref}: {exc}") from None
    except ImportError as exc:
        raise DeclarationError(
            f"{PIPELINES_ENV}: cannot import {ref} ({exc}): name a .yaml/.yml file, a .py file or an importable module"
        ) from None
    if not hasattr(module, "PIPELINES"):
        raise DeclarationError(f"{ref} defines no PIPELINES (a tuple of PipelineSpec)")
    from replay_defs.ingestion_refill.spec import RefillSpec

    pipelines, refills = tuple(module.PIPELINES), tuple(getattr(module, "REFILLS", ()))
    for what, specs, cls in (("PIPELINES", pipelines, PipelineSpec), ("REFILLS", refills, RefillSpec)):
        for spec in specs:
            if not isinstance(spec, cls):
                raise DeclarationError(f"{ref}: {what} holds {spec!r}, not a {cls.__name__}")
    return pipelines, refills


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a declaration must not lose one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep)


# ---- values -> spec classes --------------------------------------------------------------------------


def _build(hint, value, at: str):
    """`value` (from YAML) as an instance of the annotation `hint`, checked on the way."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _build(options[0], value, at) if len(options) == 1 else _build_by_kind(options, value, at)
    if origin is Literal:
        if value not in args:
            raise _Bad(at, f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _Bad(at, f"expected a list, got {_shown(value)}")
        return tuple(_build(args[0], item, f"{at}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(at, f"expected a mapping, got {_shown(value)}")
        return {_build(args[0], k, at): _build(args[1], v, _key(at, str(k))) for k, v in value.items()}
    if hint is SinkSpec:
        if not isinstance(value, str):
            return _build_by_kind(_sink_specs(), value, at)
        try:
            return sink_from_text(value)
        except _Bad as exc:
            raise _Bad(at, f"{value!r}: {exc}") from None
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, at)
    if hint is timedelta:
        return _duration(value, at)
    if hint is str and isinstance(value, date):
        return value.isoformat()  # YAML reads an unquoted 2025-01-01 as a date
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool) and type(value) is hint:
        return value
    if hint in (str, int, float, bool):
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        raise _Bad(at, f"expected {names[hint]}, got {_shown(value)}")
    raise _Bad(at, f"cannot be declared in a file ({hint})")


def _build_dataclass(cls, value, at: str):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not isinstance(value, dict):
        raise _Bad(at, f"expected a mapping (keys: {', '.join(fields)}), got {_shown(value)}")
    for key in value:
        if key not in fields:
            raise _Bad(at, f"unknown key {key!r} (the keys are {', '.join(fields)})")
    for name, f in fields.items():
        if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Bad(at, f"missing key {name!r}")
    hints = get_type_hints(cls)
    kwargs = {key: _build(hints[key], v, _key(at, key)) for key, v in value.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _Bad(at, str(exc)) from None


def _build_by_kind(classes, value, at: str):
    """One of several spec classes, chosen by the value's `kind` (each class's `kind` default)."""
    by_kind = {_kind_of(c): c for c in classes}
    kinds = ", ".join(by_kind)
    if not isinstance(value, dict) or "kind" not in value:
        raise _Bad(at, f"expected a mapping with a `kind` ({kinds}), got {_shown(value)}")
    if value["kind"] not in by_kind:
        raise _Bad(_key(at, "kind"), f"{value['kind']!r} is not one of {kinds}")
    return _build_dataclass(by_kind[value["kind"]], value, at)


def _kind_of(cls) -> str:
    return next(f.default for f in dataclasses.fields(cls) if f.name == "kind")


def _sink_specs() -> list[type]:
    return [t.spec for t in sink_types().values()]


def sink_from_text(text: str) -> SinkSpec:
    """A sink spec from `<kind>[:<destination>][?<option>=<value>&...]` (see the module's doc).
    Raises `_Bad` (its callers say where the text came from)."""
    head, _, query = text.strip().partition("?")
    kind, has_dest, destination = head.partition(":")
    types_ = sink_types()
    if kind not in types_:
        raise _Bad("", f"sink kind {kind!r} is not one of {', '.join(types_)}")
    cls = types_[kind].spec
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name != "kind"]
    needed = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    values: dict = {"kind": kind}
    if needed:
        if not destination:
            raise _Bad("", f"the {kind} sink needs its {needed[0]}: {kind}:<{needed[0]}>")
        values[needed[0]] = destination
    elif has_dest:
        raise _Bad("", f"the {kind} sink takes no destination")
    for option in filter(None, query.split("&")):
        key, eq, raw = option.partition("=")
        if not eq or key not in hints or key == "kind" or key in values:
            options = ", ".join(f.name for f in fields if f.name not in values)
            raise _Bad("", f"{option!r} is not an option of the {kind} sink (options: {options or 'none'})")
        values[key] = _from_text(hints[key], raw, key)
    return _build_dataclass(cls, values, "")


def _from_text(hint, raw: str, at: str):
    """An option's text as what its annotation wants (`_build_dataclass` checks it further)."""
    options = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) else []
    if options and raw.lower() in ("", "none", "null"):
        return None
    target = options[0] if len(options) == 1 else hint
    try:
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
    except ValueError:
        raise _Bad(at, f"expected a number, got {raw!r}") from None
    if target is bool:
        if raw.lower() not in ("true", "false"):
            raise _Bad(at, f"expected true or false, got {raw!r}")
        return raw.lower() == "true"
    return raw


def _duration(value, at: str) -> timedelta:
    """Seconds as a number, or text such as `90s`, `30m`, `3h`, `1d`, `1h30m`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    m = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m or not value.strip():
        raise _Bad(at, f"expected a duration such as 90s, 30m, 3h, 1d or 1h30m, got {_shown(value)}")
    d, h, mins, s = (int(x or 0) for x in m.groups())
    return timedelta(days=d, hours=h, minutes=mins, seconds=s)


def _key(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _shown(value) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"
