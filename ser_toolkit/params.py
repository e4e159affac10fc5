"""Declared, validated plugin parameters (name, type, default, unit, allowed values).

Plugins declare a tuple of :class:`Param`; :func:`validate` checks user values at
construction time (audiomentations style), so a bad value fails before any work,
with a message naming the parameter and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ser_toolkit.errors import ParameterError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "path": str}


@dataclass(frozen=True)
class Param:
    """One plugin parameter.

    ``type`` is one of ``int``, ``float``, ``str``, ``bool``, ``path``, or a list
    form ``list[float]`` / ``list[int]`` / ``list[str]`` (values given on the command
    line as ``a,b,c``). ``choices`` restricts values (each element for list types),
    ``min``/``max`` bound numbers inclusively. ``default=None`` means "not set".
    """

    name: str
    default: Any
    help: str
    type: str = "str"
    choices: Sequence[Any] | None = None
    min: float | None = None
    max: float | None = None
    unit: str | None = None
    nullable: bool = field(default=False)

    @property
    def is_list(self) -> bool:
        return self.type.startswith("list[")

    @property
    def base_type(self) -> str:
        return self.type[5:-1] if self.is_list else self.type

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for ``sertk plugins --json`` and docs)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "default": self.default,
                               "help": self.help}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.min is not None or self.max is not None:
            out["range"] = [self.min, self.max]
        if self.unit:
            out["unit"] = self.unit
        return out

    def allowed(self) -> str:
        """Human description of the allowed values."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        if self.min is not None and self.max is not None:
            parts.append(f"between {self.min} and {self.max}")
        elif self.min is not None:
            parts.append(f">= {self.min}")
        elif self.max is not None:
            parts.append(f"<= {self.max}")
        article = "an" if self.base_type[0] in "aeiou" else "a"
        kind = f"a list of {self.base_type}" if self.is_list else f"{article} {self.base_type}"
        return kind + (" " + " and ".join(parts) if parts else "")

    def _convert_one(self, value: Any, owner: str) -> Any:
        base = self.base_type
        try:
            if base == "bool":
                if isinstance(value, bool):
                    return value
                text = str(value).strip().lower()
                if text in {"1", "true", "yes", "on"}:
                    return True
                if text in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if base == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                return int(value)
            if base == "float":
                if isinstance(value, bool):
                    raise ValueError(value)
                out = float(value)
                if out != out or out in (float("inf"), float("-inf")):
                    raise ValueError(value)
                return out
            return str(value)
        except (TypeError, ValueError):
            raise ParameterError(
                f"{owner}: parameter '{self.name}' must be {self.allowed()} (got {value!r})",
                "fix the value",
            ) from None

    def validate(self, value: Any, owner: str) -> Any:
        """Convert ``value`` (e.g. a command-line string) and check it; return the clean value."""
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise ParameterError(f"{owner}: parameter '{self.name}' needs a value",
                                 f"allowed: {self.allowed()}")
        if self.is_list:
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            if not items:
                raise ParameterError(f"{owner}: parameter '{self.name}' must not be empty",
                                     f"allowed: {self.allowed()}")
            return [self._check(self._convert_one(v, owner), owner) for v in items]
        return self._check(self._convert_one(value, owner), owner)

    def _check(self, value: Any, owner: str) -> Any:
        bad = (self.choices is not None and value not in self.choices) or (
            self.min is not None and value < self.min) or (self.max is not None and value > self.max)
        if bad:
            raise ParameterError(
                f"{owner}: parameter '{self.name}' must be {self.allowed()} (got {value!r})",
                "fix the value",
            )
        return value


def validate(params: Iterable[Param], values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Resolve ``values`` against declared ``params``: every default filled in, every value checked.

    Unknown names raise :class:`ParameterError` listing the known ones.
    """
    params = tuple(params)
    known = {p.name: p for p in params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ParameterError(f"{owner}: unknown parameter '{unknown[0]}'",
                             f"known parameters: {names}")
    resolved: dict[str, Any] = {}
    for p in params:
        resolved[p.name] = p.validate(values.get(p.name, p.default), owner)
    return resolved


def parse_assignments(items: Sequence[str] | None) -> dict[str, str]:
    """Parse ``key=value`` strings from ``--set`` options into a dict."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--set expects key=value (got {item!r})",
                                 "write e.g. --set calm=neutral")
        out[key.strip()] = value.strip()
    return out
