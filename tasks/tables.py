"""Tables and cells as qsweep shows them: on the console (through rich) and in Markdown (cards, reports).

A console table is never folded into a terminal's width (a header cut into "downloa" / "d" reads
worse than a line the terminal wraps), so each row stays one line for grep and friends. It is
plain text either way: no colour, no trailing spaces, a box of ASCII where the output cannot take UTF-8.
"""

import io
import sys

UNLIMITED = 1 << 20  # the console width rich is given: rows are never wrapped


def format_value(v) -> str:
    """A cell as a user reads it: '' for nothing, integral floats without '.0', others to 6 significant digits."""
    if v is None:
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.6g}"
    return str(v)


def human_bytes(n: float | None) -> str:
    """Decimal units, as disks and the hub count: 850 B, 12.3 kB, 269.1 MB, 1.6 GB."""
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 999.95 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def console_table(columns: list[str], rows: list[list], right: tuple[str, ...] = ()) -> str:
    """Columns named in `right`, and those whose values are all numbers, are right-aligned."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # not markup: a cell of '[bold]' or '[-0.3, 0.1]' stays as written

    out = sys.stdout
    utf = (getattr(out, "encoding", None) or "utf-8").lower().startswith("utf")
    table = Table(box=box.SIMPLE_HEAD if utf else _ascii_head(), show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, name in enumerate(columns):
        numeric = rows and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                               for r in rows if r[i] is not None)
        table.add_column(Text(name), justify="right" if numeric or name in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(format_value(v)) for v in row))
    width = UNLIMITED
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """GitHub-flavoured Markdown lines; a '|' inside a cell is escaped."""
    cell = lambda s: str(s).replace("|", "\\|")
    return (["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def _ascii_head():
    from rich.box import Box

    return Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)  # SIMPLE_HEAD's layout in ASCII

