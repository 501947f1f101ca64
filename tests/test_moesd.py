"""MoESD cost model (decode/moesd.py): hand-computed values and limiting cases (k = N is dense, batch -> inf
activates every expert, γ = 0 gives no speedup, free drafts and free verification give σ), the paper's direction on
real shapes, and shape_of's parameter split against the model's parameter count. Pure Python, no compiles."""

import dataclasses
import math

import pytest

from jaxtok.decode import moesd as m
from jaxtok.models import presets
from jaxtok.models.flops import num_params

HW = m.Hardware("toy", bandwidth=1e12, peak_flops=1e14)


def test_expected_active_experts_hand_values():
    assert m.expected_active_experts(8, 2, 1) == pytest.approx(2.0)  # one token: its k experts
    assert m.expected_active_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # = 3.5
    assert m.expected_active_experts(8, 2, 2) == pytest.approx(3.5)
    assert m.expected_active_experts(8, 2, 0) == 0.0
    assert m.expected_active_experts(0, 0, 10) == 0.0


def test_expected_active_experts_limits():
    # k = N: every token activates every expert, as a dense layer reads all its weights
    for t in (1, 3, 100):
        assert m.expected_active_experts(16, 16, t) == pytest.approx(16.0)
    # batch -> inf: all experts; monotone in the token count
    assert m.expected_active_experts(128, 8, 10_000) == pytest.approx(128.0)
    vals = [m.expected_active_experts(64, 4, t) for t in range(1, 200)]
    assert all(b >= a for a, b in zip(vals, vals[1:])) and vals[-1] <= 64


def test_tokens_per_round():
    assert m.expected_tokens_per_round(0.0, 4) == 1.0  # nothing accepted: the bonus token only
    assert m.expected_tokens_per_round(1.0, 4) == 5.0
    assert m.expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert m.expected_tokens_per_round(0.8, 0) == 1.0
    with pytest.raises(ValueError, match="alpha"):
        m.expected_tokens_per_round(1.5, 2)


def test_speedup_limits():
    # γ = 0: one token per round, verification = an AR step -> exactly 1
    assert m.sd_speedup(0.9, 0, t_step=2.0, t_verify=2.0, t_draft=0.5) == pytest.approx(1.0)
    # free drafts and verification as cheap as a step: the speedup is σ alone
    assert m.sd_speedup(0.7, 3, 1.0, 1.0, 0.0) == pytest.approx(m.expected_tokens_per_round(0.7, 3))
    # hand value: σ(0.5, 2) = 1.75; 1.75 * 1 / (2 * 0.1 + 1.5) = 1.0294...
    assert m.sd_speedup(0.5, 2, 1.0, 1.5, 0.1) == pytest.approx(1.75 / 1.7)
    assert m.target_efficiency(1.0, 4.0) == 0.25


def test_top_k_equal_n_is_the_dense_model():
    moe = m.TargetShape(dense_params=1e8, expert_params=2e7, num_experts=8, top_k=8)
    dense = m.TargetShape(dense_params=1e8 + 8 * 2e7)
    for tokens in (1, 4, 64, 4096):
        assert m.forward_time(moe, tokens, HW) == pytest.approx(m.forward_time(dense, tokens, HW))
    assert m.dense_equivalent(moe).active_params == moe.active_params == dense.active_params


def test_forward_time_regimes():
    moe = m.TargetShape(dense_params=1e8, expert_params=1e7, num_experts=64, top_k=2, bytes_per_param=2)
    one = m.forward_time(moe, 1, HW)
    # one token, memory-bound: dense bytes + k experts' bytes over the bandwidth
    assert one == pytest.approx((1e8 + 2 * 1e7) * 2 / 1e12)
    # batch -> inf: every expert is read, then compute-bound: time linear in tokens
    big = 10**7
    assert m.forward_time(moe, big, HW) == pytest.approx(2 * moe.active_params * big / 1e14, rel=1e-6)
    # an overhead adds once per forward
    hw = dataclasses.replace(HW, overhead=1e-3)
    assert m.forward_time(moe, 1, hw) == pytest.approx(one + 1e-3)
    # a measured expert count replaces eq. (2)
    assert m.forward_time(moe, 1, HW, active_experts=64) == pytest.approx((1e8 + 64e7) * 2 / 1e12)


def test_large_batch_efficiency_tends_to_one_over_gamma_plus_one():
    moe = m.TargetShape(dense_params=1e8, expert_params=1e7, num_experts=64, top_k=2)
    dense = m.dense_equivalent(moe)
    draft = m.TargetShape(dense_params=1e7)
    for shape in (moe, dense):
        p = m.predicted_speedup(shape, draft, 10**7, 3, 0.8, HW)
        assert p["target_efficiency"] == pytest.approx(0.25, rel=1e-3)
        assert p["experts_verify"] == pytest.approx(shape.num_experts)


def test_paper_direction_on_real_shapes():
    """MoESD's claim under the model with H100 numbers: at batch 1 the MoE gains less from SD than the dense model
    of equal active parameters (verification reads extra experts), at some medium batch it gains more."""
    target = m.shape_of(presets.get("qwen3-30b-a3b"), 2)
    dense = m.dense_equivalent(target)
    draft = m.shape_of(presets.get("qwen3-0.6b"), 2)
    hw = m.HARDWARE["h100-sxm"]
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    mc = m.speedup_curve(target, draft, batches, 3, 0.8, hw)
    dc = m.speedup_curve(dense, draft, batches, 3, 0.8, hw)
    assert mc[0]["speedup"] < dc[0]["speedup"]
    best = m.best_batch_gain(mc, dc)
    assert best["ratio"] > 1.2 and 16 <= best["batch"] <= 256
    assert mc[0]["experts_step"] == pytest.approx(8) and mc[-1]["experts_step"] == pytest.approx(128)


def test_shape_of_counts_match_the_model():
    cfg = presets.get("tiny_moe", vocab_size=64)
    s = m.shape_of(cfg)
    # all parameters but the input embedding, with the LM head counted as read
    assert s.total_params == num_params(cfg, include_embedding=False) + cfg.hidden_size * cfg.vocab_size
    assert s.expert_params == 3 * 64 * 32 * 2 and (s.num_experts, s.top_k, s.bytes_per_param) == (8, 2, 4.0)
    dense = m.shape_of(presets.get("tiny_teacher", vocab_size=64))
    assert dense.num_experts == 0 and dense.expert_params == 0


def test_bad_shapes_and_hardware():
    with pytest.raises(ValueError, match="top_k"):
        m.TargetShape(dense_params=1.0, expert_params=1.0, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="bandwidth"):
        m.Hardware("x", bandwidth=0.0, peak_flops=1.0)
    assert math.isclose(m.roofline(2e12, 1e14, HW), 2.0)


def _script():
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "moesd.py")
    spec = importlib.util.spec_from_file_location("moesd_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moesd_script"] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_script_config_errors_exit_2(capsys):
    import os

    s = _script()
    cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "scripts", "moesd.yaml")
    assert s.main([cfg, "--bogus=1"]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
    assert s.main([cfg, "--top_k=40"]) == 2
    assert "top_k=40" in capsys.readouterr().err


def test_script_routings_and_dispatch_copies():
    """The probe's routings activate the stated expert counts (distinct experts per token), and the script's
    ``moe_ragged``/``moe_tiled`` targets are the same weights under the library's two dispatches (equal logits)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxtok.models import Decoder, presets

    s = _script()
    r = s.routings(8, 16, 2, np.random.default_rng(0))
    assert list(r) == ["2 experts", "4 experts", "8 experts", "16 experts", "random"]
    assert [len(np.unique(v)) for k, v in r.items() if k != "random"] == [2, 4, 8, 16]
    assert all(len(set(row)) == 2 for v in r.values() for row in v.tolist())
    model = Decoder(presets.get("tiny_moe", vocab_size=32), rngs=nnx.Rngs(0))
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    ragged, tiled = s.with_dispatch(model, "ragged_dot"), s.with_dispatch(model, "tiled")
    assert ragged.cfg.moe_dispatch == "ragged_dot" and tiled.layers[0].mlp.dispatch == "tiled"
    np.testing.assert_allclose(tiled(tokens).logits, ragged(tokens).logits, atol=1e-5)
