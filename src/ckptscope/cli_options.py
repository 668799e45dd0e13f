"""Click options derived from `Options` declarations, so each option is written once.

`flags(declarations)` turns the declared fields of sources, executors and analyzers into click
options; their defaults stay in the declaration (click's default is None, so only what the user
typed is passed on, and `Options.build` fills in the rest and checks it). An option name that
analyzers declare with different types, or that an analyzer shares with a source or executor option
(`--seed` of a seed group and mp_fit's), gets one flag per analyzer, `--ANALYZER-NAME`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ckptscope.options import Declared


@dataclass(frozen=True)
class Flag:
    """One click option and where its value goes: a field `name`, of `owners` (None: every owner declaring it)."""

    param: str  # the click parameter's name
    name: str
    owners: tuple[str, ...] | None
    declared: Declared
    defaults: dict[str, Any] | None = None  # each owner's default, where owners share the flag


def _click_type(d: Declared) -> Any:
    if d.choices:
        return click.Choice(d.choices)
    return {int: click.INT, float: click.FLOAT, Path: click.Path(path_type=Path), str: click.STRING}.get(d.type, click.STRING)


def _help(d: Declared, owners: Iterable[str], defaults: dict[str, Any] | None = None) -> str:
    text = d.help
    if defaults and len(set(map(repr, defaults.values()))) > 1:  # owners sharing the flag differ: say whose is which
        text += " [default: " + ", ".join(f"{v} ({o})" for o, v in defaults.items()) + "]"
        return text
    default = d.default
    if not d.required and default is not None and default is not False and "[default" not in text:
        text += f" [default: {default}]"
    who = ", ".join(owners)
    return f"{text} ({who})" if who else text


def flags(groups: dict[str, list[Declared]], *, required: bool = False) -> list[Flag]:
    """Flags for declarations grouped by owner (an analyzer's name, or "" for source/executor).

    `required` marks required options as such (a command for one analyzer); otherwise the
    declaration's check reports them only when their owner is used.
    """
    by_name: dict[str, list[tuple[str, Declared]]] = {}
    for owner, decls in groups.items():
        for d in decls:
            by_name.setdefault(d.name, []).append((owner, d))
    out: list[Flag] = []
    for name, entries in by_name.items():
        kinds = {(d.type, d.choices) for _, d in entries}
        shadowed = "" in (o for o, _ in entries) and len(entries) > 1  # a source/executor option keeps its flag
        if len(kinds) == 1 and not shadowed:
            owners = tuple(o for o, _ in entries if o)
            d = entries[0][1]
            out.append(Flag(name, name, owners or None, d, {o: e.default for o, e in entries if o}))
        else:  # same name, other meaning: one flag per owner
            for owner, d in entries:
                if owner == "":
                    out.append(Flag(name, name, None, d))
                    continue
                qualified = f"{owner}_{name}"
                out.append(Flag(qualified, name, (owner,), Declared(qualified, d.type, d.default, d.required, d.help,
                                                                     d.choices, d.metavar, d.optional,
                                                                     f"--{owner}-{name}".replace("_", "-"))))
    return out


def apply(f: Callable, found: list[Flag], *, required: bool = False) -> Callable:
    """Decorate command `f` with the click options of `found`."""
    for flag in reversed(found):
        d = flag.declared
        owners = flag.owners or ()
        if d.type is bool:
            negative = "--no-" + d.flag.removeprefix("--")
            opt = click.option(f"{d.flag}/{negative}", flag.param, default=None, help=_help(d, owners, flag.defaults))
        else:
            opt = click.option(d.flag, flag.param, type=_click_type(d), default=None, metavar=d.metavar,
                               required=required and d.required, help=_help(d, owners, flag.defaults))
        f = opt(f)
    return f


def collect(found: list[Flag], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The values the user gave: (flat options by field name, options of one owner each by owner)."""
    flat: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for flag in found:
        value = values.pop(flag.param, None)
        if value is None:
            continue
        if flag.param != flag.name:
            scoped.setdefault(flag.owners[0], {})[flag.name] = value
        else:
            flat[flag.name] = value
    return flat, scoped
