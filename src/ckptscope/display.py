"""Console output for the CLI: text from users, files and the store is shown exactly as it is.

Rich parses `[...]` as markup and `:name:` as emoji codes by default, so a model named
`gpt[lr=3e-3]` would print as `gpt` and `'x:x:y'` as `x❌y`. Every console here has markup,
emoji and highlighting off, and every table cell, header and title is a `rich.text.Text`, which
is never parsed, whatever console renders it. Styles are applied explicitly with `Text(style=...)`.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Collection
from typing import IO, Any

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

SIGNIFICANT = 6  # digits of floats in tables; csv/json/parquet keep every digit
DEFAULT_MAX_ROWS = 40  # rows `sql` prints to a terminal unless --max-rows says otherwise
UNBOUNDED_WIDTH = 1 << 20  # a table written to a file has no terminal to fit


def console(*, stderr: bool = False, file: IO[str] | None = None, width: int | None = None) -> Console:
    """A console that prints text verbatim: no markup, no emoji codes, no highlighting."""
    return Console(stderr=stderr, file=file, width=width, markup=False, emoji=False, highlight=False)


def cell(value: Any) -> str:
    """One value as shown in a table: floats to `SIGNIFICANT` digits, lists element-wise, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT}g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value)


def _unbreakable(dtype: pl.DataType) -> bool:
    """Numbers, booleans and times are never wrapped over lines; text may be."""
    return dtype.is_numeric() or dtype.is_temporal() or dtype == pl.Boolean


def table(df: pl.DataFrame, title: str | None = None, whole: Collection[str] = ()) -> Table:
    """`df` as a rich table that fits the console: number columns and the `whole` ones keep one
    line each and are shortened last; other text columns wrap at spaces, and words that do not
    fit end in an ellipsis."""
    out = Table(title=Text(title) if title is not None else None, title_justify="left")
    for name, dtype in df.schema.items():
        one_line = _unbreakable(dtype) or name in whole
        out.add_column(Text(name), no_wrap=one_line, overflow="ellipsis", justify="right" if dtype.is_numeric() else "left")
    for row in df.iter_rows():
        out.add_row(*(Text(cell(v)) for v in row))
    return out


def show(con: Console, df: pl.DataFrame, title: str | None = None, *, max_rows: int | None = None,
         whole: Collection[str] = ()) -> None:
    """Print `df` as a `table`; with `max_rows`, only its first rows, then a footer saying how
    many there are and how to see them all."""
    shown = df if not max_rows or df.height <= max_rows else df.head(max_rows)
    con.print(table(shown, title, whole))
    if shown.height < df.height:
        con.print(Text(f"{shown.height} of {df.height:,} rows shown; --max-rows N shows more, --max-rows 0 shows all "
                       "(--format csv, json or parquet: every row, exact values)", style="dim"), soft_wrap=True)


def line(con: Console, text: str, style: str | None = None) -> None:
    """One line, never wrapped by rich (a command printed this way can be copied whole)."""
    con.print(Text(text, style=style or ""), soft_wrap=True)


def shell_word(arg: str) -> str:
    """`arg` as one bash word that survives copy-paste: in double quotes when nothing in it is
    special there (SQL with 'literals' stays readable), else `shlex.quote`d."""
    if arg and not set(arg) & set('"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)
