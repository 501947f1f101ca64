"""The RL comparison report (jaxtok.bench.rl_report): curves read from metrics records, FLOP counts, and the bench's
table/plots/publish path on stubbed training runs (no RL training here)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxtok.registry import ConfigError
from jaxtok.bench import rl_report as R

ROOT = Path(__file__).resolve().parents[1]


def test_eval_curve_keeps_eval_records_only():
    recs = [{"step": 1, "loss": 0.5}, {"step": 10, "eval/exact_match": 0.2}, {"step": 10, "loss": 0.1},
            {"step": 20, "eval/exact_match": 0.3}]
    assert R.eval_curve(recs) == {10: 0.2, 20: 0.3}


def test_reuse_steps_skip_the_first_step_on_each_rollout_batch():
    assert R.reuse_steps(range(1, 7), 2) == [2, 4, 6]
    assert R.reuse_steps(range(1, 7), 3) == [2, 3, 5, 6]
    assert R.reuse_steps(range(1, 4), 1) == []  # μ = 1: every step samples a fresh batch
    with pytest.raises(ValueError):
        R.reuse_steps([1], 0)


def test_clip_by_position_averages_reuse_steps():
    recs = [{"step": 1, "clip_frac_pos0": 0.0, "clip_frac_pos1": 0.0},  # fresh batch: ratio 1, ignored
            {"step": 2, "clip_frac_pos0": 0.1, "clip_frac_pos1": 0.3},
            {"step": 3, "clip_frac_pos0": 0.0, "clip_frac_pos1": 0.0},
            {"step": 4, "clip_frac_pos0": 0.3, "clip_frac_pos1": 0.5},
            {"step": 4, "eval/exact_match": 0.5}]
    np.testing.assert_allclose(R.clip_by_position(recs, 2), [0.2, 0.4])
    assert R.clip_by_position([{"step": 2, "loss": 1.0}], 2) is None


def test_cppo_rejections_budget_share_and_halves():
    recs = [{"step": s, "cppo_token_reject_frac": t, "cppo_budget_reject_frac": b}
            for s, t, b in [(1, 0.0, 0.0), (2, 0.1, 0.3), (3, 0.0, 0.0), (4, 0.2, 0.0), (5, 0, 0), (6, 0.1, 0.1)]]
    out = R.cppo_rejections(recs, 2)  # reuse steps 2, 4, 6
    assert out["budget_share"] == pytest.approx(0.4 / 0.8)
    assert out["token_reject_frac"] == pytest.approx(0.4 / 3)
    assert out["budget_share_first_half"] == pytest.approx(0.75)  # step 2
    assert out["budget_share_second_half"] == pytest.approx(0.1 / 0.4)  # steps 4, 6
    assert out["budget_reject_frac_first_half"] == pytest.approx(0.3)
    assert out["budget_reject_frac_second_half"] == pytest.approx(0.05)
    assert R.cppo_rejections([{"step": 2, "clip_frac": 0.1}], 2) is None


def test_run_flops_counts_rollouts_updates_and_reference():
    f = R.run_flops(forward_per_token=10.0, rows=4, seq_len=8, steps=5, inner_epochs=2, reference_forward=False)
    assert f["rollout"] == 3 * 2 * 32 * 10.0  # ceil(5/2) rollout batches: sample + behaviour log-prob forward
    assert f["update"] == 5 * 3 * 32 * 10.0
    g = R.run_flops(forward_per_token=10.0, rows=4, seq_len=8, steps=5, inner_epochs=2, reference_forward=True)
    assert g["update"] == 5 * 4 * 32 * 10.0 and g["total"] == g["rollout"] + g["update"]
    assert R.flops_curve([0, 1, 2], forward_per_token=1.0, rows=1, seq_len=1, inner_epochs=2,
                         reference_forward=False) == [0.0, 5.0, 8.0]


def test_first_last_quarter_reads_fresh_rollout_steps():
    recs = [{"step": s, "rollout/exact_match": v} for s, v in enumerate([0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6], 1)]
    assert R.first_last_quarter(recs, "rollout/exact_match", 2) == (0.0, 0.6)
    assert R.first_last_quarter([], "rollout/exact_match", 2) == (None, None)


def test_position_coverage_and_mean_sd():
    np.testing.assert_allclose(R.position_coverage([1, 2, 4, 4], 5), [1.0, 0.75, 0.5, 0.5, 0.0])
    assert R.mean_sd([1.0, None, 3.0]) == (2.0, 1.0)
    assert R.mean_sd([None]) == (None, 0.0)


def test_args_are_checked():
    with pytest.raises(ConfigError, match="variants"):
        R.RLCompareArgs()
    with pytest.raises(ConfigError, match="overrides"):
        R.RLCompareArgs(variants={"a": {"config": "x.yaml", "overrides": ["no_equals"]}})
    with pytest.raises(ConfigError, match="expected"):
        R.RLCompareArgs(variants={"a": {"path": "x.yaml"}})


def _fake_records(variant: str, seed: int, steps: int) -> list[dict]:
    recs = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 0.0, "clip_frac": 0.1 * (s % 2 == 0), "rollout/reward_mean": 0.2}
        r.update({f"clip_frac_pos{i}": (0.01 * i if variant == "grpo" else 0.05) * (s % 2 == 0) for i in range(32)})
        if variant == "cppo":
            r.update(cppo_token_reject_frac=0.02, cppo_budget_reject_frac=0.01 * (s % 2 == 0))
        recs.append(r)
        if s % 2 == 0:
            recs.append({"step": s, "eval/exact_match": 0.1 + 0.01 * s + 0.01 * seed})
    return recs


def test_bench_tables_plots_and_publishes_from_run_metrics(tmp_path, monkeypatch):
    """Two variants x two seeds through rl_compare_bench with training stubbed out: the table, the accuracy curve
    (step 0 = the baseline eval), the clip curve restricted to covered positions, CPPO shares, and the docs copy."""
    from jaxtok.config import load_config
    from jaxtok.models import Decoder, presets  # noqa: F401

    calls = []

    def fake_train_run(plan, run_dir):  # the variant's run plan, validated once
        cfg = plan.cfg
        variant = run_dir.name.split("-s")[0]
        seed = cfg.train.seed
        calls.append((variant, seed, dict(cfg.objective.args)))
        run_dir.mkdir(parents=True, exist_ok=True)
        recs = _fake_records(variant, seed, cfg.train.steps)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return {"eval/exact_match": recs[-1]["eval/exact_match"]}, 1.0

    class _Stub:
        cfg = presets.get("tiny_student", vocab_size=64)

    monkeypatch.setattr(R, "_train_run", fake_train_run)
    monkeypatch.setattr("jaxtok.train.loop.load_model", lambda path, **kw: (_Stub(), {}))
    student = tmp_path / "student"
    student.mkdir()
    base = tmp_path / "eval"
    base.mkdir()
    (base / "eval.json").write_text(json.dumps({"eval/exact_match": 0.1}))
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs/repro/rl_bench.yaml",
                      [f"model.init_from={student}", f"run.cache_dir={tmp_path / 'cache'}"])
    args = R.RLCompareArgs(variants={"grpo": {"config": "configs/rl/grpo.yaml"},
                                     "cppo": {"config": "configs/rl/cppo.yaml", "overrides": ["optimizer.lr=1e-5"]}},
                           seeds=(0, 1), common=("train.steps=4", "data.batch_size=32", "rollout.num_generations=4"),
                           baseline=str(base), publish=str(tmp_path / "docs" / "rl"), command="jaxtok run x.yaml")
    out = R.rl_compare_bench(cfg, tmp_path / "bench", args)
    assert sorted((v, s) for v, s, _ in calls) == [("cppo", 0), ("cppo", 1), ("grpo", 0), ("grpo", 1)]
    assert all(a["num_position_buckets"] == 32 for *_, a in calls)  # prompt_len 12 + max_new_tokens 20
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {r["variant"]: r for r in res["table"]}
    assert rows["grpo"]["final"] == pytest.approx(0.145) and rows["grpo"]["final_sd"] == pytest.approx(0.005)
    assert rows["grpo"]["gain_pp"] == pytest.approx(4.5)
    assert rows["grpo"]["train_tflops"] > rows["cppo"]["train_tflops"]  # GRPO's KL term adds a reference forward
    assert res["accuracy_curves"]["grpo"]["step"] == [0, 2, 4] and res["accuracy_curves"]["grpo"]["mean"][0] == 0.1
    shown = res["clip_positions"]
    assert shown and shown[0] == 0 and max(shown) < 20 and min(res["position_coverage"]) >= 0.25
    assert len(res["example_completion"]) == len(shown) and res["example_completion"][0]
    assert res["clip_by_position"]["grpo"][1] == pytest.approx(0.01)  # reuse steps only: 0.01 * pos, not halved
    assert res["cppo"]["cppo"]["budget_share"] == pytest.approx(1 / 3)
    assert out["best_variant"] == "grpo"
    md = (tmp_path / "docs" / "rl.md").read_text()
    assert md.splitlines()[3] == "jaxtok run x.yaml" and "![accuracy](rl_accuracy.png)" in md
    assert (tmp_path / "docs" / "rl_clip_by_position.png").exists() and (tmp_path / "docs" / "rl.json").exists()
