"""Human-readable model summaries: a per-module parameter table with repeated layers folded together."""

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterRow:
    """One line of the table: ``name`` may contain ``*`` standing for every layer index."""

    name: str
    shape: tuple[int, ...]
    repeats: int  # how many layers share this row
    count: int  # parameters in all repeats together (0 when tied to another row)
    tied_to: str | None = None


def parameter_rows(model: nn.Module) -> list[ParameterRow]:
    """Rows in module order; ``layers.3.attn.q_proj.weight`` folds into ``layers.*.attn.q_proj.weight``."""
    first_name: dict[int, str] = {}
    groups: dict[str, list] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = re.sub(r"\.\d+\.", ".*.", name)
        tied_to = first_name.setdefault(id(param), name)
        group = groups.setdefault(key, [tuple(param.shape), 0, 0, None])
        group[1] += 1
        if tied_to == name:
            group[2] += param.numel()
        else:
            group[3] = tied_to
    return [ParameterRow(k, shape, n, count, tied) for k, (shape, n, count, tied) in groups.items()]


def format_parameter_table(model: nn.Module) -> str:
    """The parameter table as aligned text, ending with the total (tied matrices counted once)."""
    rows = parameter_rows(model)
    lines = [("module", "shape", "x", "parameters")]
    for row in rows:
        count = f"tied to {row.tied_to}" if row.tied_to else f"{row.count:,}"
        lines.append((row.name, "x".join(map(str, row.shape)), str(row.repeats), count))
    total = sum(p.numel() for p in model.parameters())
    lines.append(("total", "", "", f"{total:,}"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for i, line in enumerate(lines):
        out.append(f"{line[0]:<{widths[0]}}  {line[1]:>{widths[1]}}  {line[2]:>{widths[2]}}  {line[3]:>{widths[3]}}")
        if i == 0 or i == len(lines) - 2:
            out.append("-" * len(out[-1]))
    return "\n".join(out)
