"""Config schema, includes, overrides and error messages; CLI exit codes; recipes with caching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtok import cli, recipe
from jaxtok.config import Config, ConfigError, build_optimizer, describe, load_config, validate_names

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft" / "arith.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_include_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "data: {batch_size: 8, seq_len: 40}\noptimizer: {lr: 0.01}\n")
    write(tmp_path / "child.yaml", "base: base.yaml\ndata: {batch_size: 16}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optimizer.lr=0.5", "train.steps=7"])
    assert isinstance(cfg, Config)
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.optimizer.lr, cfg.train.steps) == (16, 40, 0.5, 7)


def test_include_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr_rate=1", ["optimizer.lr_rate", "allowed keys", "'lr'"]),
    ("train.steps=abc", ["train.steps", "abc"]),
    ("data.batch_size=0", ["data.batch_size", "0", ">= 1"]),
    ("optimizer.name=adamx", ["optimizer.name", "adamx", "adamw"]),
    ("decode.top_p=1.5", ["decode.top_p", "1.5"]),
    ("bogus.key=1", ["bogus"]),
])
def test_bad_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(SFT, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_method_names_and_args():
    with pytest.raises(ConfigError, match=r"objective.name='nope'.*allowed.*sft"):
        validate_names(load_config(SFT, ["objective.name=nope"]))
    with pytest.raises(ConfigError, match=r"data.task='nope'.*arith"):
        validate_names(load_config(SFT, ["data.task=nope"]))
    with pytest.raises(ConfigError, match=r"data.task_args.digitz.*digits"):
        validate_names(load_config(SFT, ["data.task_args.digitz=2"]))
    with pytest.raises(ConfigError, match=r"model.preset='huge'"):
        validate_names(load_config(SFT, ["model.preset=huge"]))


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "stages:" in path.read_text():
            recipe.read_recipe(path)
            continue
        validate_names(load_config(path))


def test_optimizer_schedules_build():
    import optax

    for sched in ("constant", "linear", "cosine", "warmup_cosine"):
        cfg = load_config(SFT, [f"optimizer.schedule={sched}", "optimizer.warmup_steps=5"])
        assert isinstance(build_optimizer(cfg.optimizer, 100), optax.GradientTransformation)


def test_describe_lists_documented_keys():
    keys = {k for k, _, _ in describe()}
    assert {"optimizer.lr", "data.task", "mesh.fsdp", "run.out_dir"} <= keys


def test_cli_exit_code_2_and_message(capsys):
    assert cli.main(["validate", str(SFT), "optimizer.lr_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr_rate" in err and "'lr'" in err
    assert cli.main(["validate", str(SFT)]) == 0
    assert "preset: tiny_student" in capsys.readouterr().out


def test_cli_subprocess_exit_code():
    r = subprocess.run([sys.executable, "-m", "jaxtok.cli", "validate", str(SFT), "optimizer.lr_rate=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "lr_rate" in r.stderr


def test_cli_writes_run_dir(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.HANDLERS, "train", lambda cfg, d: seen.setdefault("dir", d) and {"ok": 1})
    assert cli.main(["train", str(SFT), f"run.out_dir={tmp_path}", "run.name=r1"]) == 0
    assert seen["dir"] == tmp_path / "r1"
    assert load_config(tmp_path / "r1" / "config.yaml").run.name == "r1"


def test_recipe_runs_stages_in_order_and_caches(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, run_dir):
        calls.append((run_dir.name, cfg.model.init_from))
        (run_dir / "out.txt").write_text("x")
        return {"eval/exact_match": 0.5, "steps": cfg.train.steps}

    write(tmp_path / "r.yaml",
          f"stages:\n"
          f"  - {{name: a, command: train, config: {SFT}}}\n"
          f"  - {{name: b, command: eval, config: {SFT}, overrides: ['model.init_from=${{stage:a}}']}}\n")
    handlers = {"train": fake, "eval": fake}
    ovs = [f"run.cache_dir={tmp_path / 'cache'}", "train.steps=3"]
    res = recipe.run_recipe(tmp_path / "r.yaml", ovs, handlers=handlers, out_dir=tmp_path / "out")
    assert [c[0].split("-")[0] for c in calls] == ["a", "b"]
    assert calls[1][1] == str((tmp_path / "cache" / calls[0][0]).resolve())
    assert res["b"]["steps"] == 3
    assert json.loads((tmp_path / "out" / "r" / "results.json").read_text())["stages"]["a"]["eval/exact_match"] == 0.5
    recipe.run_recipe(tmp_path / "r.yaml", ovs, handlers=handlers, out_dir=tmp_path / "out")
    assert len(calls) == 2  # both cached
    recipe.run_recipe(tmp_path / "r.yaml", ovs[:1] + ["train.steps=4"], handlers=handlers, out_dir=tmp_path / "out")
    assert len(calls) == 4  # config changed -> both rerun (b depends on a)


def test_recipe_errors(tmp_path):
    write(tmp_path / "bad.yaml", f"stages:\n  - {{name: a, command: fly, config: {SFT}}}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\].command='fly'"):
        recipe.read_recipe(tmp_path / "bad.yaml")
    write(tmp_path / "ref.yaml",
          f"stages:\n  - {{name: a, command: train, config: {SFT}, overrides: ['model.init_from=${{stage:z}}']}}\n")
    with pytest.raises(ConfigError, match="earlier stage"):
        recipe.read_recipe(tmp_path / "ref.yaml")
