"""The benchmarks' plots (matplotlib, drawn through :func:`jaxtok.metrics.save_plot`): one ``draw(ax)`` per figure,
built from a bench's result rows, so ``jaxtok bench`` and ``scripts/replot_results.py`` (which redraws a committed
``docs/results`` JSON without re-running anything) draw the same figure."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence


def draw_accuracy_vs_nfe(table: Sequence[Mapping[str, Any]], ax) -> None:
    """Held-out exact match against mean NFE, one marker per ``table`` row (``run``, ``mean_nfe``, ``exact_match``)
    named in a legend beside the axes (rows at the same point share a marker and a legend entry); log2 NFE axis,
    the first row's accuracy as a dashed reference. The plot of the diffusion bench and the commit-head script."""
    import matplotlib.pyplot as plt

    points: dict = {}
    for row in table:
        points.setdefault((round(float(row["mean_nfe"]), 4), round(float(row["exact_match"]), 6)), []).append(
            str(row["run"]))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for i, ((x, y), names) in enumerate(points.items()):
        ax.scatter(x, y, s=70, color=colours[i % len(colours)], marker=markers[i % len(markers)],
                   edgecolor="k", linewidth=0.5, zorder=3, label=f"{names[0]}  ({x:.2f} NFE, {y:.3f})" + "".join(f"\n  = {n}" for n in names[1:]))
    if table:
        ax.axhline(float(table[0]["exact_match"]), color="0.5", ls="--", lw=0.8, zorder=1,
                   label=f"reference: {table[0]['run']}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("mean NFE per row (forward passes per answer, log scale)")
    ax.set_ylabel("held-out exact match (fraction of prompts)")
    ax.set_title("diffusion decode policies: accuracy vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0, frameon=False)


def replot_accuracy_vs_nfe(results_json, png, command: str):
    """Redraw :func:`draw_accuracy_vs_nfe` from a written ``results.json`` (``rows``) into ``png``, captioned with
    ``command`` (the command that made the results); no decoding."""
    from jaxtok.metrics import save_plot

    rows = json.loads(Path(results_json).read_text())["rows"]
    return save_plot(png, functools.partial(draw_accuracy_vs_nfe, rows), command=command)


def draw_exact_match_vs_plan(table: Sequence[Mapping[str, Any]], placements: Sequence[str], ax) -> None:
    """Exact match against the plan length, one line per placement (each starting from the ``plan_tokens = 0``
    baseline row): the plot of the plan-conditioning bench."""
    for placement in placements:
        rows = [r for r in table if r["placement"] == placement or r["plan_tokens"] == 0]
        ax.plot([r["plan_tokens"] for r in rows], [r["exact_match"] for r in rows], marker="o", label=placement)
    ax.set_xlabel("plan tokens from the AR planner")
    ax.set_ylabel("exact match")
    ax.legend()
