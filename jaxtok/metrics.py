"""Run outputs (DESIGN.md, principle 7): ``metrics.jsonl`` (:class:`MetricsWriter`), ``results.json``, a markdown
table ``results.md`` and PNG plots (:func:`write_results`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

PlotSpec = Union[Callable[[Any], None], Mapping[str, Any]]


class MetricsWriter:
    """Append-only ``<run_dir>/metrics.jsonl``: one JSON object per record, ``{"step", "time", **values}``.

    Values become Python floats (numpy/JAX scalars included; ints stay ints, strings pass through), so the file
    never holds arrays. Each record is written and closed at once: a killed run loses at most the line being
    written. ``enabled=False`` (e.g. on processes other than 0) makes ``write`` a no-op.

    A resumed training appends ``{"event": "resume", "from_step": k}``: records of steps after ``k`` written before
    it were redone (or lost with a damaged checkpoint); :func:`current_records` keeps the current ones.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: Mapping[str, Any], **extra: Any) -> Optional[dict]:
        """Append one record for ``step``; returns it (``None`` when disabled)."""
        if not self.enabled:
            return None
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v, k) for k, v in {**values, **extra}.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def read(self) -> list[dict]:
        """All records written so far."""
        return read_jsonl(self.path)


def _plain(v: Any, key: str) -> Any:
    """A JSON-able scalar: bool/int/str/None unchanged, other numbers (numpy, JAX 0-d arrays) as float."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}={v!r}: expected a scalar number") from None


def _fmt(v: Any) -> str:
    """A table cell: floats with 4 significant digits, ``|`` escaped, newlines as spaces."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


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
                  plots: Optional[Mapping[str, PlotSpec]] = None, title: str = "results",
                  command: Optional[str] = None) -> dict:
    """Write ``results.json``, ``results.md`` (a heading and the table) and one ``<name>.png`` per ``plots`` entry.

    A plot is either ``fn(ax)`` drawing on a matplotlib axis, or a spec (see :func:`draw_spec`):
    ``{"x": [...], "y": [...] or {label: [...]}, "kind": "line"|"scatter"|"bar", "xlabel", "ylabel", "title",
    "logx", "logy"}``. Every PNG is :data:`PLOT_SIZE` at :data:`PLOT_DPI` (1200 px wide) with ``command`` (default:
    this process's command line) as its caption (:func:`save_plot`). Returns the written paths by file name.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results.json": run_dir / "results.json", "results.md": run_dir / "results.md"}
    paths["results.json"].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    paths["results.md"].write_text(f"# {title}\n\n" + markdown_table(table))
    for name, draw in (plots or {}).items():
        paths[f"{name}.png"] = save_plot(run_dir / f"{name}.png", draw, command=command, name=name)
    return {k: str(v) for k, v in paths.items()}


PLOT_SIZE = (10.0, 6.0)  # inches; with PLOT_DPI: 1200 x 720 px
PLOT_DPI = 120


def script_args(cls, argv: list, prog: str, *, need_path: bool = False):
    """The settings dataclass ``cls`` of a ``scripts/`` benchmark from ``argv`` = ``[SETTINGS.yaml] [--key=value
    ...]`` (the file a mapping of ``cls``'s fields, each value parsed as YAML; lists become tuples); None after
    printing ``<prog>: config error: ...`` to stderr for a missing file, an unknown key (named, with the allowed
    ones) or a value ``cls`` refuses, so ``main`` returns exit code 2."""
    import dataclasses
    import sys

    import yaml

    path = argv[0] if argv and not argv[0].startswith("--") else None
    try:
        if need_path and path is None:
            raise ValueError(f"usage: python scripts/{prog}.py SETTINGS.yaml [--key=value ...]")
        raw = dict(yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        for kv in argv[1 if path else 0:]:
            k, _, v = kv.removeprefix("--").partition("=")
            raw[k] = yaml.safe_load(v)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; allowed: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (ValueError, TypeError, OSError, yaml.YAMLError) as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return None


def default_command() -> str:
    """This process's command line as a user would type it: ``jaxtok bench ...``, ``python -m pkg.mod ...`` or
    ``python path/to/script.py ...``."""
    import shlex
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if spec is not None and spec.name not in ("__main__", None):
        head = f"python -m {spec.name.removesuffix('.__main__')}"
    elif argv0.endswith(".py"):
        head = f"python {argv0}"
    else:
        head = Path(argv0).name
    return " ".join([head, *(shlex.quote(x) for x in sys.argv[1:])])


def save_plot(path: str | Path, draw: PlotSpec, command: Optional[str] = None, name: Optional[str] = None,
              size: Sequence[float] = PLOT_SIZE, dpi: int = PLOT_DPI) -> Path:
    """Draw one plot (``fn(ax)`` or a :func:`draw_spec` spec) into ``path``: ``size`` inches at ``dpi`` (default
    1200 x 720 px), constrained layout (no label cut off), and a caption line ``made by: <command>`` under the axes
    (``command`` defaults to this process's command line; ``""`` = no caption). ``fn(ax)`` may replace ``ax`` with
    several axes (``ax.get_subplotspec().subgridspec``)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    name = name or path.stem
    fig, ax = plt.subplots(figsize=tuple(size), dpi=dpi, layout="constrained")
    draw(ax) if callable(draw) else draw_spec(ax, draw, name)
    command = default_command() if command is None else command
    if command:
        width = int(size[0] * 13)  # characters of 8-pt text per line
        fig.supxlabel("\n".join(textwrap.wrap(f"made by: {command}", width, subsequent_indent="    ")),
                      fontsize=8, color="0.3", x=0.01, ha="left", family="monospace")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def draw_spec(ax, spec: Mapping[str, Any], name: str = "plot") -> None:
    """Draw a plot spec (see :func:`write_results`) on ``ax``; a bad spec raises ValueError naming the key."""
    allowed = {"x", "y", "kind", "xlabel", "ylabel", "title", "logx", "logy"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"plot {name!r}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}")
    if "y" not in spec:
        raise ValueError(f"plot {name!r}: 'y' is required")
    kind = spec.get("kind", "line")
    if kind not in ("line", "scatter", "bar"):
        raise ValueError(f"plot {name!r}: kind={kind!r}; allowed: ['bar', 'line', 'scatter']")
    series = spec["y"] if isinstance(spec["y"], Mapping) else {None: spec["y"]}
    n = len(series)
    for i, (label, ys) in enumerate(series.items()):
        xs = list(spec.get("x", range(len(ys))))
        if len(xs) != len(ys):
            raise ValueError(f"plot {name!r}: x has {len(xs)} values but y[{label!r}] has {len(ys)}")
        if kind == "bar":
            width = 0.8 / n
            ax.bar([j + (i - (n - 1) / 2) * width for j in range(len(xs))], ys, width, label=label)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        elif kind == "scatter":
            ax.scatter(xs, ys, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    ax.set_title(spec.get("title", name))
    if spec.get("logx"):
        ax.set_xscale("log")
    if spec.get("logy"):
        ax.set_yscale("log")
    if n > 1 or None not in series:
        ax.legend(loc="best", framealpha=0.9)
    ax.grid(alpha=0.3)


def _json_default(o):
    """JSON for NumPy scalars and arrays (JAX arrays convert through ``np.asarray``); anything else as ``str``."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) or hasattr(o, "__array__"):
        return np.asarray(o).tolist()
    return str(o)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def current_records(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``records`` (of a ``metrics.jsonl``) without those a later resume superseded: a ``{"event": "resume",
    "from_step": k}`` record drops the earlier records of steps after ``k`` (they were redone). Event records
    are kept."""
    out: list[dict] = []
    for r in records:
        if r.get("event") == "resume":
            k = int(r.get("from_step", 0))
            out = [x for x in out if "event" in x or int(x.get("step", 0)) <= k]
        out.append(dict(r))
    return out


def device_table_value(table: Mapping[str, float]) -> tuple[Optional[float], str]:
    """``(value, device kind)`` of the first ``table`` entry whose name occurs in the device kind of JAX's first
    device (e.g. ``"H100"`` in ``"NVIDIA H100 80GB HBM3"``), or ``(None, kind)`` for devices not in the table."""
    import jax

    kind = jax.devices()[0].device_kind
    for name, value in table.items():
        if name.lower() in kind.lower():
            return value, kind
    return None, kind
