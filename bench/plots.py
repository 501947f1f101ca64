"""Every figure of the benchmarks (matplotlib, drawn through :func:`jaxtok.metrics.save_plot` /
:func:`jaxtok.metrics.write_results`): ``draw_*(..., ax)`` for a bench with one figure, ``*_plots(...) -> {name:
draw(ax)}`` for a bench with several, each built from the bench's result rows alone, so ``jaxtok bench`` and the
benches' ``replot`` functions (``scripts/replot_results.py``: a committed ``docs/results`` JSON redrawn without
re-running anything, through :func:`save_plots`) draw the same figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def draw_decode_tokens_per_s(rows: Sequence[Mapping[str, Any]], ax) -> None:
    """AR decode tokens/s against the batch size (log2 axis): the plot of the decode bench."""
    ax.plot([r["batch"] for r in rows], [r["decode_tokens_per_s"] for r in rows], "o-")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)


def draw_train_tokens_per_s(rows: Sequence[Mapping[str, Any]], ax) -> None:
    """Train-step tokens/s against the batch size, one line per (preset, objective) (log-log): the plot of the train
    bench."""
    for key in dict.fromkeys((r["preset"], r["objective"]) for r in rows):
        mine = [r for r in rows if (r["preset"], r["objective"]) == key]
        ax.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=" ".join(key))
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=6)


def draw_sweep_curves(mean_curves: Mapping[str, Mapping[int, float]], curve_key: str, ax) -> None:
    """Each variant's ``curve_key`` (mean over seeds) against the step: the plot of the sweep bench."""
    for variant, curve in mean_curves.items():
        ax.plot(list(curve), list(curve.values()), "o-", label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel(curve_key)
    ax.legend(fontsize=7)


def draw_accuracy_vs_nfe(table: Sequence[Mapping[str, Any]], ax) -> None:
    """Held-out exact match against mean NFE, one marker per ``table`` row (``run``, ``mean_nfe``, ``exact_match``)
    named in a legend beside the axes (rows at the same point share a marker and a legend entry); log2 NFE axis,
    the first row's accuracy as a dashed reference. The plot of the diffusion bench."""
    import matplotlib.pyplot as plt

    points: dict = {}
    for row in table:
        points.setdefault((round(float(row["mean_nfe"]), 4), round(float(row["exact_match"]), 6)), []).append(
            str(row["run"]))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for i, ((x, y), names) in enumerate(points.items()):
        label = f"{names[0]}  ({x:.2f} NFE, {y:.3f})" + "".join(f"\n  = {n}" for n in names[1:])
        ax.scatter(x, y, s=70, color=colours[i % len(colours)], marker=markers[i % len(markers)],
                   edgecolor="k", linewidth=0.5, zorder=3, label=label)
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


def draw_exact_match_vs_plan(table: Sequence[Mapping[str, Any]], placements: Sequence[str], ax) -> None:
    """Exact match against the plan length, one line per placement (each starting from the ``plan_tokens = 0``
    baseline row): the plot of the plan-conditioning bench."""
    for placement in placements:
        rows = [r for r in table if r["placement"] == placement or r["plan_tokens"] == 0]
        ax.plot([r["plan_tokens"] for r in rows], [r["exact_match"] for r in rows], marker="o", label=placement)
    ax.set_xlabel("plan tokens from the AR planner")
    ax.set_ylabel("exact match")
    ax.legend()


def speculative_plots(rows: list[dict], ead: list[dict]) -> dict:
    """The speculative bench's plots from its method ``rows`` and EAD rows: ``speedup`` (measured and cost-model
    speedup over AR per method), ``acceptance_by_position`` (acceptance rate by draft position) and
    ``ead_accuracy_vs_share`` (exact match against the share of large-model tokens, one point per threshold)."""
    labels = [r["method"] for r in rows]

    def speedup(ax):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["speedup"] for r in rows], 0.4, label="measured")
        ax.bar(x + 0.2, [r["cost_model_speedup"] for r in rows], 0.4, label="cost model")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("speedup over AR")
        ax.legend(fontsize=7)

    def by_position(ax):
        for r in rows:
            acc = [np.nan if a is None else a for a in r["acceptance_rate_by_position"]]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=r["method"])
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.legend(fontsize=5)

    def ead_curve(ax):
        pts = sorted(ead, key=lambda r: r["large_share"])
        ax.plot([r["large_share"] for r in pts], [r["exact_match"] for r in pts], "o-")
        for r in pts:
            ax.annotate(str(r["threshold"]), (r["large_share"], r["exact_match"]), fontsize=6)
        ax.set_xlabel("share of large-model tokens")
        ax.set_ylabel("exact match")

    return {"speedup": speedup, "acceptance_by_position": by_position, "ead_accuracy_vs_share": ead_curve}


def length_plots(rows: list, target_scales) -> dict:
    """The bench's plots from its result ``rows``: ``length_error`` (mean |length − target| per target, top-K sampling
    against each guided scale, values on the bars) and ``tilt`` (mean length and exact match against the tilt s)."""
    base = [r for r in rows if r["arm"].startswith("top-K @ ")]
    tilt = [r for r in rows if r["mode"] == "tilt"]
    policy = next((r for r in rows if r["arm"] == "policy"), None)
    errors = {"top-K sampling (no guide)": [r["length_abs_err"] for r in base]}
    for s in target_scales:
        errors[f"LenVM target guide, s={s:g}"] = [r["length_abs_err"] for r in rows
                                                 if r["mode"] == "target" and r["scale"] == s]
    targets = [r["target"] for r in base]

    def length_error(ax):
        n, width = len(errors), 0.8 / len(errors)
        for i, (label, ys) in enumerate(errors.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(ys))]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
        ax.set_xticks(range(len(targets)), [f"{t}" for t in targets])
        ax.set_xlabel("target length L (tokens)")
        ax.set_ylabel("mean |length − L| (tokens)")
        ax.set_title("LenVM length control: distance from the target length L")
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    def tilt_plot(ax):
        fig, spec = ax.figure, ax.get_subplotspec()
        ax.remove()
        left, right = (fig.add_subplot(g) for g in spec.subgridspec(1, 2, wspace=0.08))
        xs = [r["scale"] for r in tilt]
        for a, key, ylabel in ((left, "mean_length", "mean completion length (tokens)"),
                               (right, "exact_match", "held-out exact match (fraction of prompts)")):
            a.plot(xs, [r[key] for r in tilt], "o-", label="LenVM tilt guide")
            if policy is not None:
                a.axhline(policy[key], color="0.5", ls="--", lw=0.8, label="plain sampling (no guide)")
            a.set_xlabel("tilt s (log-odds per token; s > 0 favours short)")
            a.set_ylabel(ylabel)
            a.grid(alpha=0.3)
            a.legend(loc="lower left", frameon=False)
        left.set_title("length against tilt")
        right.set_title("accuracy against tilt")

    return {"length_error": length_error, "tilt": tilt_plot}


def rl_plots(acc_curves, clip_curves, shown, flop_curves, start_acc, reference) -> dict:
    """The RL comparison's plots: ``accuracy`` (held-out exact match against the optimizer step, one panel per
    variant, mean ± sd over seeds), ``gain_per_flop`` (accuracy gain against training FLOPs, ``reference`` vs
    ReasonMaxxer) and, when clip curves were logged, ``clip_by_position`` (clip rate by response position)."""
    legend_out = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    def accuracy(ax):  # one panel per variant (bands of 9 variants on one axis hide each other)
        fig, spec = ax.figure, ax.get_subplotspec()
        ax.remove()
        fig.set_size_inches(fig.get_figwidth(), fig.get_figwidth() * 0.8)  # taller: three rows of panels
        n = len(acc_curves)
        cols = min(3, n)
        rows = -(-n // cols)
        grid = spec.subgridspec(rows, cols, hspace=0.05, wspace=0.05)
        axes, first = [], None
        ref = acc_curves.get(reference)
        for i, (v, c) in enumerate(acc_curves.items()):
            a = fig.add_subplot(grid[i // cols, i % cols], sharex=first, sharey=first)
            first = first or a
            axes.append(a)
            m, sd = np.array(c["mean"], float), np.array(c["sd"], float)
            a.axhline(start_acc, color="k", lw=0.6, ls=":", label=f"start model {start_acc:.3f}")
            if ref is not None and v != reference:
                a.plot(ref["step"], ref["mean"], "--", color="0.55", lw=1, label=f"{reference} (mean)")
            a.fill_between(c["step"], m - sd, m + sd, color=f"C{i % 10}", alpha=0.2, label="± sd over seeds")
            a.plot(c["step"], m, "o-", ms=3, color=f"C{i % 10}", label="mean over seeds")
            a.set_title(v, fontsize=10, weight="bold", pad=3)
            a.grid(alpha=0.3)
            if i // cols == rows - 1 or i + cols >= n:
                a.set_xlabel("optimizer step")
            else:
                a.tick_params(labelbottom=False)
            if i % cols == 0:
                a.set_ylabel("held-out exact match (fraction)")
            else:
                a.tick_params(labelleft=False)
        handles = {}
        for a in axes:
            for h, lab in zip(*a.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncol=len(handles), frameon=False)

    def clip(ax):
        for v, c in clip_curves.items():
            ax.plot([t + 1 for t in shown], c, "o-", ms=4, label=v)
        ax.set_xlabel("response token position t (tokens from the start of the completion)")
        ax.set_ylabel("clip / rejection rate (fraction of tokens)")
        ax.set_title("clip (CPPO: mask-rejection) rate by response position, steps that reuse a rollout batch")
        ax.set_xticks([t + 1 for t in shown])
        ax.legend(**legend_out)
        ax.grid(alpha=0.3)

    def per_flop(ax):
        for v, c in acc_curves.items():
            if v != reference and not v.startswith("reasonmaxxer"):
                continue
            ax.plot(np.array(flop_curves[v]) / 1e12, 100 * (np.array(c["mean"], float) - start_acc), "o-", ms=4,
                    label=v)
        ax.set_xlabel("training compute (TFLOPs, model FLOPs)")
        ax.set_ylabel("held-out exact match gain (percentage points)")
        ax.set_title(f"accuracy gain against training compute: {reference} vs ReasonMaxxer (mean over seeds)")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(**legend_out)
        ax.grid(alpha=0.3)

    plots = {"accuracy": accuracy, "gain_per_flop": per_flop}
    if clip_curves:
        plots["clip_by_position"] = clip
    return plots


def save_plots(plots: Mapping[str, Callable], prefix: str | Path, command: str) -> list[Path]:
    """Each ``draw(ax)`` of ``plots`` into ``<prefix>_<name>.png`` (the file names published in docs/results),
    captioned with ``command``: how the benches' ``replot`` functions redraw a committed results JSON."""
    from jaxtok.metrics import save_plot

    prefix = Path(prefix)
    return [save_plot(prefix.parent / f"{prefix.name}_{name}.png", draw, command=command, name=name)
            for name, draw in plots.items()]
