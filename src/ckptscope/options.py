"""Options declared once: a dataclass whose fields carry their default, help text and check.

Analyzers (`Analyzer.Options`), sources (`SourceSpec`) and executors (`ExecutorSpec`) declare
their options this way, and everything else is derived from the declaration: the CLI flags
(`ckptscope.cli` builds click options from `declared()`), the Python keyword arguments
(`build()` takes them by name), the provenance stored in `runs.parameters` (`provenance()`)
and the one-line errors (`build()` names the flag and what it accepts). Validation runs in
`build()`, before any store is opened, so a bad value never touches the store.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ckptscope.errors import CkptscopeError

Check = Callable[[Any], "str | None"]  # returns what is wrong with a value, or None when it is fine
T = TypeVar("T", bound="Options")


def option(default: Any = MISSING, *, help: str, check: Check | None = None, choices: Iterable[str] | None = None,
           metavar: str | None = None, digest: bool = False, flag: str | None = None, affects_results: bool = True,
           normalize: Callable[[Any], Any] | None = None) -> Any:
    """Declare one option field.

    `default` MISSING makes the option required. `check(value)` returns an error fragment
    ("must be in (0, 1)") for a bad value. `choices` restricts a string. `digest` (path options)
    stores the file's sha256 in the provenance, so a changed file counts as a changed parameter.
    `flag` overrides the CLI flag (default `--name-with-dashes`). `affects_results=False` marks
    options that change how, not what, is computed (batch sizes, memory budgets): they are stored
    but a rerun that changes them is not a changed parameter. `normalize` maps a coerced value to
    its canonical form (e.g. "Final" -> "final"), so equal meanings compare equal on a rerun.
    """
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None,
            "metavar": metavar, "digest": digest, "flag": flag, "affects_results": affects_results, "normalize": normalize}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Declared:
    """One option as the CLI and error messages see it."""

    name: str
    type: type  # int, float, str, bool or Path (Optional unwrapped)
    default: Any
    required: bool
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    optional: bool  # None is an accepted value
    flag: str


@dataclass(frozen=True)
class Options:
    """Base of every options declaration (subclasses are frozen dataclasses)."""

    owner: ClassVar[str] = "options"  # named in errors: "analyzer weights", "source"

    @classmethod
    def declared(cls) -> list[Declared]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind, optional = _unwrap(hints[f.name])
            out.append(Declared(f.name, kind, None if f.default is MISSING else f.default, f.default is MISSING,
                                f.metadata.get("help", ""), f.metadata.get("choices"), f.metadata.get("metavar"), optional,
                                f.metadata.get("flag") or "--" + f.name.replace("_", "-")))
        return out

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls: type[T], values: Mapping[str, Any] | None = None, **more: Any) -> T:
        """Coerce and check `values` (unknown names, wrong types and failed checks are one-line errors)."""
        given = {**(values or {}), **more}
        unknown = sorted(set(given) - cls.names())
        if unknown:
            raise CkptscopeError(f"{cls.owner} takes no option {', '.join(unknown)}; its options: "
                                 f"{', '.join(sorted(cls.names())) or 'none'}")
        kwargs = {}
        for d in cls.declared():
            if d.name not in given or given[d.name] is None and not d.optional:
                if d.required:
                    raise CkptscopeError(f"{cls.owner} needs {d.flag} ({d.help.rstrip('.')})")
                continue
            kwargs[d.name] = _coerce(cls, d, given[d.name])
        built = cls(**kwargs)
        built.validate()
        return built

    def validate(self) -> None:
        """Checks across options (one-line `CkptscopeError`); single options are checked by their `check`."""

    def provenance(self) -> dict[str, Any]:
        """The options as JSON values for `runs.parameters`: paths absolute, or for `digest` options the
        file name and its sha256 (the content decides the results; where it lay does not)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path) and f.metadata.get("digest"):  # the content decides; the name helps a reader
                out[f.name] = value.name
                out[f"{f.name}_sha256"] = file_digest(value)
            elif isinstance(value, Path):
                out[f.name] = str(value)
            else:
                out[f.name] = value
        return out

    def identity(self) -> dict[str, Any]:
        """What decides the results: the provenance, with a digested file known by its content alone."""
        prov = self.provenance()
        for f in dataclasses.fields(self):
            if f.metadata.get("digest") and f"{f.name}_sha256" in prov or not f.metadata.get("affects_results", True):
                prov.pop(f.name)
        return prov


@dataclass(frozen=True)
class NoOptions(Options):
    """For analyzers without options."""


def _unwrap(hint: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `Path` -> (Path, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return hint, False


def _coerce(cls: type[Options], d: Declared, value: Any) -> Any:
    if value is None:
        return None
    try:
        if d.type is bool:
            if isinstance(value, str):
                value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.strip().lower()]
            converted: Any = bool(value)
        elif d.type is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = int(value)
        elif d.type is float:
            converted = float(value)
        elif d.type is Path:
            converted = Path(value).expanduser().resolve()
        else:
            converted = str(value)
    except (ValueError, TypeError, KeyError):
        raise CkptscopeError(f"{d.flag} {value!r}: {cls.owner} expects {_kind(d.type)}") from None
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == d.name)
    if meta.get("normalize") is not None:
        converted = meta["normalize"](converted)
    if meta.get("digest") and not converted.is_file():
        raise CkptscopeError(f"{d.flag} {value!s}: no such file")
    if d.choices is not None and converted not in d.choices:
        raise CkptscopeError(f"{d.flag} {converted!r}: choose from {', '.join(d.choices)}")
    check = meta.get("check")
    problem = check(converted) if check is not None else None
    if problem:
        raise CkptscopeError(f"{d.flag} {value!r}: {problem}")
    return converted


def _kind(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", Path: "a file path"}.get(t, "text")


# -- checks -----------------------------------------------------------------------------------

def between(low: float, high: float) -> Check:
    """Open interval (low, high); NaN fails."""
    return lambda v: None if low < v < high else f"must be strictly between {low:g} and {high:g}"


def at_least(low: float) -> Check:
    return lambda v: None if v >= low and not (isinstance(v, float) and math.isnan(v)) else f"give at least {low:g}"


def existing_file(v: Path) -> str | None:
    return None if v.is_file() else "no such file"


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MB blocks; computed once per path, size and modification time
    (provenance is asked for at every step)."""
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
