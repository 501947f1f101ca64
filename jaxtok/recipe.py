"""Recipes: several stages run in order, each reusing earlier stages' outputs, cached by content.

A recipe YAML::

    stages:
      - {name: teacher, command: train, config: zoo/teacher.yaml}
      - {name: eval_teacher, command: eval, config: zoo/teacher.yaml, overrides: ["model.init_from=${stage:teacher}"]}
    summary: [eval/exact_match, eval/loss]      # optional: result keys for the summary table

``${stage:NAME}`` inside an override is replaced by that earlier stage's run directory. Each stage's cache key
hashes its resolved config and its upstream keys; outputs live in ``<run.cache_dir>/<name>-<key>/`` and a ``DONE``
marker (holding the stage's result) means the stage is reused, not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from jaxtok.config import Config, ConfigError, load_config, to_dict, to_yaml, validate_names
from jaxtok.metrics import write_results

STAGE_COMMANDS = ("train", "eval", "decode", "bench")
_STAGE_REF = re.compile(r"\$\{stage:([A-Za-z0-9_\-]+)\}")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    command: str
    config: Path
    overrides: tuple[str, ...] = ()


def read_recipe(path: str | Path) -> tuple[list[Stage], list[str], dict]:
    """Parse and check a recipe file: stage names unique, commands known, configs present, references backward."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "stages" not in data:
        raise ConfigError(f"{path}: a recipe needs a 'stages' list")
    unknown = sorted(set(data) - {"stages", "summary", "run"})
    if unknown:
        raise ConfigError(f"{path}: unknown recipe key {unknown[0]!r}; allowed: ['run', 'stages', 'summary']")
    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        key = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: must be a mapping with name, command, config")
        extra = sorted(set(raw) - {"name", "command", "config", "overrides"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key; allowed: ['command', 'config', 'name', 'overrides']")
        for req in ("name", "command", "config"):
            if req not in raw:
                raise ConfigError(f"{key}.{req}: missing")
        if raw["command"] not in STAGE_COMMANDS:
            raise ConfigError(f"{key}.command={raw['command']!r}: allowed {list(STAGE_COMMANDS)}")
        if any(s.name == raw["name"] for s in stages):
            raise ConfigError(f"{key}.name={raw['name']!r}: stage names must be unique")
        overrides = tuple(raw.get("overrides") or ())
        for ov in overrides:
            for ref in _STAGE_REF.findall(ov):
                if not any(s.name == ref for s in stages):
                    raise ConfigError(f"{key}.overrides: ${{stage:{ref}}} does not name an earlier stage")
        stages.append(Stage(raw["name"], raw["command"], (path.parent / raw["config"]).resolve(), overrides))
    return stages, list(data.get("summary") or []), dict(data.get("run") or {})


def stage_key(cfg: Config, command: str, upstream: Sequence[str]) -> str:
    """Content hash of a stage: command, resolved config (minus where outputs go) and upstream keys."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("out_dir", "name", "cache_dir", "progress")}
    blob = json.dumps({"command": command, "config": d, "upstream": list(upstream)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_recipe(path: str | Path, overrides: Sequence[str] = (), *, handlers: Optional[dict[str, Callable]] = None,
               out_dir: Optional[str | Path] = None) -> dict:
    """Run a recipe; ``overrides`` apply to every stage. Returns ``{stage: result}`` and writes the recipe run
    directory (``results.json``, ``results.md``)."""
    from jaxtok.cli import HANDLERS

    handlers = handlers or HANDLERS
    stages, summary_keys, run_opts = read_recipe(path)
    dirs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    results: dict[str, dict] = {}
    # Resolve and validate every stage before running any (bad input loses nothing).
    resolved = []
    for st in stages:
        ovs = [_STAGE_REF.sub(lambda m: f"@stage:{m.group(1)}", o) for o in st.overrides] + list(overrides)
        cfg = load_config(st.config, [o for o in ovs if "@stage:" not in o])
        validate_names(cfg)
        resolved.append((st, ovs, cfg))
    cache_root = Path(run_opts.get("cache_dir") or resolved[0][2].run.cache_dir)
    for st, ovs, _ in resolved:
        ovs = [_sub_dirs(o, dirs) for o in ovs]
        cfg = load_config(st.config, ovs)
        upstream = [keys[n] for n in _STAGE_REF.findall(" ".join(st.overrides))]
        key = stage_key(cfg, st.command, upstream)
        run_dir = (cache_root / f"{st.name}-{key}").resolve()
        dirs[st.name], keys[st.name] = run_dir, key
        done = run_dir / "DONE"
        if done.exists():
            results[st.name] = json.loads(done.read_text())
            print(f"[recipe] {st.name}: cached ({run_dir})")
            continue
        print(f"[recipe] {st.name}: {st.command} {st.config.name} -> {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        result = handlers[st.command](cfg, run_dir) or {}
        result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        done.write_text(json.dumps(result, indent=2))
        results[st.name] = result
    rec_dir = Path(out_dir or run_opts.get("out_dir") or "runs") / Path(path).stem
    rows = []
    for name, res in results.items():
        row = {"stage": name}
        row.update({k: res[k] for k in (summary_keys or list(res)) if k in res})
        rows.append(row)
    write_results(rec_dir, {"stages": results, "dirs": {k: str(v) for k, v in dirs.items()}}, rows,
                  title=f"recipe {Path(path).name}")
    print((rec_dir / "results.md").read_text())
    return results


def _sub_dirs(override: str, dirs: dict[str, Path]) -> str:
    return re.sub(r"@stage:([A-Za-z0-9_\-]+)", lambda m: str(dirs[m.group(1)]), override)
