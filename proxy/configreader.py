"""Schema-agnostic reading of a config file: `${VAR}` substitution, duplicate-aware YAML, and a
`Reader` that reads typed values from mappings, collecting every problem with its path.

Knows nothing of the gateway's settings (that is `configfile`'s job) and imports nothing of the app.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar, cast

import yaml

_REFERENCE = re.compile(r"\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?")


def substitute(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`text` with `${VAR}` references outside comment lines replaced, and the problems found."""
    problems: list[str] = []
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.lstrip().startswith("#"):
            lines[index] = _substitute_line(line, index + 1, env, problems)
    return "\n".join(lines), problems


def _substitute_line(line: str, number: int, env: Mapping[str, str], problems: list[str]) -> str:
    def resolve(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name is None:
            problems.append(f"line {number}: malformed ${{...}}; use ${{VAR}} or ${{VAR:-default}}")
        elif default is not None:
            return env.get(name) or default
        elif name in env:
            return env[name]
        else:
            problems.append(f"line {number}: environment variable {name} is not set")
        # Left as written, so an unset secret does not also surface as an empty field.
        return match[0]

    return _REFERENCE.sub(resolve, line)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records duplicate keys, of which plain YAML silently keeps the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [key for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        # A merge (`<<: *anchor`) may legitimately be overridden, so such mappings are skipped.
        if all(key.tag != "tag:yaml.org,2002:merge" for key in keys):
            seen: set[tuple[str, object]] = set()
            for key in keys:
                if (key.tag, key.value) in seen:
                    line = key.start_mark.line + 1
                    self.duplicates.append(f"line {line}: duplicate key {key.value}")
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> tuple[object, list[str]]:
    """The YAML document in `text`, and its problems: syntax, duplicate keys, not a mapping."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark else "top level"
        return None, [f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]
    finally:
        loader.dispose()
    problems = loader.duplicates
    if data is None:
        problems.append("top level: the file is empty")
    elif not isinstance(data, dict):
        problems.append("top level: must be a mapping")
    return data, problems


T = TypeVar("T")
D = TypeVar("D")
Rule = Callable[[Any], "str | None"]  # the problem with a value, or None
Spec = Mapping[str, tuple[type[Any], "Rule | None"]]  # field name -> (YAML type, rule)
# Integers travel through JSON to Redis' Lua, whose numbers are doubles: past 2^53 they are no
# longer exact (and past 2^64 they cannot be encoded at all).
MAX_INTEGER = 1 << 53
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class Reader:
    """Reads one mapping found at `path`: typed values, nested readers, and the keys nobody read."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.data: dict[Any, Any] = data if isinstance(data, dict) else {}
        self.read: set[str] = set()
        self.quiet = False
        if data is not None and not isinstance(data, dict):
            self.report("", "must be a mapping")
            self.quiet = True  # problems with its fields would only repeat this one

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def report(self, key: str, message: str) -> None:
        if not self.quiet:
            self.problems.append(f"{self.at(key)}: {message}")

    def get(
        self, key: str, kind: type[T], default: D, rule: Rule | None = None, required: bool = False
    ) -> T | D:
        """The value at `key` as `kind`; `default` when absent, null, or wrong (then reported)."""
        self.read.add(key)
        value = self.data.get(key)
        if value is None and kind is str and key in self.data:
            value = ""  # `key: ${VAR:-}` reads as YAML null; for a string that means empty
        if value is None:
            if required:
                self.report(key, "is required")
            return default
        converted = _convert(value, kind)
        if converted is None:
            self.report(key, f"must be {_KIND_NAMES[kind]}")
            return default
        if isinstance(converted, int) and abs(converted) > MAX_INTEGER:
            self.report(key, f"must be at most {MAX_INTEGER} (2^53)")
            return default
        problem = rule(converted) if rule else None
        if problem:
            self.report(key, problem)
            return default
        return converted

    def fill(self, defaults: T, spec: Spec, required: Collection[str] = ()) -> T:
        """`defaults` (a dataclass) with each field named in `spec` read from this mapping."""
        values = {
            key: self.get(key, kind, getattr(defaults, key), rule, key in required)
            for key, (kind, rule) in spec.items()
        }
        return cast(T, replace(cast(Any, defaults), **values))

    def strings(self, key: str, rule: Rule | None = None) -> tuple[str, ...] | None:
        """A list of distinct strings, in file order; None when absent."""
        value = self._container(key, list, "")
        if value is None:
            return None
        found: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                problem: str | None = "must be a string"
            else:
                problem = "duplicate entry" if item in found else rule(item) if rule else None
            if problem:
                self.report(f"{key}[{index}]", problem)
            else:
                found.append(item)
        return tuple(found)

    def section(self, key: str, build: Callable[[Reader], T]) -> T:
        self.read.add(key)
        return self._nested(self.data.get(key), key, build)

    def scalars(self, key: str, defaults: T, spec: Spec) -> T:
        return self.section(key, lambda reader: reader.fill(defaults, spec))

    def each(self, key: str, build: Callable[[Reader], T], least: str = "") -> list[T]:
        items = self._container(key, list, least) or []
        return [self._nested(item, f"{key}[{i}]", build) for i, item in enumerate(items)]

    def named(self, key: str, build: Callable[[str, Reader], T], least: str = "") -> dict[str, T]:
        built: dict[str, T] = {}
        for name, item in (self._container(key, dict, least) or {}).items():
            if isinstance(name, str) and name:
                built[name] = self._nested(item, f"{key}.{name}", partial(build, name))
            else:
                self.report(key, f"name {name!r} must be a non-empty string")
        return built

    def flag_repeats(self, key: str, values: Sequence[str], attribute: str, what: str) -> None:
        """Reports each non-empty value of list `key` that an earlier item already has."""

        def where(index: int) -> str:
            return self.at(f"{key}[{index}]" + (f".{attribute}" if attribute else ""))

        first: dict[str, int] = {}
        for index, value in enumerate(values):
            if value in first:
                self.problems.append(f"{where(index)}: same {what} as {where(first[value])}")
            elif value:
                first[value] = index

    def flag_unknown(self) -> None:
        for key in self.data:
            if key not in self.read:
                self.report(str(key), "unknown key")

    def _container(self, key: str, kind: type[list[Any]] | type[dict[Any, Any]], least: str) -> Any:
        """The list or mapping at `key` (None if absent or wrong); `least` names a required item."""
        self.read.add(key)
        value = self.data.get(key)
        if value is not None and not isinstance(value, kind):
            self.report(key, "must be a list" if kind is list else "must be a mapping")
            return None
        if least and not value:
            self.report(key, f"at least one {least} is required")
        return value

    def _nested(self, data: object, key: str, build: Callable[[Reader], T]) -> T:
        return read_mapping(data, self.at(key), self.problems, build)


def read_mapping(data: object, path: str, problems: list[str], build: Callable[[Reader], T]) -> T:
    """`build` applied to a reader of `data`; then every key it did not read is reported."""
    reader = Reader(data, path, problems)
    result = build(reader)
    reader.flag_unknown()
    return result


def _convert(value: object, kind: type[T]) -> T | None:
    """`value` as `kind`, or None when YAML gave another type. Bools are never numbers."""
    if isinstance(value, bool) != (kind is bool):
        return None
    if kind is float:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return cast(T, float(cast(float, value))) if finite else None
    if kind is int and isinstance(value, float):
        return cast(T, int(value)) if value.is_integer() else None
    return value if isinstance(value, kind) else None


def make_rule(test: Callable[[Any], object], message: str) -> Rule:
    return lambda value: None if test(value) else message


def one_of(*choices: str) -> Rule:
    return make_rule(lambda value: value in choices, f"must be one of {', '.join(choices)}")


def known(names: Collection[str], what: str) -> Rule:
    return lambda value: None if value in names else f"unknown {what} {value!r}"
