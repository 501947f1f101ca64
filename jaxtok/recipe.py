"""Recipes: several stages run in order, each reusing earlier stages' outputs, cached by content.

A recipe YAML::

    stages:
      - {name: teacher, command: train, config: zoo/teacher.yaml}
      - {name: eval_teacher, command: eval, config: zoo/teacher.yaml,
         overrides: ["model.init_from=${stage:teacher}"]}
    summary: [eval/exact_match, eval/loss]      # optional: result keys shown in the summary table
    run: {out_dir: runs, name: my_recipe}       # optional: where the recipe's results go

Config paths are relative to the recipe file. ``${stage:NAME}`` inside an override is replaced by the run
directory of the earlier stage NAME. Overrides given on the command line apply to every stage.

Caching: a stage's key hashes its command, its resolved config (with ``${stage:...}`` references left symbolic and
the output locations ``run.out_dir/name/cache_dir/progress`` left out) and the keys of the stages it references,
so a change upstream reruns everything downstream and moving the cache does not. Outputs live in
``<run.cache_dir>/<name>-<key>/``; a ``DONE`` marker there (holding the stage's result) means the stage is reused
("cached"). A stage interrupted before ``DONE`` runs again in the same directory (training resumes from its last
checkpoint). The recipe's own run directory gets ``results.json`` and ``results.md`` with every stage's result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from jaxtok.config import Config, ConfigError, check_paths, load_config, to_dict, to_yaml, validate_names
from jaxtok.metrics import markdown_table, write_results

STAGE_COMMANDS = ("train", "eval", "decode", "bench")
STAGE_KEYS = ("command", "config", "name", "overrides")
RECIPE_KEYS = ("run", "stages", "summary")
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    summary: tuple[str, ...] = ()  # result keys for the summary table (default: all)
    out_dir: Optional[str] = None  # default: the first stage's run.out_dir
    name: Optional[str] = None  # default: the recipe file's stem


def read_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe file: known keys, unique stage names, known commands, existing configs, and
    ``${stage:NAME}`` references to earlier stages only. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
    return Recipe(tuple(stages), tuple(data.get("summary") or ()), run.get("out_dir"), run.get("name"))


def stage_key(cfg: Config, command: str, upstream: Sequence[str]) -> str:
    """Content hash of a stage: command, resolved config minus output locations, upstream stage keys."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in _OUTPUT_KEYS}
    blob = json.dumps({"command": command, "config": d, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _resolve_refs(overrides: Sequence[str], value_of: Callable[[str], str]) -> list[str]:
    return [_STAGE_REF.sub(lambda m: value_of(m.group(1)), o) for o in overrides]


def run_recipe(path: str | Path, overrides: Sequence[str] = (), *, handlers: Optional[dict[str, Callable]] = None,
               out_dir: Optional[str | Path] = None) -> dict:
    """Run the recipe at ``path``; ``overrides`` apply to every stage. ``handlers`` maps a command to a
    ``(cfg, run_dir) -> dict`` function (default: the CLI's). Every stage is loaded and validated before any runs.
    Returns ``{stage name: result}`` and writes ``results.json``/``results.md`` into the recipe run directory."""
    from jaxtok.cli import get_handler

    recipe = read_recipe(path)
    handlers = dict(handlers or {})
    for st in recipe.stages:  # names, arguments and handlers of every stage checked before anything runs
        cfg = load_config(st.config, _resolve_refs(st.overrides, lambda n: f"<stage:{n}>") + list(overrides))
        validate_names(cfg)
        if st.command not in handlers:
            handlers[st.command] = get_handler(st.command)
    dirs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    results: dict[str, dict] = {}
    first_cfg = None
    for st in recipe.stages:
        symbolic = load_config(st.config, _resolve_refs(st.overrides, lambda n: f"<stage:{n}>") + list(overrides))
        key = stage_key(symbolic, st.command, [keys[n] for n in st.upstream])
        run_dir = (Path(symbolic.run.cache_dir) / f"{st.name}-{key}").resolve()
        cfg = load_config(st.config, _resolve_refs(st.overrides, lambda n: str(dirs[n])) + list(overrides))
        first_cfg = first_cfg or cfg
        dirs[st.name], keys[st.name] = run_dir, key
        done = run_dir / "DONE"
        if done.exists():
            results[st.name] = json.loads(done.read_text())
            print(f"[recipe] {st.name}: cached ({run_dir})")
            continue
        check_paths(cfg)
        print(f"[recipe] {st.name}: {st.command} {st.config.name} -> {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        result = handlers[st.command](cfg, run_dir) or {}
        result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        tmp = run_dir / "DONE.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(done)  # DONE appears only complete
        results[st.name] = result
    rec_dir = Path(out_dir or recipe.out_dir or first_cfg.run.out_dir) / (recipe.name or Path(path).stem)
    rows = summary_rows(results, recipe.summary)
    write_results(rec_dir, {"stages": results, "dirs": {k: str(v) for k, v in dirs.items()}, "keys": keys}, rows,
                  title=f"recipe {Path(path).name}")
    print(markdown_table(rows), end="")
    print(f"recipe results: {rec_dir}")
    return results


def summary_rows(results: dict[str, dict], keys: Sequence[str] = ()) -> list[dict]:
    """One row per stage: its name and the result values named by ``keys`` (default: all of them)."""
    rows = []
    for name, res in results.items():
        row = {"stage": name}
        row.update({k: res[k] for k in (keys or list(res)) if k in res})
        rows.append(row)
    return rows
