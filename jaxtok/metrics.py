"""Run outputs: ``results.json``, a markdown table and PNG plots (DESIGN.md, principle 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table of ``rows`` (columns: the union of keys in first-seen order)."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def write_results(run_dir: str | Path, results: Mapping[str, Any], table: Sequence[Mapping[str, Any]],
                  plots: Optional[Mapping[str, Callable]] = None, title: str = "results") -> dict:
    """Write ``results.json``, ``results.md`` (the table) and one PNG per ``plots`` entry.

    Each plot is ``fn(ax)`` drawing on a matplotlib axis; files are ``<name>.png``. Returns the written paths.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results.json": run_dir / "results.json", "results.md": run_dir / "results.md"}
    paths["results.json"].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    paths["results.md"].write_text(f"# {title}\n\n" + markdown_table(table))
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, draw in plots.items():
            fig, ax = plt.subplots(figsize=(5, 3.5))
            draw(ax)
            fig.tight_layout()
            paths[f"{name}.png"] = run_dir / f"{name}.png"
            fig.savefig(paths[f"{name}.png"], dpi=110)
            plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
