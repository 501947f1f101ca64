"""Recipes: several stages run in order, each reusing earlier stages' outputs, cached by content.

A recipe YAML::

    stages:
      - {name: teacher, command: train, config: zoo/teacher.yaml}
      - {name: eval_teacher, command: eval, config: zoo/teacher.yaml,
         overrides: ["model.init_from=${stage:teacher}"]}
    summary: [eval/exact_match, eval/loss]      # optional: result keys shown in the summary table
    run: {out_dir: runs, name: my_recipe}       # optional: where the recipe's results go

A summary column is a result key (also the column's name) or a one-entry mapping ``{column: key}`` /
``{column: [key, key, ...]}``: the first key a stage's result has fills the cell, so rows of train stages
(``eval/exact_match``) and decode stages (``exact_match``) line up in one column. Besides its result, every
stage offers ``recipe/what`` (command and method, e.g. ``decode speculative/fixed``), ``recipe/time_s`` (seconds
this run spent on it; ``cached`` when reused), ``recipe/cpu_s`` (CPU seconds of this process on it, all threads)
and ``recipe/dir`` (its run directory). ``plots: [column, ...]`` draws one bar chart per named summary column
over the stages that have a number there (``<column>.png`` in the recipe run directory).

Config paths are relative to the recipe file. ``${stage:NAME}`` inside an override is replaced by the run
directory of the earlier stage NAME. Overrides given on the command line apply to every stage.

Caching: a stage's key hashes its command, its resolved config (with ``${stage:...}`` references left symbolic and
the output locations ``run.out_dir/name/cache_dir/progress`` left out), the text of every YAML file the config
names in its values (a sweep's or comparison's variant configs, with their ``base:`` chains) and the keys of the
stages it references,
so a change upstream reruns everything downstream and moving the cache does not. Outputs live in
``<run.cache_dir>/<name>-<key>/``; a ``DONE`` marker there (holding the stage's result) means the stage is reused
("cached"). A stage interrupted before ``DONE`` runs again in the same directory (training resumes from its last
checkpoint). The recipe's own run directory gets ``results.json`` and ``results.md`` with every stage's result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

from jaxtok.config import (
    Config, ConfigError, check_paths, load_config, read_yaml_file, to_dict, to_yaml, validate_names,
)
from jaxtok.handlers import get_handler
from jaxtok.metrics import markdown_table, write_results

STAGE_COMMANDS = ("train", "eval", "decode", "bench")
STAGE_KEYS = ("command", "config", "name", "overrides")
RECIPE_KEYS = ("run", "stages", "summary", "plots")
_STAGE_REF = re.compile(r"\$\{stage:([A-Za-z0-9_\-]+)\}")
_OUTPUT_KEYS = ("out_dir", "name", "cache_dir", "progress")  # where outputs go: not part of a stage's identity


@dataclasses.dataclass(frozen=True)
class Stage:
    """One recipe stage: ``command`` run on ``config`` (absolute path) with ``overrides``."""

    name: str
    command: str
    config: Path
    overrides: tuple[str, ...] = ()

    @property
    def upstream(self) -> list[str]:
        """Names of the earlier stages this stage references, in first-use order."""
        return list(dict.fromkeys(_STAGE_REF.findall(" ".join(self.overrides))))


# A summary column: its name and the result keys that may fill it, first present wins.
Column = tuple[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    summary: tuple[Column, ...] = ()  # summary table columns (default: every result key)
    out_dir: Optional[str] = None  # default: the first stage's run.out_dir
    name: Optional[str] = None  # default: the recipe file's stem
    plots: tuple[str, ...] = ()  # summary columns drawn as bar charts over the stages


def parse_columns(spec: Any, where: str = "summary") -> tuple[Column, ...]:
    """Summary columns from the recipe's ``summary`` list: each entry a key (``"tokens_per_s"``) or a one-entry
    mapping ``{column: key}`` / ``{column: [key, ...]}``. Raises ConfigError naming the bad entry."""
    if spec is None:
        return ()
    if not isinstance(spec, list):
        raise ConfigError(f"{where}={spec!r}: must be a list of result keys or {{column: [keys]}} mappings")
    cols: list[Column] = []
    for i, item in enumerate(spec):
        if isinstance(item, str) and item:
            col = (item, (item,))
        elif isinstance(item, dict) and len(item) == 1:
            (name, keys), = item.items()
            keys = [keys] if isinstance(keys, str) else keys
            if not isinstance(name, str) or not isinstance(keys, list) or not keys \
                    or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(f"{where}[{i}]={item!r}: a column maps its name to a key or a non-empty list "
                                  f"of keys")
            col = (name, tuple(keys))
        else:
            raise ConfigError(f"{where}[{i}]={item!r}: must be a result key or a one-entry mapping "
                              f"{{column: [keys]}}")
        if any(c[0] == col[0] for c in cols):
            raise ConfigError(f"{where}[{i}]: column {col[0]!r} appears twice")
        cols.append(col)
    return tuple(cols)


def read_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe file: known keys, unique stage names, known commands, existing configs, and
    ``${stage:NAME}`` references to earlier stages only. Raises ConfigError."""
    path = Path(path)
    data = read_yaml_file(path, "recipe") or {}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{path}: a recipe needs a non-empty 'stages' list")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown recipe key in {path}; allowed: {list(RECIPE_KEYS)}")
    run = data.get("run") or {}
    bad_run = sorted(set(run) - {"out_dir", "name"}) if isinstance(run, dict) else ["run"]
    if bad_run:
        raise ConfigError(f"run.{bad_run[0]}: unknown recipe key in {path}; allowed: ['name', 'out_dir']")
    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        key = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}={raw!r}: must be a mapping with keys {list(STAGE_KEYS)}")
        extra = sorted(set(raw) - set(STAGE_KEYS))
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key; allowed: {list(STAGE_KEYS)}")
        for req in ("name", "command", "config"):
            if req not in raw:
                raise ConfigError(f"{key}.{req}: missing")
        if raw["command"] not in STAGE_COMMANDS:
            raise ConfigError(f"{key}.command={raw['command']!r}: allowed {list(STAGE_COMMANDS)}")
        if any(s.name == raw["name"] for s in stages):
            raise ConfigError(f"{key}.name={raw['name']!r}: stage names must be unique")
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{key}.overrides={overrides!r}: must be a list of 'key=value' strings")
        config = (path.parent / str(raw["config"])).resolve()
        if not config.is_file():
            raise ConfigError(f"{key}.config={raw['config']!r}: no such file (paths are relative to the recipe)")
        stage = Stage(str(raw["name"]), raw["command"], config, tuple(overrides))
        for ref in stage.upstream:
            if not any(s.name == ref for s in stages):
                raise ConfigError(f"{key}.overrides: ${{stage:{ref}}} does not name an earlier stage; "
                                  f"earlier stages: {[s.name for s in stages]}")
        stages.append(stage)
    summary = parse_columns(data.get("summary"))
    plots = data.get("plots") or []
    if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
        raise ConfigError(f"plots={plots!r} in {path}: must be a list of summary column names")
    names = [c[0] for c in summary]
    for p in plots:
        if p not in names:
            raise ConfigError(f"plots: {p!r} is not a summary column; columns: {names}")
    return Recipe(tuple(stages), summary, run.get("out_dir"), run.get("name"), tuple(plots))


def is_recipe_file(path: str | Path) -> bool:
    """Whether ``path`` is a readable YAML mapping with a ``stages`` key (a recipe rather than a config)."""
    try:
        data = read_yaml_file(path)
    except ConfigError:
        return False
    return isinstance(data, Mapping) and "stages" in data


def validate_recipe(path: str | Path, overrides: Sequence[str] = ()) -> list[tuple[Stage, Config]]:
    """Read the recipe and load and check every stage's config with its overrides (and ``overrides``), with
    ``${stage:NAME}`` references standing for directories earlier stages create (input paths are not checked).
    Returns ``[(stage, cfg)]``; a bad stage raises ConfigError naming the stage."""
    out = []
    for st in read_recipe(path).stages:
        try:
            cfg = load_config(st.config, _resolve_refs(st.overrides, lambda n: f"<stage:{n}>") + list(overrides))
            validate_names(cfg)
        except ConfigError as e:
            raise ConfigError(f"stage {st.name!r} ({st.command} {st.config.name}): {e}") from None
        out.append((st, cfg))
    return out


def _named_config_files(value: Any, seen: Optional[dict] = None) -> dict:
    """``{path: sha256 of its text}`` for every existing YAML file a config names in a string value (``path.yaml``
    or ``key=path.yaml``, e.g. a sweep's ``bench.args.config`` or a variant's ``config=...`` override), with the
    ``base:`` chains and the files those files name, so editing any of them changes a stage's key."""
    seen = {} if seen is None else seen
    if isinstance(value, Mapping):
        for v in value.values():
            _named_config_files(v, seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _named_config_files(v, seen)
    elif isinstance(value, str):
        path = Path(value.split("=", 1)[-1].strip())
        if path.suffix in (".yaml", ".yml") and path.is_file() and str(path) not in seen:
            text = path.read_text()
            seen[str(path)] = hashlib.sha256(text.encode()).hexdigest()
            try:
                named = yaml.safe_load(text)
            except yaml.YAMLError:
                return seen  # hashed; loading it will report the error
            if isinstance(named, Mapping) and isinstance(named.get("base"), str):
                _named_config_files(str(path.parent / named["base"]), seen)
            _named_config_files(named, seen)
    return seen


def stage_key(cfg: Config, command: str, upstream: Sequence[str]) -> str:
    """Content hash of a stage: command, resolved config minus output locations, upstream stage keys, and the text
    of every config file the config names (:func:`_named_config_files`)."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in _OUTPUT_KEYS}
    blob = json.dumps({"command": command, "config": d, "upstream": list(upstream),
                       "files": _named_config_files(d)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _resolve_refs(overrides: Sequence[str], value_of: Callable[[str], str]) -> list[str]:
    return [_STAGE_REF.sub(lambda m: value_of(m.group(1)), o) for o in overrides]


def describe_stage(command: str, cfg: Config) -> str:
    """What a stage does, for the summary: ``train opd (entropy_sample)``, ``decode speculative/fixed``,
    ``decode diffusion/threshold``, ``bench train``, ``eval``."""
    if command == "train":
        sel = dict(cfg.objective.args).get("selection")
        rule = sel.get("rule") if isinstance(sel, Mapping) else None
        return f"train {cfg.objective.name}" + (f" ({rule})" if rule and rule != "all" else "")
    if command == "decode":
        d = cfg.decode
        return f"decode {d.method}" + (f"/{d.policy}" if d.policy else "")
    if command == "bench":
        return f"bench {cfg.bench.name}"
    return command


def stage_outputs(run_dir: Path) -> list[str]:
    """File names of a stage's results in ``run_dir``: tables, JSON summaries and plots."""
    names = [n for n in ("results.md", "results.json", "summary.json", "eval.json") if (run_dir / n).is_file()]
    return names + sorted(p.name for p in run_dir.glob("*.png"))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="stage", desc="recipe", position=0, leave=True,
                dynamic_ncols=True)


def run_recipe(path: str | Path, overrides: Sequence[str] = (), *, handlers: Optional[dict[str, Callable]] = None,
               out_dir: Optional[str | Path] = None) -> dict:
    """Run the recipe at ``path``; ``overrides`` apply to every stage. ``handlers`` maps a command to a
    ``(cfg, run_dir) -> dict`` function (default: the command's, :func:`jaxtok.handlers.get_handler`). Every stage
    is loaded and validated before any runs.
    Returns ``{stage name: result}``, writes ``results.json``/``results.md`` (and the recipe's ``plots``) into the
    recipe run directory and prints the summary table with the paths of every stage's results and plots."""
    recipe = read_recipe(path)
    handlers = dict(handlers or {})
    for st, _ in validate_recipe(path, overrides):  # every stage and its handler checked before anything runs
        if st.command not in handlers:
            handlers[st.command] = get_handler(st.command)
    dirs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    results: dict[str, dict] = {}
    info: dict[str, dict] = {}
    first_cfg = None
    n = len(recipe.stages)
    bar = None
    t_start, c_start = time.perf_counter(), time.process_time()
    try:
        for i, st in enumerate(recipe.stages):
            symbolic = load_config(st.config, _resolve_refs(st.overrides, lambda n: f"<stage:{n}>") + list(overrides))
            key = stage_key(symbolic, st.command, [keys[n] for n in st.upstream])
            run_dir = (Path(symbolic.run.cache_dir) / f"{st.name}-{key}").resolve()
            cfg = load_config(st.config, _resolve_refs(st.overrides, lambda n: str(dirs[n])) + list(overrides))
            if first_cfg is None:
                first_cfg = cfg
                bar = _progress(n, bool(cfg.run.progress))
            dirs[st.name], keys[st.name] = run_dir, key
            info[st.name] = {"recipe/what": describe_stage(st.command, cfg), "recipe/dir": str(run_dir)}
            bar.set_description(f"recipe [{st.name}]")
            done = run_dir / "DONE"
            if done.exists():
                results[st.name] = json.loads(done.read_text())
                info[st.name]["recipe/time_s"] = "cached"
                bar.write(f"[recipe {i + 1}/{n}] {st.name}: cached ({run_dir})")
                bar.update(1)
                continue
            check_paths(cfg)
            bar.write(f"[recipe {i + 1}/{n}] {st.name}: {st.command} {st.config.name} -> {run_dir}")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            t0, c0 = time.perf_counter(), time.process_time()
            result = handlers[st.command](cfg, run_dir) or {}
            info[st.name]["recipe/time_s"] = time.perf_counter() - t0
            info[st.name]["recipe/cpu_s"] = time.process_time() - c0  # this process, all threads
            result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
            tmp = run_dir / "DONE.tmp"
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(done)  # DONE appears only complete
            results[st.name] = result
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    total_s = time.perf_counter() - t_start
    rec_dir = Path(out_dir or recipe.out_dir or first_cfg.run.out_dir) / (recipe.name or Path(path).stem)
    rows = summary_rows(results, recipe.summary, info)
    plots = {name: functools.partial(_draw_barh, spec) for name, spec in summary_plots(rows, recipe.plots).items()}
    written = write_results(rec_dir, {"stages": results, "dirs": {k: str(v) for k, v in dirs.items()}, "keys": keys,
                                      "summary": rows, "info": info, "wall_s": total_s,
                                      "cpu_s": time.process_time() - c_start}, rows, plots=plots,
                            title=f"recipe {Path(path).name}")
    print(markdown_table(rows), end="")
    ran = sum(isinstance(v.get("recipe/time_s"), float) for v in info.values())
    print(f"recipe {Path(path).name}: {ran} of {n} stages run ({n - ran} reused) in {total_s:.1f} s")
    for name, d in dirs.items():
        outs = stage_outputs(d)
        print(f"  {name}: {d}" + (f"  [{', '.join(outs)}]" if outs else ""))
    print(f"recipe results: {rec_dir}  [{', '.join(sorted(Path(v).name for v in written.values()))}]")
    return results


def _cell(sources: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Any:
    """The value of the first of ``keys`` present (and not None) in the first of ``sources`` that has it."""
    for k in keys:
        for src in sources:
            if src.get(k) is not None:
                return src[k]
    return None


def summary_rows(results: Mapping[str, Mapping[str, Any]], columns: Sequence[Union[str, Column]] = (),
                 info: Optional[Mapping[str, Mapping[str, Any]]] = None) -> list[dict]:
    """One row per stage: ``stage`` and one cell per column (default: every result key of the stage).

    A column is a result key or ``(name, keys)``: the first of ``keys`` the stage's result (or its recipe ``info``:
    ``recipe/what``, ``recipe/time_s``, ``recipe/cpu_s``, ``recipe/dir``) holds fills the cell, so train stages'
    ``eval/exact_match`` and decode stages' ``exact_match`` share a column. Columns no stage fills are left out."""
    cols = [(c, (c,)) if isinstance(c, str) else (c[0], tuple(c[1])) for c in columns]
    rows = []
    for name, res in results.items():
        row: dict = {"stage": name}
        if not cols:
            row.update(res)
        else:
            sources = (res, (info or {}).get(name, {}))
            row.update({col: v for col, keys in cols if (v := _cell(sources, keys)) is not None})
        rows.append(row)
    if cols:  # one column order for every row; empty cells stay empty
        used = ["stage"] + [c for c, _ in cols if any(c in r for r in rows)]
        rows = [{c: r.get(c, "") for c in used} for r in rows]
    return rows


def summary_plots(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict:
    """Bar-chart specs (:func:`jaxtok.metrics.draw_spec`) of the numeric cells of ``columns`` over the stages;
    a column with no number in any row is skipped."""
    plots = {}
    for col in columns:
        pts = [(r["stage"], float(r[col])) for r in rows
               if isinstance(r.get(col), (int, float)) and not isinstance(r.get(col), bool)]
        if pts:
            plots[col.replace("/", "_")] = {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "kind": "bar",
                                            "xlabel": "stage", "ylabel": col, "title": col}
    return plots


def _draw_barh(spec: Mapping[str, Any], ax) -> None:
    """A :func:`summary_plots` spec as horizontal bars (stage names stay readable), first stage on top."""
    ys = range(len(spec["x"]))
    ax.barh(list(ys), spec["y"])
    ax.set_yticks(list(ys), [str(x) for x in spec["x"]])
    ax.invert_yaxis()
    for y, v in zip(ys, spec["y"]):
        label = f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        ax.annotate(label, (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel(spec["ylabel"])
    ax.set_title(spec["title"])
    ax.margins(x=0.15)
    ax.grid(alpha=0.3, axis="x")
