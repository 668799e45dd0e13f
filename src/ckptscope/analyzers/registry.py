"""Which analyzers exist: the built-in ones and those other packages add through entry points.

Built-in analyzers are the `Analyzer` subclasses defined in the modules of this package, each
module named after its analyzer, so adding one is adding its module. Another package adds one with an entry point in the group
`ckptscope.analyzers` whose name is the analyzer's name, as `--analyzers` and `runs.analyzer`
use it:

    [project.entry-points."ckptscope.analyzers"]
    frobenius_per_entry = "ckptscope_example.frobenius:FrobeniusPerEntry"
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

import ckptscope.analyzers as package
from ckptscope.analyzers.contract import Analyzer
from ckptscope.errors import CkptscopeError
from ckptscope.options import Options

GROUP = "ckptscope.analyzers"
DEFAULT = ("weights", "mp_fit", "circuits")  # within 25% of weights alone on CPU: docs/weight-analyzers.md


@dataclass(frozen=True)
class Found:
    """An installed analyzer, or the reason a plugin could not be loaded."""

    name: str
    origin: str  # "ckptscope" or the distribution that provides it
    cls: type[Analyzer] | None
    error: str | None = None


def _built_in(name: str) -> Found | None:
    """A built-in analyzer without importing the others: its module is named after it."""
    if not name.isidentifier() or importlib.util.find_spec(f"{package.__name__}.{name}") is None:
        return None
    module = importlib.import_module(f"{package.__name__}.{name}")
    cls = next((v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Analyzer)
                and v.__module__ == module.__name__ and v.name == name), None)
    return Found(name, "ckptscope", cls) if cls is not None else None


@cache
def discover() -> dict[str, Found]:
    """Every analyzer by name: built-ins first, then entry points (a plugin may not shadow a built-in)."""
    found: dict[str, Found] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Analyzer) and value.__module__ == module.__name__
                    and value.name):
                for table in value.tables:
                    table.check()
                found[value.name] = Found(value.name, "ckptscope", value)
    for ep in entry_points(group=GROUP):
        origin = ep.dist.name if ep.dist is not None else ep.value
        if ep.name in found:
            continue  # the built-in wins; `ckptscope analyzers` lists the built-in's origin
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
                raise TypeError(f"{ep.value} is not a ckptscope Analyzer subclass")
            if cls.name != ep.name:
                raise TypeError(f"entry point {ep.name!r} names analyzer {cls.name!r}; they must be equal")
            for table in cls.tables:
                table.check()
            found[ep.name] = Found(ep.name, origin, cls)
        except Exception as exc:  # a broken plugin must not break the others: report it when used
            found[ep.name] = Found(ep.name, origin, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return found


def get(name: str) -> type[Analyzer]:
    """The analyzer class called `name`, or a one-line error listing the installed ones."""
    found = _built_in(name) or discover().get(name)
    if found is None:
        raise CkptscopeError(f"unknown analyzer {name!r}; choose from: {', '.join(sorted(discover()))} "
                             "(`ckptscope analyzers` lists them)")
    if found.cls is None:
        raise CkptscopeError(f"analyzer {name!r} (from {found.origin}) cannot be loaded: {found.error}")
    return found.cls


def build(name: str, options: Options | Mapping[str, Any] | None = None) -> Analyzer:
    """An analyzer with its options checked (a built `Options` is taken as it is)."""
    cls = get(name)
    if not isinstance(options, Options):
        options = cls.Options.build(options or {})
    elif not isinstance(options, cls.Options):
        raise CkptscopeError(f"analyzer {name} takes {cls.Options.__name__}, not {type(options).__name__}")
    return cls(options)


def names(selection: str | list[str] | tuple[str, ...] | Mapping[str, Any] | None) -> list[str]:
    """Analyzer names of a selection: `"weights,convergence"`, a list, or a mapping name -> options."""
    if selection is None:
        return list(DEFAULT)
    if isinstance(selection, str):
        selection = [n.strip() for n in selection.split(",") if n.strip()]
    chosen = list(dict.fromkeys(selection))
    if not chosen:
        raise CkptscopeError(f"no analyzer chosen; choose from: {', '.join(sorted(discover()))}")
    for name in chosen:
        get(name)
    return chosen


def ordered(analyzers: list[Analyzer]) -> list[Analyzer]:
    """The analyzers with each after those it declares in `after` (otherwise in the given order)."""
    chosen = {a.name for a in analyzers}
    out: list[Analyzer] = []
    pending = list(analyzers)
    while pending:
        ready = next((a for a in pending if not (set(a.after) & chosen) - {b.name for b in out}), None)
        if ready is None:
            raise CkptscopeError(f"analyzers {', '.join(a.name for a in pending)} wait on each other (`after`)")
        out.append(ready)
        pending.remove(ready)
    return out
