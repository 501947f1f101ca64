"""CLI exit codes and run directories, recipes with caching, metrics and results writers (no JAX compute)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtok import cli, recipe
from jaxtok.config import ConfigError, load_config
from jaxtok.metrics import MetricsWriter, markdown_table, read_jsonl, write_results

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft" / "arith.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------------------ CLI


def test_validate_exit_code_2_names_key_and_allowed(capsys):
    assert cli.main(["validate", str(SFT), "optimizer.lr_rate=1"]) == 2
    captured = capsys.readouterr()
    assert "optimizer.lr_rate" in captured.err and "'lr'" in captured.err and "'weight_decay'" in captured.err
    assert captured.out == ""
    assert cli.main(["validate", str(SFT), "objective.name=nope"]) == 2
    assert "objective.name='nope'" in capsys.readouterr().err
    assert cli.main(["validate", str(SFT), "train.steps=700"]) == 0
    out = capsys.readouterr().out
    assert "preset: tiny_student" in out and "steps: 700" in out


def test_subprocess_exit_code_and_no_jax_import():
    code = ("import sys; from jaxtok import cli; rc = cli.main(sys.argv[1:]); "
            "print('jax' in sys.modules, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "train", str(SFT), "optimizer.lr_rate=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "optimizer.lr_rate" in r.stderr and "allowed keys of optimizer" in r.stderr
    assert r.stderr.strip().endswith("False")  # rejected before JAX was even imported
    assert "Traceback" not in r.stderr


def test_help_for_every_command(capsys):
    for command in ("train", "eval", "decode", "bench", "run", "convert", "validate"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        assert "usage: jaxtok " + command in capsys.readouterr().out


def test_bad_cli_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fly", str(SFT)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "sideways", "a", "b"])
    assert e.value.code == 2
    assert cli.main(["train", "no/such/config.yaml"]) == 2
    assert "no/such/config.yaml" in capsys.readouterr().err


def test_run_dir_holds_resolved_config(tmp_path, monkeypatch):
    seen = {}

    def fake_train(plan, run_dir):  # train/eval handlers receive the run plan validation built
        seen["cfg"], seen["dir"] = plan.cfg, run_dir
        return {"ok": 1}

    monkeypatch.setitem(cli.HANDLERS, "train", fake_train)
    assert cli.main(["train", str(SFT), f"run.out_dir={tmp_path}", "run.name=r1", "train.steps=300"]) == 0
    assert seen["dir"] == tmp_path / "r1"
    saved = load_config(tmp_path / "r1" / "config.yaml")
    assert saved == seen["cfg"] and saved.train.steps == 300
    # default name: the config file's stem
    monkeypatch.setitem(cli.HANDLERS, "eval", fake_train)
    write(tmp_path / "exp7.yaml", f"base: {SFT}\nrun: {{name: null}}\n")
    assert cli.main(["eval", str(tmp_path / "exp7.yaml"), f"run.out_dir={tmp_path}"]) == 0
    assert seen["dir"] == tmp_path / "exp7" and (tmp_path / "exp7" / "config.yaml").exists()


def test_missing_input_path_exits_2_before_run_dir(tmp_path, capsys):
    rc = cli.main(["train", str(SFT), f"run.out_dir={tmp_path}", "model.init_from=/no/such/run"])
    assert rc == 2
    assert "model.init_from='/no/such/run'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_model_paths_exit_2_naming_the_key(tmp_path, capsys):
    """A model path that is neither a jaxtok run nor an HF directory, or an HF directory of an unsupported
    architecture, stops the command with exit code 2 and one line naming the key, before the run directory."""
    import json
    import shutil

    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs"
    rc = cli.main(["train", str(SFT), f"run.out_dir={out}", f"rollout.teacher_init_from={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "rollout.teacher_init_from=" in err and "neither a jaxtok run directory" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    mistral = tmp_path / "mistral"
    shutil.copytree(Path(__file__).parent / "fixtures" / "hf" / "llama", mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    rc = cli.main(["decode", str(SFT), f"run.out_dir={out}", f"decode.draft_init_from={mistral}"])
    err = capsys.readouterr().err
    assert rc == 2 and "decode.draft_init_from=" in err and "unsupported architecture 'MistralForCausalLM'" in err
    assert err.count("\n") == 1 and not out.exists()


def test_missing_handler_module_gives_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.HANDLER_PATHS, "bench", ("jaxtok.no_such_module", "run_bench"))
    assert cli.main(["bench", str(SFT), f"run.out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "jaxtok.no_such_module does not exist" in err and "Traceback" not in err
    monkeypatch.setitem(cli.HANDLER_PATHS, "bench", ("jaxtok.metrics", "run_bench"))
    assert cli.main(["bench", str(SFT), f"run.out_dir={tmp_path}"]) == 1
    assert "jaxtok.metrics has no function run_bench()" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written for a command that cannot run


# --------------------------------------------------------------------------------------------------------- recipes


def _recipe(tmp_path: Path) -> Path:
    return write(tmp_path / "r.yaml",
                 f"stages:\n"
                 f"  - {{name: a, command: train, config: {SFT}}}\n"
                 f"  - {{name: b, command: eval, config: {SFT}, overrides: ['model.init_from=${{stage:a}}']}}\n"
                 f"summary: [score]\n")


def test_recipe_runs_in_order_passes_dirs_and_caches(tmp_path, capsys):
    calls = []

    def fake(cfg, run_dir):
        calls.append((run_dir, cfg.model.init_from))
        assert (run_dir / "config.yaml").exists()
        return {"score": 0.5, "steps": cfg.train.steps, "array": [1, 2]}

    handlers = {"train": fake, "eval": fake}
    ovs = [f"run.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'out'}", "train.steps=300"]
    res = recipe.run_recipe(_recipe(tmp_path), ovs, handlers=handlers)
    assert [c[0].name.split("-")[0] for c in calls] == ["a", "b"]
    assert calls[0][0].parent == (tmp_path / "cache").resolve()
    assert calls[1][1] == str(calls[0][0])  # ${stage:a} -> a's run dir
    assert res["b"] == {"score": 0.5, "steps": 300}  # non-scalar values left out
    out = json.loads((tmp_path / "out" / "r" / "results.json").read_text())
    assert out["stages"]["a"]["score"] == 0.5 and out["dirs"]["b"] == str(calls[1][0])
    assert "| stage | score |" in (tmp_path / "out" / "r" / "results.md").read_text()
    assert "| a | 0.5 |" in capsys.readouterr().out

    assert recipe.run_recipe(tmp_path / "r.yaml", ovs, handlers=handlers) == res
    assert len(calls) == 2 and capsys.readouterr().out.count("cached") == 2
    # a changed upstream reruns everything downstream; the cache location is not part of the key
    recipe.run_recipe(tmp_path / "r.yaml", ovs + ["train.steps=400"], handlers=handlers)
    assert len(calls) == 4
    moved = [f"run.cache_dir={tmp_path / 'cache2'}"] + ovs[1:]
    recipe.run_recipe(tmp_path / "r.yaml", moved, handlers=handlers)
    assert [c[0].name for c in calls[4:]] == [c[0].name for c in calls[:2]]


def test_recipe_interrupted_stage_reruns_in_same_dir(tmp_path):
    calls = []

    def fails_once(cfg, run_dir):
        calls.append(run_dir)
        if len(calls) == 1:
            raise RuntimeError("killed")
        return {"score": 1.0}

    ovs = [f"run.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'out'}"]
    with pytest.raises(RuntimeError, match="killed"):
        recipe.run_recipe(_recipe(tmp_path), ovs, handlers={"train": fails_once, "eval": fails_once})
    assert not (calls[0] / "DONE").exists()
    recipe.run_recipe(tmp_path / "r.yaml", ovs, handlers={"train": fails_once, "eval": fails_once})
    assert calls[1] == calls[0] and (calls[0] / "DONE").exists()


def test_recipe_through_cli_with_patched_handlers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.HANDLERS, "train", lambda cfg, d: {"score": 0.25})
    monkeypatch.setitem(cli.HANDLERS, "eval", lambda cfg, d: {"score": 0.75})
    args = ["run", str(_recipe(tmp_path)), f"run.cache_dir={tmp_path / 'c'}", f"run.out_dir={tmp_path / 'o'}"]
    assert cli.main(args) == 0
    assert "| b | 0.75 |" in capsys.readouterr().out
    assert cli.main(args + ["optimizer.lr=-1"]) == 2
    assert "optimizer.lr=-1.0" in capsys.readouterr().err


def test_recipe_errors(tmp_path):
    cases = {
        f"stages:\n  - {{name: a, command: fly, config: {SFT}}}\n": r"stages\[0\]\.command='fly'.*'train'",
        f"stages:\n  - {{name: a, command: train, config: {SFT}, overrides: ['model.init_from=${{stage:z}}']}}\n":
            r"\$\{stage:z\} does not name an earlier stage",
        f"stages:\n  - {{name: a, command: train, config: {SFT}}}\n  - {{name: a, command: eval, config: {SFT}}}\n":
            r"stages\[1\]\.name='a'.*unique",
        f"stages:\n  - {{name: a, command: train, config: {SFT}, cfg: 1}}\n": r"stages\[0\]\.cfg: unknown key",
        "stages:\n  - {name: a, command: train, config: nope.yaml}\n": r"stages\[0\]\.config='nope.yaml'",
        f"stages:\n  - {{name: a, command: train, config: {SFT}}}\nstagez: 1\n": r"stagez: unknown recipe key",
        "stages: []\n": "non-empty 'stages'",
    }
    for text, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            recipe.read_recipe(write(tmp_path / "bad.yaml", text))


# --------------------------------------------------------------------------------------------------------- metrics


def test_metrics_writer_appends_python_scalars(tmp_path):
    import numpy as np

    w = MetricsWriter(tmp_path / "run")
    w.write(1, {"loss": np.float32(2.5), "count": 7, "lr": 1e-3})
    w.write(2, {"loss": np.array(1.25)}, phase="eval")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows == w.read()
    assert rows[0]["loss"] == 2.5 and type(rows[0]["loss"]) is float and rows[0]["count"] == 7
    assert rows[1] == {"step": 2, "time": rows[1]["time"], "loss": 1.25, "phase": "eval"}
    with pytest.raises(TypeError, match="metric 'v'"):
        w.write(3, {"v": np.ones(3)})
    off = MetricsWriter(tmp_path / "other", enabled=False)
    assert off.write(1, {"loss": 1.0}) is None and not (tmp_path / "other").exists()


def test_markdown_table():
    text = markdown_table([{"name": "a|b", "x": 0.123456}, {"name": "c", "y": 3}])
    assert text.splitlines() == ["| name | x | y |", "|---|---|---|", "| a\\|b | 0.1235 |  |", "| c |  | 3 |"]
    assert markdown_table([]) == "(no rows)\n"


def test_write_results_json_markdown_and_plots(tmp_path):
    import numpy as np

    def draw(ax):
        ax.plot([0, 1], [1, 0])

    plots = {"curve": draw,
             "speed": {"x": [1, 2, 4], "y": {"ar": [1.0, 1.0, 1.0], "spec": [1.0, 1.6, 2.1]},
                       "xlabel": "draft len", "ylabel": "speed-up"},
             "bars": {"x": ["a", "b"], "y": [3, 4], "kind": "bar"}}
    paths = write_results(tmp_path, {"acc": np.float32(0.5), "n": 3}, [{"m": "x", "v": 1.0}], plots,
                          title="bench")
    assert json.loads((tmp_path / "results.json").read_text()) == {"acc": 0.5, "n": 3}
    assert (tmp_path / "results.md").read_text().startswith("# bench\n\n| m | v |")
    for name in ("curve", "speed", "bars"):
        png = Path(paths[f"{name}.png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"plot 'bad': x has 2 values but y\['s'\] has 3"):
        write_results(tmp_path, {}, [], {"bad": {"x": [1, 2], "y": {"s": [1, 2, 3]}}})
    with pytest.raises(ValueError, match=r"plot 'bad': unknown key 'colour'"):
        write_results(tmp_path, {}, [], {"bad": {"y": [1], "colour": "red"}})


# ------------------------------------------------------------------------------------------------- discoverability


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("jaxtok 0.")


def test_list_names_descriptions_and_arguments(capsys):
    assert cli.main(["list", "objectives"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("objectives (objective.name):")
    assert "  sft - SFT loss" in out and "chunk_size: int = 1024" in out and "  policy_gradient - " in out
    assert cli.main(["list", "presets"]) == 0
    assert "  tiny_student - qwen3: 2 layers" in capsys.readouterr().out
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("objectives", "policies", "draft-policies", "presets", "tasks", "benches", "rewards"):
        assert f"\n{kind} (" in "\n" + out, kind
    assert "  threshold - " in out and "  fixed - " in out and "  exact_match - " in out and "  train - " in out
    with pytest.raises(SystemExit) as e:
        cli.main(["list", "nope"])
    assert e.value.code == 2


def test_validate_accepts_a_recipe(capsys):
    recipe_file = ROOT / "configs" / "quickstart.yaml"
    assert cli.main(["validate", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert "stage teacher: train" in out and "stage diffusion_llada: decode" in out
    assert out.strip().endswith("9 stages valid")


def test_current_records_drop_steps_redone_after_a_resume():
    from jaxtok.metrics import current_records

    recs = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5},
            {"step": 2, "event": "resume", "from_step": 2}, {"step": 3, "loss": 1.4}, {"step": 4, "loss": 1.0}]
    assert [(r["step"], r.get("loss")) for r in current_records(recs)] == [
        (1, 3.0), (2, 2.0), (2, None), (3, 1.4), (4, 1.0)]
