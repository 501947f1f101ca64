"""`jaxtok bench configs/bench/speculative.yaml` on tiny random models (the loading wrapper aside): the results have
the documented structure, every lossless method is token-identical to greedy AR, and the derived numbers agree
with the counts they come from."""

import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxtok.config import load_config
from jaxtok.bench.speculative import run_speculative_bench
from jaxtok.models import Decoder, ModelConfig
from jaxtok.registry import BENCHES
from jaxtok.tasks import build_tokenizer
from jaxtok.tasks.tokenizer import VOCAB_SIZE

ROOT = Path(__file__).resolve().parents[1]

# every drafter kind (AR model, DEER inside TAPS, n-gram), a fixed γ and a head trained in the bench
METHODS = ("[{label: f2, drafter: draft, policy: fixed, draft_len: 2},"
           "{label: sdpp, drafter: draft, policy: specdecpp, draft_len: 3, args: {threshold: 0.5, min_len: 1}},"
           "{label: taps, drafter: [draft, deer], policy: fixed, draft_len: 2},"
           "{label: ng, drafter: ngram, policy: fixed, draft_len: 2}]")


def _cfg(d, **kw):
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=d, intermediate_size=2 * d, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=d // 2, max_position_embeddings=64, **kw)


def _models():
    """Random target; a draft of the same shape (its programs are shared) whose weights are the target's plus
    noise, so it agrees with the target on some tokens only (partial acceptance); a random DEER drafter."""
    target = Decoder(_cfg(16), rngs=nnx.Rngs(0))
    draft = Decoder(_cfg(16), rngs=nnx.Rngs(1))
    mixed = jax.tree.map(lambda a, b: 0.85 * a + 0.15 * b, nnx.state(target, nnx.Param), nnx.state(draft, nnx.Param))
    nnx.update(draft, mixed)
    deer = Decoder(_cfg(16, mask_token_id=3), rngs=nnx.Rngs(2))
    return target, draft, deer


@pytest.mark.slow
def test_speculative_bench_structure_and_exactness(tmp_path):
    cfg = load_config(ROOT / "configs" / "bench" / "speculative.yaml", [
        "data.num_eval=6", "decode.batch_size=4", "decode.max_new_tokens=6", "bench.args.repeats=1",
        "bench.args.head_batches=1", "bench.args.head_steps=3", "bench.args.cost_repeats=1",
        "bench.args.ead_thresholds=[1.0]", f"bench.args.methods={METHODS}"])
    args = BENCHES.parse_args("speculative", cfg.bench.args, "bench.args")
    target, draft, deer = _models()
    run = tmp_path / "speculative"
    run_speculative_bench(cfg, run, args, target=target, draft=draft, deer=deer, tok=build_tokenizer())
    run = tmp_path / "speculative"
    res = json.loads((run / "results.json").read_text())
    for name in ("results.md", "speedup.png", "acceptance_by_position.png", "ead_accuracy_vs_share.png"):
        assert (run / name).exists(), name
    assert res["bench"] == "speculative" and res["num_examples"] == 6 and res["batch_size"] == 4
    assert set(res["forward_ms"]) == {"target_step", "target_verify", "draft_step", "deer_forward"}
    assert res["c"]["draft"] == pytest.approx(res["forward_ms"]["draft_step"] / res["forward_ms"]["target_step"])
    assert set(res["heads"]) == {"specdecpp"} and all(h["examples"] > 0 for h in res["heads"].values())
    assert (run / "heads" / "specdecpp" / "head.json").is_file()  # saved for bench.args.heads_from
    ar = res["ar"]
    assert ar["tokens_per_s"] == pytest.approx(ar["generated_tokens"] / ar["wall_s"])
    assert [r["method"] for r in res["rows"]] == ["f2", "sdpp", "taps", "ng"]
    assert 0.0 < res["rows"][0]["acceptance_rate"] < 1.0  # the noisy draft is partly accepted
    for r in res["rows"]:
        assert r["identical_to_ar"] == 1.0, r["method"]  # greedy speculative decoding is lossless
        assert r["exact_match"] == ar["exact_match"]
        assert len(r["acceptance_rate_by_position"]) == r["gamma_max"]
        assert r["speedup"] > 0 and r["tokens_per_target_forward"] >= 1.0 - 1e-9
        assert r["cost_model_speedup"] == pytest.approx(
            r["tokens_per_target_forward"] / (1 + r["drafts_per_round"] * r["c"]))
        assert 0.0 <= r["acceptance_rate"] <= 1.0
    ng = res["rows"][-1]
    assert ng["c"] == 0.0 and ng["draft_forwards"] == 0  # prompt lookup costs no forward
    assert ng["row_cost_model_speedup"] == pytest.approx(ng["tokens_per_target_forward"])
    taps = res["rows"][2]
    assert len(taps["route_counts"]) == 2 and sum(taps["route_counts"]) == taps["rounds"]  # real rows only
    ead = res["ead"]
    assert [e["method"] for e in ead] == ["draft alone", "EAD", "target alone (AR)"]
    assert ead[0]["large_share"] == 0.0 and ead[-1]["large_share"] == 1.0 and 0.0 <= ead[1]["large_share"] <= 1.0
    assert isinstance(res["verdict"], list) and any("sdpp" in line for line in res["verdict"])
    md = (run / "results.md").read_text()
    assert "EAD" in md and "| f2 |" in md
