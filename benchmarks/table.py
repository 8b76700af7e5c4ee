"""The side-by-side table every benchmark prints: labels left-aligned, figures right-aligned."""


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print ``header`` and ``rows`` (all cells already formatted as text) in aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
