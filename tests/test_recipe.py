"""Recipe summary: columns filled from alternative keys so train and decode stages line up, recipe info columns
(what / time / dir), bar-chart plots, the quickstart recipe's stages validate (no JAX compute, no training)."""

import json
from pathlib import Path

import pytest

from jaxtok import recipe
from jaxtok.config import ConfigError, load_config, validate_names

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------------- columns


def test_parse_columns_keys_and_alternatives():
    cols = recipe.parse_columns(["tokens_per_s", {"exact_match": ["exact_match", "eval/exact_match"]},
                                 {"what": "recipe/what"}])
    assert cols == (("tokens_per_s", ("tokens_per_s",)), ("exact_match", ("exact_match", "eval/exact_match")),
                    ("what", ("recipe/what",)))
    assert recipe.parse_columns(None) == ()


@pytest.mark.parametrize("spec,pattern", [
    ("exact_match", r"must be a list"),
    ([{"a": "x", "b": "y"}], r"summary\[0\].*one-entry mapping"),
    ([{"a": []}], r"summary\[0\].*non-empty list"),
    ([3], r"summary\[0\]=3"),
    (["a", {"a": "b"}], r"column 'a' appears twice"),
])
def test_parse_columns_errors(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        recipe.parse_columns(spec)


def test_summary_rows_line_up_train_and_decode_stages():
    results = {
        "teacher": {"step": 400, "eval/exact_match": 0.8, "train/loss": 0.1},
        "ar": {"method": "greedy", "exact_match": 0.82, "tokens_per_s": 900.0, "tokens_per_target_forward": 1.0},
        "spec": {"method": "speculative", "exact_match": 0.82, "tokens_per_s": 700.0,
                 "tokens_per_target_forward": 2.5, "mean_accepted_length": 1.5},
        "dllm": {"method": "diffusion", "exact_match": 0.4, "tokens_per_s": 500.0, "mean_nfe": 4.5,
                 "tokens_per_nfe": 2.6},
    }
    info = {name: {"recipe/what": f"w-{name}", "recipe/time_s": "cached"} for name in results}
    cols = recipe.parse_columns([{"what": "recipe/what"}, {"exact_match": ["exact_match", "eval/exact_match"]},
                                 "tokens_per_s", {"per_fwd": ["tokens_per_target_forward", "tokens_per_nfe"]},
                                 {"accepted_len": "mean_accepted_length"}, "mean_nfe", "never_there",
                                 {"time_s": "recipe/time_s"}])
    rows = recipe.summary_rows(results, cols, info)
    assert [list(r) for r in rows] == [["stage", "what", "exact_match", "tokens_per_s", "per_fwd", "accepted_len",
                                        "mean_nfe", "time_s"]] * 4  # one column order; unfilled column left out
    by = {r["stage"]: r for r in rows}
    assert by["teacher"]["exact_match"] == 0.8 and by["teacher"]["tokens_per_s"] == ""  # eval/ key as fallback
    assert by["ar"]["exact_match"] == 0.82 and by["ar"]["per_fwd"] == 1.0 and by["ar"]["mean_nfe"] == ""
    assert by["spec"]["accepted_len"] == 1.5 and by["spec"]["per_fwd"] == 2.5
    assert by["dllm"]["per_fwd"] == 2.6 and by["dllm"]["mean_nfe"] == 4.5 and by["dllm"]["accepted_len"] == ""
    assert by["dllm"]["what"] == "w-dllm" and by["dllm"]["time_s"] == "cached"
    # a result key wins over a later alternative, None counts as missing
    rows = recipe.summary_rows({"s": {"a": None, "b": 2}}, [("c", ("a", "b"))])
    assert rows == [{"stage": "s", "c": 2}]


def test_summary_rows_default_is_every_result_key():
    rows = recipe.summary_rows({"a": {"x": 1}, "b": {"y": 2}})
    assert rows == [{"stage": "a", "x": 1}, {"stage": "b", "y": 2}]


def test_summary_plots_skip_missing_and_non_numeric_cells():
    rows = [{"stage": "a", "em": 0.5, "t": ""}, {"stage": "b", "em": "", "t": "cached"},
            {"stage": "c", "em": 1, "t": True}]
    plots = recipe.summary_plots(rows, ["em", "t"])
    assert list(plots) == ["em"]
    assert plots["em"]["x"] == ["a", "c"] and plots["em"]["y"] == [0.5, 1.0] and plots["em"]["kind"] == "bar"


# -------------------------------------------------------------------------------------------- describe, run


def test_describe_stage_names_method_and_selection():
    tip = load_config(ROOT / "configs" / "quickstart" / "opd_tip.yaml",
                      ["model.init_from=x", "rollout.teacher_init_from=y"])
    assert recipe.describe_stage("train", tip) == "train opd (entropy_sample)"
    dec = load_config(ROOT / "configs" / "quickstart" / "decode.yaml",
                      ["decode.method=speculative", "decode.policy=fixed"])
    assert recipe.describe_stage("decode", dec) == "decode speculative/fixed"
    assert recipe.describe_stage("decode", load_config(ROOT / "configs" / "quickstart" / "decode.yaml")) == \
        "decode greedy"
    assert recipe.describe_stage("eval", dec) == "eval"


def test_run_recipe_one_table_for_train_and_decode_stages(tmp_path, capsys):
    sft = ROOT / "configs" / "quickstart" / "student.yaml"
    dec = ROOT / "configs" / "quickstart" / "decode.yaml"
    path = write(tmp_path / "r.yaml",
                 f"stages:\n"
                 f"  - {{name: model, command: train, config: {sft}}}\n"
                 f"  - {{name: ar, command: decode, config: {dec}, overrides: ['model.init_from=${{stage:model}}']}}\n"
                 f"  - {{name: spec, command: decode, config: {dec},\n"
                 f"     overrides: ['model.init_from=${{stage:model}}', 'decode.method=speculative',\n"
                 f"                 'decode.draft_init_from=${{stage:model}}']}}\n"
                 f"summary:\n"
                 f"  - {{what: recipe/what}}\n"
                 f"  - {{exact_match: [exact_match, eval/exact_match]}}\n"
                 f"  - tokens_per_s\n"
                 f"  - {{accepted_len: mean_accepted_length}}\n"
                 f"  - {{time_s: recipe/time_s}}\n"
                 f"plots: [exact_match, tokens_per_s]\n"
                 f"run: {{name: rec}}\n")

    def train(cfg, run_dir):
        (run_dir / "summary.json").write_text("{}")
        return {"eval/exact_match": 0.25, "train/loss": 1.0}

    def decode(cfg, run_dir):
        (run_dir / "acceptance.png").write_bytes(b"")
        out = {"method": cfg.decode.method, "exact_match": 0.5, "tokens_per_s": 100.0}
        if cfg.decode.method == "speculative":
            out["mean_accepted_length"] = 2.0
        return out

    ovs = [f"run.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'out'}", "run.progress=false"]
    recipe.run_recipe(path, ovs, handlers={"train": train, "decode": decode})
    out = capsys.readouterr().out
    assert "| stage | what | exact_match | tokens_per_s | accepted_len | time_s |" in out
    assert "| model | train sft | 0.25 |  |  |" in out
    assert "| spec | decode speculative | 0.5 | 100 | 2 |" in out
    assert "3 of 3 stages run (0 reused)" in out
    assert "acceptance.png" in out and "summary.json" in out  # stage outputs listed with their paths
    rec = tmp_path / "out" / "rec"
    assert (rec / "exact_match.png").is_file() and (rec / "tokens_per_s.png").is_file()
    saved = json.loads((rec / "results.json").read_text())
    assert [r["stage"] for r in saved["summary"]] == ["model", "ar", "spec"]

    recipe.run_recipe(path, ovs, handlers={})  # all cached: no handler is called
    out = capsys.readouterr().out
    assert "0 of 3 stages run (3 reused)" in out and out.count("| cached |") == 3


def test_read_recipe_plots_must_name_summary_columns(tmp_path):
    sft = ROOT / "configs" / "quickstart" / "student.yaml"
    text = f"stages:\n  - {{name: a, command: train, config: {sft}}}\nsummary: [x]\nplots: [y]\n"
    with pytest.raises(ConfigError, match=r"plots: 'y' is not a summary column"):
        recipe.read_recipe(write(tmp_path / "r.yaml", text))


# ------------------------------------------------------------------------------------------------ quickstart


def test_quickstart_recipe_stages_validate():
    r = recipe.read_recipe(QUICKSTART)
    names = [s.name for s in r.stages]
    assert names[:5] == ["teacher", "student", "draft", "diffusion", "opd_tip"]
    methods = set()
    for st in r.stages:
        cfg = load_config(st.config, recipe._resolve_refs(st.overrides, lambda n: f"/runs/{n}"))
        validate_names(cfg)
        assert cfg.data.num_eval == 128 and cfg.data.task_args == {"digits": 2, "steps": 1, "ops": "+"}
        if st.command == "decode":
            methods.add(cfg.decode.method)
            assert cfg.decode.batch_size >= cfg.data.num_eval  # all held-out prompts in one batch
    assert methods == {"greedy", "speculative", "diffusion"}
    opd = load_config(r.stages[4].config, recipe._resolve_refs(r.stages[4].overrides, lambda n: f"/runs/{n}"))
    assert opd.objective.name == "opd" and opd.objective.args["selection"]["rule"] == "entropy_sample"
    assert opd.model.init_from == "/runs/student" and opd.rollout.teacher_init_from == "/runs/teacher"
    assert {c[0] for c in r.summary} >= {"exact_match", "tokens_per_s", "mean_nfe", "accepted_len"}


def test_stage_key_follows_the_config_files_a_stage_names(tmp_path, monkeypatch):
    """Editing a config that a sweep names (or that config's base) changes the stage key; an unrelated file does
    not; the key does not depend on file modification times."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\noptimizer: {lr: 0.1}\n")
    stage = write(tmp_path / "stage.yaml", "bench: {name: sweep, args: {config: variant.yaml, "
                                           "variants: {a: [config=variant.yaml]}}}\n")
    cfg = load_config(stage)
    key = recipe.stage_key(cfg, "bench", [])
    (tmp_path / "other.yaml").write_text("train: {steps: 4}\n")
    assert recipe.stage_key(cfg, "bench", []) == key
    (tmp_path / "base.yaml").write_text("train: {steps: 5}\n")
    key_base = recipe.stage_key(cfg, "bench", [])
    assert key_base != key
    (tmp_path / "variant.yaml").write_text("base: base.yaml\noptimizer: {lr: 0.2}\n")
    assert recipe.stage_key(cfg, "bench", []) not in (key, key_base)
