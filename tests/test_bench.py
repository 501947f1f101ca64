"""`jaxtok bench`: the train-step benchmark writes results.json, a table and a plot with consistent numbers."""

import json
from pathlib import Path

import pytest

from jaxtok import cli
from jaxtok.models import flops_per_token, presets
from jaxtok.registry import BENCHES, ConfigError
from jaxtok.bench.train import peak_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_bench_writes_consistent_results(tmp_path):
    rc = cli.main(["bench", str(ROOT / "configs" / "bench" / "train.yaml"), f"run.out_dir={tmp_path}",
                   "model.preset=tiny_draft", "bench.args.batch_sizes=[2,4]", "bench.args.seq_len=16",
                   "bench.args.steps=2", "bench.args.warmup=1", "bench.args.calibration_size=128"])
    assert rc == 0
    run = tmp_path / "bench_train"
    res = json.loads((run / "results.json").read_text())
    assert (run / "results.md").exists() and (run / "tokens_per_s.png").exists()
    fpt = flops_per_token(presets.get("tiny_draft", vocab_size=64), 16).train
    assert res["train_flops_per_token"] == fpt
    for row in res["rows"]:
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 16 / (row["step_ms"] / 1e3))
        assert row["flops_per_token"] == fpt and row["objective"] == "sft"
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * fpt / res["peak_flops"])
        assert row["mfu"] > 0


def test_peak_is_measured_on_cpu():
    peak, source = peak_flops(64)
    assert peak > 0 and "measured" in source


def test_unknown_bench_and_bad_args_are_config_errors(tmp_path, capsys):
    cfg = str(ROOT / "configs" / "bench" / "train.yaml")
    assert cli.main(["bench", cfg, f"run.out_dir={tmp_path}", "bench.name=nope"]) == 2
    assert "bench.name='nope'" in capsys.readouterr().err
    assert cli.main(["bench", cfg, f"run.out_dir={tmp_path}", "bench.args.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_decode_bench_writes_consistent_results(tmp_path):
    rc = cli.main(["bench", str(ROOT / "configs" / "bench" / "decode.yaml"), f"run.out_dir={tmp_path}",
                   "model.preset=tiny_draft", "bench.args.batch_sizes=[1,2]", "bench.args.prompt_len=4",
                   "bench.args.new_tokens=3", "bench.args.repeats=1", "bench.args.calibration_mb=8"])
    assert rc == 0
    run = tmp_path / "bench_decode"
    res = json.loads((run / "results.json").read_text())
    assert (run / "results.md").exists() and (run / "decode_tokens_per_s.png").exists()
    cfg = presets.get("tiny_draft", vocab_size=64)
    assert res["kv_bytes_per_token"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    for row in res["rows"]:
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 3 / (row["ms_per_step"] * 3 / 1e3))
        assert row["achieved_gb_s"] * 1e9 == pytest.approx(row["bandwidth_utilisation"] * res["peak_bandwidth"])
    parts = res["batch1_breakdown_ms"]
    assert parts["ideal"] == pytest.approx(res["weight_bytes"] / res["peak_bandwidth"] * 1e3)
    assert parts["weight_matvecs"] > 0 and parts["cached_forward"] > 0


@pytest.mark.slow
def test_sweep_bench_compares_variants_side_by_side(tmp_path):
    """Two variants of one config, trained and tabulated together; a bad variant override fails before any run."""
    base = tmp_path / "base.yaml"
    base.write_text(
        "model: {preset: tiny_draft}\n"
        "data: {task: arith, task_args: {digits: 1}, seq_len: 24, prompt_len: 10, batch_size: 8, num_eval: 8}\n"
        "optimizer: {schedule: constant}\n"
        "train: {steps: 3, log_every: 1, eval_batches: 1}\n"
        "decode: {max_new_tokens: 8, batch_size: 8}\n"
        f"run: {{out_dir: {tmp_path / 'runs'}, progress: false}}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "bench:\n  name: sweep\n  args:\n"
        f"    config: {base}\n"
        "    variants: {slow: [optimizer.lr=1.0e-4], fast: [optimizer.lr=1.0e-2]}\n"
        "    metrics: [train/loss, eval/exact_match]\n    curve: loss\n"
        f"run: {{out_dir: {tmp_path}, name: sw}}\n")
    assert cli.main(["bench", str(sweep)]) == 0
    res = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["variant"] for r in res["table"]] == ["slow", "fast"]
    assert (tmp_path / "sw" / "curve.png").exists() and (tmp_path / "sw" / "fast" / "seed0" / "summary.json").exists()
    loss = {r["variant"]: r["train/loss"] for r in res["table"]}
    assert loss["fast"] < loss["slow"]  # three steps at lr 1e-2 move a random model further than at 1e-4
    assert cli.main(["bench", str(sweep), "bench.args.variants.bad=[optimizer.lr=-1]"]) == 2


def test_bench_trace_writes_a_profile(tmp_path):
    rc = cli.main(["bench", str(ROOT / "configs" / "bench" / "train.yaml"), f"run.out_dir={tmp_path}",
                   "model.preset=tiny_draft", "bench.args.batch_sizes=[2]", "bench.args.seq_len=8",
                   "bench.args.steps=1", "bench.args.warmup=0", "bench.args.calibration_size=64", "bench.trace=true"])
    assert rc == 0
    assert list((tmp_path / "bench_train" / "trace").rglob("*.xplane.pb"))


def test_train_step_bench_presets_labels_and_selected_memory(tmp_path):
    """Objective families per preset with their labels; TIP 50 % keeps half the tokens, and with a vocabulary large
    enough for the loss path to matter, the selected-positions path compiles to less scratch memory than OPD on
    every token."""
    objectives = ("[{name: opd, label: all, args: {selection: {rule: all}, quadrant_stats: false}},"
                  " {name: opd, label: sel, args: {selection: {rule: entropy_sample, rho: 0.5},"
                  " quadrant_stats: false}}]")
    rc = cli.main(["bench", str(ROOT / "configs" / "bench" / "train_step.yaml"), f"run.out_dir={tmp_path}",
                   "bench.args.presets=[tiny_draft]", "bench.args.batch_sizes=[4]", "bench.args.seq_len=16",
                   "bench.args.steps=1", "bench.args.warmup=0", "bench.args.calibration_size=64",
                   "bench.args.vocab_size=8192", f"bench.args.objectives={objectives}"])
    assert rc == 0
    res = json.loads((tmp_path / "bench_train_step" / "results.json").read_text())
    assert res["presets"] == ["tiny_draft"] and res["vocab_size"] == 8192
    rows = {r["objective"]: r for r in res["rows"]}
    assert set(rows) == {"all", "sel"} and all(r["preset"] == "tiny_draft" for r in rows.values())
    assert rows["all"]["selected_frac"] == 1.0 and rows["sel"]["selected_frac"] == pytest.approx(0.5, abs=0.05)
    assert rows["all"]["logits_f32_mb"] == pytest.approx(4 * 16 * 8192 * 4 / 2**20)
    for r in rows.values():
        assert 0 < r["temp_mb"] <= r["peak_mb"]
    assert rows["sel"]["temp_mb"] < rows["all"]["temp_mb"]


def test_sweep_variant_file_shared_overrides_memory_and_initial_eval(tmp_path):
    """A variant's ``config=`` file replaces the base, shared overrides apply to it, the curve starts at the initial
    eval (step 0), logged metrics and the median step time are tabulated, and the step's memory is compiled."""
    base = tmp_path / "base.yaml"
    base.write_text(
        "model: {preset: tiny_draft}\n"
        "data: {task: arith, task_args: {digits: 1}, seq_len: 24, prompt_len: 10, batch_size: 8, num_eval: 8}\n"
        "optimizer: {schedule: constant}\n"
        "train: {steps: 50, log_every: 1, eval_batches: 1}\n"
        "decode: {max_new_tokens: 8, batch_size: 8}\n"
        f"run: {{out_dir: {tmp_path / 'runs'}, progress: false}}\n")
    (tmp_path / "other.yaml").write_text("base: base.yaml\ntrain: {eval_every: 1}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "bench:\n  name: sweep\n  args:\n"
        f"    config: {base}\n"
        f"    variants: {{b: [config={tmp_path / 'other.yaml'}]}}\n"
        "    overrides: [train.steps=3]\n"
        "    train_metrics: [grad_norm]\n    memory: true\n    initial_eval: true\n"
        f"run: {{out_dir: {tmp_path}, name: sw}}\n")
    assert cli.main(["bench", str(sweep)]) == 0
    res = json.loads((tmp_path / "sw" / "results.json").read_text())
    (row,) = res["table"]
    assert list(res["mean_curves"]["b"]) == ["0", "1", "2", "3"]  # initial, eval_every=1 of other.yaml, steps=3
    assert res["mean_curves"]["b"]["0"] == res["initial eval/exact_match"]
    assert row["grad_norm"] > 0 and row["step_s"] > 0 and 0 < row["temp_mb"] <= row["peak_mb"]


def test_sweep_config_entry_belongs_to_a_variant():
    from jaxtok.bench.train import SweepArgs

    with pytest.raises(ValueError, match="config=<path> belongs to a variant"):
        SweepArgs(config="a.yaml", variants={"x": []}, overrides=("config=b.yaml",))


@pytest.mark.slow
def test_diffusion_and_plan_conditioning_benches_on_tiny_random_models(tmp_path):
    """`jaxtok bench` of configs/bench/diffusion.yaml (two commit policies) and configs/bench/plan_conditioning.yaml
    (no plan, a 2-token plan after and before the prompt) on random tiny models: one row per run, the plot written,
    the plan rows cost the planner's forwards and shorten the diffusion budget."""
    from flax import nnx

    from jaxtok.models import Decoder, save_checkpoint

    save_checkpoint(Decoder(presets.get("tiny_diffusion"), rngs=nnx.Rngs(0)), str(tmp_path / "diffusion"))
    save_checkpoint(Decoder(presets.get("tiny_draft", vocab_size=64), rngs=nnx.Rngs(1)), str(tmp_path / "planner"))
    common = [f"run.out_dir={tmp_path}", f"model.init_from={tmp_path / 'diffusion'}", "data.num_eval=4",
              "decode.batch_size=4", "decode.max_new_tokens=8"]
    runs = "[{label: one, policy: llada, args: {block_len: 4}}, {label: thr, policy: threshold, args: {block_len: 4}}]"
    assert cli.main(["bench", str(ROOT / "configs" / "bench" / "diffusion.yaml"), *common, "run.name=diff",
                     f"bench.args.runs={runs}"]) == 0
    res = json.loads((tmp_path / "diff" / "results.json").read_text())
    assert [r["run"] for r in res["rows"]] == ["one", "thr"] and (tmp_path / "diff" / "accuracy_vs_nfe.png").is_file()
    assert res["rows"][0]["nfe_speedup"] == 1.0 and all(r["num_examples"] == 4 for r in res["rows"])

    assert cli.main(["bench", str(ROOT / "configs" / "bench" / "plan_conditioning.yaml"), *common, "run.name=plan",
                     f"decode.draft_init_from={tmp_path / 'planner'}", "bench.args.plan_tokens=[0, 2]",
                     "decode.policy_args={block_len: 2}",
                     "bench.args.num_examples=4"]) == 0
    res = json.loads((tmp_path / "plan" / "results.json").read_text())
    rows = [(r["placement"], r["plan_tokens"]) for r in res["rows"]]
    assert rows == [("after", 0), ("after", 2), ("before", 2)]  # the k = 0 baseline once
    assert res["rows"][0]["planner_forwards"] == 0 and res["rows"][1]["planner_forwards"] > 0
    assert res["rows"][1]["mean_nfe"] <= 6  # `after`: the plan is the start of the 8-token response
    assert (tmp_path / "plan" / "exact_match_vs_plan.png").is_file()
    with pytest.raises(ConfigError, match="placements"):
        BENCHES.parse_args("plan_conditioning", {"placements": ["middle"]}, "bench.args")


def test_logged_step_s_is_the_median_of_timed_windows():
    """The sweep's ``step_s`` reads the loop's synchronised ``step_time_s`` windows (the compile-only window, which
    has no ``tokens_per_s``, and eval rows are left out), not host stamps of the asynchronous dispatch."""
    from jaxtok.bench.train import logged_step_s

    rows = [{"step": 1, "step_time_s": 30.0, "compile_s": 30.0, "tokens_per_s": None},
            {"step": 2, "step_time_s": 0.5, "compile_s": 30.0, "tokens_per_s": 10.0},
            {"step": 2, "eval/exact_match": 0.3},
            {"step": 3, "step_time_s": 0.7, "tokens_per_s": 9.0},
            {"step": 4, "step_time_s": 0.9, "tokens_per_s": 8.0}]
    assert logged_step_s(rows) == 0.7
    assert logged_step_s(rows[:1]) is None


def test_bench_name_and_args_are_checked_at_validation():
    """A misspelt ``bench.name`` or an unknown ``bench.args`` key is a ConfigError when the config is validated
    (``jaxtok validate`` and every command), naming the key and the allowed values, before anything runs."""
    from jaxtok.config import from_dict, validate_names
    from jaxtok.registry import ConfigError

    with pytest.raises(ConfigError, match=r"bench.name='trian': not a known benchmark; allowed: .*'sweep'"):
        validate_names(from_dict({"bench": {"name": "trian"}}))
    with pytest.raises(ConfigError, match=r"bench.args.varients"):
        validate_names(from_dict({"bench": {"name": "sweep", "args": {"varients": {}}}}))
    validate_names(from_dict({"bench": {"name": "decode"}}))  # a benchmark whose defaults parse
