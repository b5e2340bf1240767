"""How config sections are declared, loaded from TOML, environment and --set, and rendered back.

A schema is a frozen dataclass whose fields are section dataclasses of ``setting``s; a section
may define ``problem() -> (key, text) | None`` for a check that spans several of its keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

ENV_PREFIX = "P2P_NODE_"
# Prefixed variables that are not config keys (the CLI reads the first two itself, the libp2p
# layer the last: ``node.libp2p.patches.UNCHECKED_ENV``); everything else with the prefix must
# name a key, because a mistyped variable in a container would otherwise be ignored without a word.
RESERVED_ENV = frozenset({"P2P_NODE_CONFIG", "P2P_NODE_URL", "P2P_NODE_LIBP2P_UNCHECKED"})

T = TypeVar("T")
Schema = TypeVar("Schema")
Check = Callable[[Any], "str | None"]


class ConfigError(ValueError):
    """A configuration problem: one line naming the key (or file) and what is wrong with it."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"config error: {where}: {problem}")
        self.where = where
        self.problem = problem


def setting(default: T, help: str, *, check: Check | None = None, secret: bool = False) -> T:
    """A config field: its default, the help line the README reference shows, an optional check.

    ``check`` returns a problem description or None; ``secret`` keeps the value out of reprs
    and rendered files.
    """
    metadata = {"help": help, "check": check, "secret": secret}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)  # type: ignore[return-value]
    return field(default=default, metadata=metadata, repr=not secret)


# ---------------------------------------------------------------- schema introspection


@dataclass(frozen=True)
class _Key:
    section: str
    name: str
    type: Any
    default: Any
    help: str
    check: Check | None
    secret: bool

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"

    @property
    def is_table(self) -> bool:
        return typing.get_origin(self.type) is dict


@dataclass(frozen=True)
class _Section:
    name: str
    cls: type
    keys: dict[str, _Key]

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0]


_SCHEMAS: dict[type, dict[str, _Section]] = {}


def _sections(schema: type) -> dict[str, _Section]:
    """The sections and keys of ``schema``, read from its dataclasses once."""
    if schema in _SCHEMAS:
        return _SCHEMAS[schema]
    sections: dict[str, _Section] = {}
    section_types = typing.get_type_hints(schema)
    for section_field in dataclasses.fields(schema):
        section_cls = section_types[section_field.name]
        hints = typing.get_type_hints(section_cls)
        keys = {}
        for f in dataclasses.fields(section_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meta = f.metadata
            keys[f.name] = _Key(
                section_field.name, f.name, hints[f.name], default, meta["help"], meta["check"], meta["secret"]
            )
        sections[section_field.name] = _Section(section_field.name, section_cls, keys)
    envs = [key.env for section in sections.values() for key in section.keys.values()]
    assert len(envs) == len(set(envs)), "two config keys map to the same environment variable"
    _SCHEMAS[schema] = sections
    return sections


# ---------------------------------------------------------------- loading


def load_schema(
    schema: type[Schema],
    path: str | None,
    overrides: Mapping[str, str] = types.MappingProxyType({}),
    environ: Mapping[str, str] = os.environ,
) -> Schema:
    """Load ``schema`` from ``path`` (None: defaults only), then environment, then ``overrides``."""
    sections = _sections(schema)
    # "section.key" -> (value, where it came from); file values are still unchecked TOML.
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        for key, value in _file_values(sections, _read_toml(path)):
            values[key.path] = (value, "")
    for key, value, origin in _env_values(sections, environ):
        values[key.path] = (value, origin)
    for key, value, origin in _set_values(sections, overrides, values):
        values[key.path] = (value, origin)

    built = {}
    for section in sections.values():
        kwargs = {}
        for key in section.keys.values():
            if key.path in values:
                value, origin = values[key.path]
                kwargs[key.name] = _checked(key, value, origin)
        instance = section.cls(**kwargs)
        problem = getattr(instance, "problem", lambda: None)()
        if problem is not None:
            name, text = problem
            raise ConfigError(f"{section.name}.{name}", text)
        built[section.name] = instance
    return schema(**built)


def parse_set_options(pairs: Iterable[str]) -> dict[str, str]:
    """Turn ``--set section.key=value`` arguments into the ``overrides`` mapping."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair}", "expected section.key=value")
        overrides[key.strip()] = value
    return overrides


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(path, f"cannot read file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "invalid TOML: the file is not UTF-8") from None


def _file_values(sections: dict[str, _Section], data: dict[str, Any]) -> Iterator[tuple[_Key, Any]]:
    for section_name, table in data.items():
        section = sections.get(section_name)
        if section is None:
            raise ConfigError(section_name, "unknown section" + _suggest(section_name, sections))
        if not isinstance(table, dict):
            raise ConfigError(section_name, f"expected a table, got {describe(table)}")
        for name, value in table.items():
            key = section.keys.get(name)
            if key is None:
                path, known = f"{section_name}.{name}", [k.path for k in section.keys.values()]
                raise ConfigError(path, "unknown key" + _suggest(path, known))
            yield key, value


def _env_values(sections: dict[str, _Section], environ: Mapping[str, str]) -> Iterator[tuple[_Key, Any, str]]:
    # Free-form tables have no single value to set, so they take no environment variable.
    by_env = {
        key.env: key for section in sections.values() for key in section.keys.values() if not key.is_table
    }
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        key = by_env.get(name)
        if key is None:
            raise ConfigError(name, "unknown environment variable" + _suggest(name, by_env))
        yield key, _parse_text(key, environ[name], name), name


def _set_values(
    sections: dict[str, _Section], overrides: Mapping[str, str], earlier: Mapping[str, tuple[Any, str]]
) -> Iterator[tuple[_Key, Any, str]]:
    tables: dict[str, dict[str, Any]] = {}
    for dotted, text in overrides.items():
        section_name, _, rest = dotted.partition(".")
        name, _, subkey = rest.partition(".")
        section = sections.get(section_name)
        key = section.keys.get(name) if section else None
        if key is None:
            known = [k.path for s in sections.values() for k in s.keys.values()]
            raise ConfigError(dotted, "unknown key" + _suggest(dotted, known))
        if not key.is_table:
            if subkey:
                raise ConfigError(dotted, f"unknown key ({key.path} is not a table)")
            yield key, _parse_text(key, text, "--set"), "--set"
            continue
        if not subkey:
            raise ConfigError(dotted, f"is a table; set one entry with --set {dotted}.NAME=VALUE")
        if key.path not in tables:
            base, _ = earlier.get(key.path, (key.default, ""))
            if not isinstance(base, dict):
                raise ConfigError(key.path, f"expected a table, got {describe(base)}")
            tables[key.path] = _deep_copy(base)
        _set_nested(tables[key.path], subkey.split("."), _toml_scalar(text), dotted)
    for path, table in tables.items():
        section_name, _, name = path.partition(".")
        yield sections[section_name].keys[name], table, "--set"


def _set_nested(table: dict[str, Any], parts: list[str], value: Any, dotted: str) -> None:
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(dotted, f"{part} is not a table")
    table[parts[-1]] = value


def _deep_copy(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in table.items()}


def _toml_scalar(text: str) -> Any:
    """A --set value for a free-form table: a TOML value when it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------- types


def _checked(key: _Key, value: Any, origin: str) -> Any:
    """``value`` as ``key``'s type, after its check; ConfigError naming the key otherwise."""
    suffix = f" (from {origin})" if origin else ""
    try:
        typed = _coerce(key.type, value)
        problem = key.check(typed) if key.check else None
    except _Mismatch as mismatch:
        raise ConfigError(key.path + mismatch.index, mismatch.problem + suffix) from None
    if problem:
        raise ConfigError(key.path, problem + suffix)
    return typed


class _Mismatch(Exception):
    def __init__(self, problem: str, index: str = "") -> None:
        self.problem = problem
        self.index = index


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _Mismatch(f"expected {_type_phrase(tp)}, got {describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_type_phrase(tp)}, got {describe(value)}")
        item_type = typing.get_args(tp)[0]
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_coerce(item_type, item))
            except _Mismatch as mismatch:
                raise _Mismatch(mismatch.problem, f"[{index}]") from None
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"expected a table, got {describe(value)}")
        return value
    # bool is a subclass of int in Python but never a number in a config file.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Mismatch(f"expected a finite number, got {describe(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config fields cannot have type {tp!r}")
    raise _Mismatch(f"expected {_type_phrase(tp)}, got {describe(value)}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(key: _Key, text: str, origin: str) -> Any:
    """An environment or --set string as a value of ``key``'s type (checked later by ``_checked``)."""
    try:
        return _parse_as(key.type, text)
    except ValueError:
        problem = f"expected {_type_phrase(key.type)}, got {describe(text)} (from {origin})"
        raise ConfigError(key.path, problem) from None


def _parse_as(tp: Any, text: str) -> Any:
    if typing.get_origin(tp) is tuple:
        item_type = typing.get_args(tp)[0]
        return tuple(_parse_as(item_type, part.strip()) for part in text.split(",") if part.strip())
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(text.strip())
    if tp is float:
        return float(text.strip())
    return text


_PHRASES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false)"}


def _type_phrase(tp: Any) -> str:
    """How an error message names a type: "an integer", "an array of strings"."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "an array of " + _type_name(typing.get_args(tp)[0]) + "s"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(c) for c in typing.get_args(tp))
    if origin is dict:
        return "a table"
    return _PHRASES[tp]


def _type_name(tp: Any) -> str:
    """How the reference table names a type: "integer", "list of strings"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(json.dumps(c) for c in typing.get_args(tp))
    if origin is tuple:
        return "list of " + _type_name(typing.get_args(tp)[0]) + "s"
    if origin is dict:
        return "table"
    return {str: "string", int: "integer", float: "float", bool: "boolean"}[tp]


def describe(value: Any) -> str:
    """A value as an error message shows it: strings quoted (and shortened), containers by kind."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


# ---------------------------------------------------------------- rendering


def reference_table(schema: type) -> str:
    """A Markdown table of every key with its type, default and help, for the README."""
    lines = [
        "Every key is optional. `P2P_NODE_<SECTION>_<KEY>` environment variables (lists comma-separated)",
        "override the file, and `--set section.key=value` overrides both.",
        "",
        "| Key | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for section in _sections(schema).values():
        for key in section.keys.values():
            default = "`{}`" if key.is_table else f"`{_toml(key.default)}`"
            # Markdown would read "<data_dir>" as an HTML tag and "|" as a column break.
            help_text = key.help.replace("|", "\\|").replace("<", "\\<")
            lines.append(f"| `{key.path}` | {_type_name(key.type)} | {default} | {help_text} |")
    return "\n".join(lines) + "\n"


def render_toml(config: Any) -> str:
    """A commented TOML file, one key per setting with its help, that loads back to ``config``.

    Secret settings that differ from their default are left out (commented), so printing a
    resolved config never shows a token; they keep coming from where they were set.
    """
    out = [
        "# p2p-node configuration. Every key is optional; removing one restores its default.",
        "# P2P_NODE_<SECTION>_<KEY> environment variables and --set section.key=value override this file.",
    ]
    for section in _sections(type(config)).values():
        values = getattr(config, section.name)
        out += ["", f"# {section.summary}", f"[{section.name}]"]
        tables = []
        for key in section.keys.values():
            if key.is_table:
                tables.append(key)
                continue
            out += _comment(key.help)
            value = getattr(values, key.name)
            if key.secret and value != key.default:
                out.append(f"# {key.name} = (set, not shown)")
            else:
                out.append(f"{key.name} = {_toml(value)}")
        for key in tables:
            out += ["", *_comment(key.help), f"[{key.path}]"]
            out += [f"{_toml_key(k)} = {_toml(v)}" for k, v in getattr(values, key.name).items()]
    return "\n".join(out) + "\n"


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 96)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    # TOML basic strings forbid raw control characters; \uXXXX is valid for all of them.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)
