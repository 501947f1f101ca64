"""Mixture-of-experts decoder (models/moe.py): routing and dispatch against hand/dense references, float32 logit and
aux-loss parity with transformers' Qwen3MoeForCausalLM and MixtralForCausalLM (unsharded and on a data x expert x
tensor mesh), save_hf round trip, presets/FLOPs/parameter counts, SFT train steps with the aux loss, and cached
greedy decoding.

The HF models are random tiny ones built here with torch + transformers (test extra), shared by module fixtures.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtok.decode import generate
from jaxtok.sampling import GREEDY
from jaxtok.mesh import axis_rules, make_mesh
from jaxtok.models import Decoder, ModelConfig, flops, presets
from jaxtok.models import moe
from jaxtok.models.hf import config_from_hf, config_to_hf, load_hf, save_hf, tensor_specs
from jaxtok.models.transformer import with_execution
from jaxtok.train.objectives.sft import sft_loss
from jaxtok.train.step import init_train_state, make_train_step
from test_hf import _RecordingView

ROOT = os.path.dirname(os.path.abspath(__file__))
F32_TOL = 1e-4  # as tests/test_hf.py

_spec = importlib.util.spec_from_file_location(
    "make_hf_fixtures", os.path.join(ROOT, "..", "scripts", "make_hf_fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
              max_position_embeddings=128, num_experts_per_tok=2)
FAMILIES = {
    # norm_topk_prob off, a dense layer in the middle (mlp_only_layers), tied embeddings
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                      num_experts=8, norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    # renormalised top-k (the routing of Qwen3-30B-A3B's norm_topk_prob=true, same formula)
    "mixtral": dict(cls="MixtralForCausalLM", num_hidden_layers=2, intermediate_size=16, num_local_experts=4),
    # q/k/v biases and a sigmoid-gated shared expert
    "qwen2_moe": dict(cls="Qwen2MoeForCausalLM", num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=4, norm_topk_prob=False),
}
PADS = (2, 0, 5, 1)


def build_hf(family, seed=0):
    """A random float32 transformers model with O(1) logits (every weight a seeded normal, as make_hf_fixtures)."""
    import torch
    import transformers

    spec = {**COMMON, **FAMILIES[family]}
    cls = getattr(transformers, spec.pop("cls"))
    torch.manual_seed(seed)
    model = cls(cls.config_class(**spec)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else noise * p.shape[-1] ** -0.5)
    model.config._attn_implementation = "eager"
    return model


def hf_aux_loss(hf, tokens, valid, positions):
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens.astype(np.int64)),
                 attention_mask=torch.as_tensor(valid.astype(np.int64)),
                 position_ids=torch.as_tensor(positions.astype(np.int64)), use_cache=False, output_router_logits=True)
    return float(out.aux_loss)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, reference padded logits, reference aux loss, batch)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = build_hf(family, seed=3 + i)
        path = str(tmp_path_factory.mktemp(family))
        hf.save_pretrained(path)
        tokens, valid, positions = fx.random_batch(64, seed=i, pads=PADS)
        out[family] = (path, fx.hf_logits(hf, tokens, valid, positions), hf_aux_loss(hf, tokens, valid, positions),
                       (tokens, valid, positions))
    return out


def max_err(ours, ref, valid):
    return float(np.abs(np.asarray(ours) - ref)[valid].max())


# --------------------------------------------------------------------------------------------------------------
# routing and dispatch
# --------------------------------------------------------------------------------------------------------------


def test_route_normalisation_hand_case():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    probs, w, e = moe.route(logits, 2, norm_topk_prob=False)
    np.testing.assert_allclose(probs, [[0.1, 0.5, 0.15, 0.25]], rtol=1e-6)
    np.testing.assert_array_equal(e, [[1, 3]])
    np.testing.assert_allclose(w, [[0.5, 0.25]], rtol=1e-6)  # Qwen3-MoE default: raw top-k probabilities
    _, w, _ = moe.route(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3]], rtol=1e-6)  # renormalised = Mixtral's softmax over the top-k
    np.testing.assert_allclose(w, jax.nn.softmax(logits[:, [1, 3]]), rtol=1e-6)


DISPATCHES = {"ragged_dot": moe.grouped_swiglu, "tiled": moe.tiled_swiglu,
              "tiled_tile3": lambda *a: moe.tiled_swiglu(*a, tile=3)}  # tiles straddling partial groups


@pytest.mark.parametrize("dispatch", list(DISPATCHES))
def test_grouped_dispatch_equals_every_expert_on_every_token(dispatch):
    rng = np.random.default_rng(0)
    N, D, F, E, K = 13, 8, 6, 5, 2
    x = rng.standard_normal((N, D), np.float32)
    gate, up = rng.standard_normal((E, D, F), np.float32), rng.standard_normal((E, D, F), np.float32)
    down = rng.standard_normal((E, F, D), np.float32)
    experts = np.argsort(rng.standard_normal((N, E)), axis=1)[:, :K].astype(np.int32)  # distinct per token
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    dense = np.einsum("nef,efd->ned", silu(np.einsum("nd,edf->nef", x, gate)) * np.einsum(
        "nd,edf->nef", x, up), down)  # [N, E, D]: every expert on every token
    want = np.take_along_axis(dense, experts[:, :, None], axis=1)  # [N, K, D]
    got = jax.jit(DISPATCHES[dispatch])(x, experts, gate, up, down)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    few = np.tile(np.arange(K, dtype=np.int32), (N, 1))  # 2 of 5 experts active: the other tiles are skipped
    np.testing.assert_allclose(jax.jit(DISPATCHES[dispatch])(x, few, gate, up, down),
                               np.take_along_axis(dense, few[:, :, None], axis=1), rtol=1e-5, atol=1e-5)


def test_tile_schedule_bound_and_layout():
    """Expert e's rows fill ceil(s_e / tile) tiles of its own, in expert order, within the static bound."""
    experts = jnp.array([[3, 0], [3, 1], [3, 0], [0, 3]], jnp.int32)  # sizes [3, 1, 0, 4]
    s = moe.tile_schedule(experts, 4, tile=2)
    assert s.tile_expert.shape == ((8 - 4) // 2 + 4,)  # (R - M) // tile + M, R = N·k = 8, M = min(E, R) = 4
    np.testing.assert_array_equal(s.active, [True] * 5 + [False])  # 2 + 1 + 0 + 2 tiles used
    np.testing.assert_array_equal(s.tile_expert[:5], [0, 0, 1, 3, 3])
    src = np.asarray(s.src).reshape(-1, 2)
    assert sorted(src[0].tolist() + src[1].tolist()) == [0, 2, 3, 4]  # expert 0: tokens 0, 2, 3 + one pad row
    np.testing.assert_array_equal(src[2], [1, 4])  # expert 1: token 1 + pad
    assert sorted(src[3:5].ravel().tolist()) == [0, 1, 2, 3]  # expert 3: four tokens, two full tiles
    flat = np.asarray(s.src)[np.asarray(s.slot)]  # each assignment's tile row holds its token
    np.testing.assert_array_equal(flat, np.repeat(np.arange(4), 2))
    assert moe.tile_rows(2, 16) == 1 and moe.tile_rows(128, 16) == 8 and moe.tile_rows(10_000, 16) == 64


def test_tiled_gradients_equal_ragged_dot():
    rng = np.random.default_rng(1)
    N, D, F, E, K = 11, 8, 6, 5, 2
    args = [rng.standard_normal(s, np.float32) for s in ((N, D), (E, D, F), (E, D, F), (E, F, D))]
    experts = np.argsort(rng.standard_normal((N, E)), axis=1)[:, :K].astype(np.int32)
    grads = {name: jax.jit(jax.grad(lambda x, g, u, d, f=f: jnp.sum(jnp.sin(f(x, experts, g, u, d))),
                                    argnums=(0, 1, 2, 3)))(*args) for name, f in DISPATCHES.items()}
    for name in ("tiled", "tiled_tile3"):
        for a, b in zip(grads["ragged_dot"], grads[name]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_dispatch_resolution():
    assert moe.resolve_dispatch("auto", "cpu", 1) == "tiled"
    assert moe.resolve_dispatch("auto", "gpu", 1) == moe.resolve_dispatch("auto", "tpu", 1) == "ragged_dot"
    assert moe.resolve_dispatch("auto", "cpu", 2) == "ragged_dot"  # expert-parallel mesh: GSPMD-split ragged_dot
    assert moe.resolve_dispatch("tiled", "gpu", 2) == "tiled"
    with pytest.raises(ValueError, match="moe_dispatch='gather'"):
        moe.resolve_dispatch("gather")
    with pytest.raises(ValueError, match="ModelConfig.moe_dispatch='x'"):
        presets.get("tiny_moe", moe_dispatch="x")


def test_config_validation_and_dense_default():
    cfg = presets.get("tiny_moe")
    assert cfg.is_sparse_layer(0) and cfg.is_sparse_layer(1)
    assert not presets.get("tiny_student").is_sparse_layer(0)
    mixed = dataclasses.replace(cfg, num_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [mixed.is_sparse_layer(i) for i in range(4)] == [False, True, False, False]
    assert mixed.mlp_only_layers == (3,)  # a list (JSON) becomes a hashable tuple
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        dataclasses.replace(cfg, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="only they have experts"):
        dataclasses.replace(cfg, architecture="qwen3")
    with pytest.raises(ValueError, match="only they have experts"):
        dataclasses.replace(cfg, num_experts=0)
    m = nnx.eval_shape(lambda: Decoder(mixed, rngs=nnx.Rngs(0)))
    assert isinstance(m.layers[1].mlp, moe.SparseMoE) and not isinstance(m.layers[0].mlp, moe.SparseMoE)


# --------------------------------------------------------------------------------------------------------------
# HF parity, aux loss, sharding, round trip
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["ragged_dot", "tiled"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_parity_float32_and_aux_loss(family, dispatch, hf_dirs):
    path, ref, ref_aux, (tokens, valid, _) = hf_dirs[family]
    model, cfg = load_hf(path)
    model = with_execution(model, moe_dispatch=dispatch)
    assert cfg.architecture == family and cfg.num_experts == (8 if family == "qwen3_moe" else 4)
    assert cfg.shared_expert_intermediate_size == (24 if family == "qwen2_moe" else 0)
    assert cfg.qkv_bias == (family == "qwen2_moe")
    assert cfg.norm_topk_prob == (family == "mixtral")
    layers = []

    @nnx.jit
    def forward_and_aux(model, tokens, valid):
        with moe.collect_router_stats() as seen:
            logits = model(tokens, valid=valid).logits
        layers.append(len(seen))
        return logits, moe.load_balancing_loss([s for _, s in seen])

    logits, ours = forward_and_aux(model, tokens, valid)
    err = max_err(logits, ref, valid)
    print(f"{family} {dispatch}: max |dlogit| unsharded {err:.2e}")
    assert err < F32_TOL
    assert layers == [sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))]
    np.testing.assert_allclose(float(ours), ref_aux, rtol=1e-5)


def test_bfloat16_load_close_to_float32_reference(hf_dirs):
    path, ref, _, (tokens, valid, _) = hf_dirs["qwen3_moe"]
    model, _ = load_hf(path, "bfloat16")
    assert model.layers[0].mlp.gate_weight_edf[...].dtype == jnp.bfloat16
    logits = nnx.jit(lambda m, t, v: m(t, valid=v).logits)(model, tokens, valid)
    per_token = np.abs(np.asarray(logits) - ref).max(-1)[valid]
    print(f"qwen3_moe: bfloat16 |dlogit| per token median {np.median(per_token):.3f} max {per_token.max():.3f}")
    # top-k routing is discontinuous: bf16 rounding flips a near-tied expert choice (here 1 token of 24 in layer 0,
    # whose changed hidden state later tokens attend to; HF's own bf16 forward happens to flip none), so
    # tests/test_hf.py's 0.15 on every token does not hold. Typical tokens match it (median 0.026; HF bf16 0.031).
    assert np.median(per_token) < 0.05 and np.mean(per_token < 0.15) > 0.8 and per_token.max() < 1.0


def test_aux_loss_wrapper_leaves_dense_models_alone():
    dense = nnx.eval_shape(lambda: Decoder(presets.get("tiny_draft"), rngs=nnx.Rngs(0)))
    out = (jnp.float32(3.0), jnp.float32(2.0), {"a": jnp.float32(1.0)})
    wrapped = moe.with_router_aux_loss(lambda model, batch, rng, **kw: out)
    for model in (dense, object()):
        assert all(a is b for a, b in zip(wrapped(model, {}, None), out))


def test_router_stats_skip_nested_traces(tiny_moe):
    """A forward inside an inner transform is not collected (its tracers would leak); one at the level is."""
    tokens = jnp.zeros((1, 4), jnp.int32)

    @jax.jit
    def f(tokens):
        with moe.collect_router_stats() as seen:
            jax.lax.map(lambda t: tiny_moe(t[None]).logits, tokens)  # nested: skipped
            n_nested = len(seen)
            tiny_moe(tokens)
        return n_nested, len(seen)

    assert f(tokens) == (0, 2)


def test_sharded_parity_with_experts_split(hf_dirs):
    mesh = make_mesh(2, 1, 2, expert=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    for family in FAMILIES:
        path, ref, _, (tokens, valid, _) = hf_dirs[family]
        model, cfg = load_hf(path, mesh=mesh)
        mlp = model.layers[0].mlp
        for w in (mlp.gate_weight_edf, mlp.up_weight_edf):
            assert w[...].sharding.is_equivalent_to(NamedSharding(mesh, P("expert", None, "tensor")), 3)
        assert mlp.down_weight_efd[...].sharding.is_equivalent_to(NamedSharding(mesh, P("expert", "tensor", None)), 3)
        # each device holds E/2 experts
        assert mlp.gate_weight_edf[...].addressable_shards[0].data.shape[0] == cfg.num_experts // 2
        graphdef, state = nnx.split(model)

        @jax.jit
        def fwd(state, tokens, valid):
            return nnx.merge(graphdef, state)(tokens, valid=valid).logits

        with axis_rules(mesh):
            logits = fwd(state, tokens, valid)  # auto: ragged_dot under an expert axis > 1
        err = max_err(logits, ref, valid)
        print(f"{family}: max |dlogit| sharded (data 2 x expert 2 x tensor 2) {err:.2e}")
        assert err < F32_TOL
    tiled = with_execution(model, moe_dispatch="tiled")  # explicit tiled: exact on the mesh too
    graphdef, state = nnx.split(tiled)
    with axis_rules(mesh):
        logits = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens, valid=valid).logits)(state)
    assert max_err(logits, ref, valid) < F32_TOL


def test_sharded_load_reads_only_each_devices_experts(hf_dirs):
    from jaxtok.models.hf import _open_checkpoint, build_decoder, hf_views

    path = hf_dirs["mixtral"][0]
    _, cfg = load_hf(path)
    views = hf_views(cfg, _open_checkpoint(path))
    reads = {}
    for p, stack in views.items():
        if p[-1].endswith(("_edf", "_efd")):
            stack.views = [_RecordingView(v, reads.setdefault(p, [])) for v in stack.views]
    build_decoder(cfg, views, mesh=make_mesh(2, 1, 2, expert=2))
    E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate, down = reads[("layers", 0, "mlp", "gate_weight_edf")], reads[("layers", 1, "mlp", "down_weight_efd")]
    # each of the 8 devices reads its E/2 experts' F/2 columns, never a whole expert
    assert set(gate) == {(D, F // 2)} and set(down) == {(F // 2, D)} and len(gate) == 8 * E // 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_round_trip(family, hf_dirs, tmp_path):
    from safetensors.numpy import load_file

    path, ref, _, (tokens, valid, positions) = hf_dirs[family]
    model, cfg = load_hf(path)
    save_hf(model, str(tmp_path))
    original, saved = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original) - {"lm_head.weight"} if cfg.tie_embeddings else set(saved) == set(original)
    for name, value in saved.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    hf = fx.hf_logits(_hf_from_pretrained(str(tmp_path)), tokens, valid, positions)
    np.testing.assert_allclose(hf[valid], ref[valid], rtol=0, atol=1e-6)
    again, cfg2 = load_hf(str(tmp_path))
    assert cfg2 == cfg
    written = json.load(open(tmp_path / "config.json"))
    assert written["architectures"] == [FAMILIES[family]["cls"]]


def _hf_from_pretrained(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


# --------------------------------------------------------------------------------------------------------------
# presets, parameter and FLOP counts
# --------------------------------------------------------------------------------------------------------------


def test_presets_parameter_counts_and_active_flops():
    q = presets.get("qwen3-30b-a3b")
    # published: Qwen3-30B-A3B 30.5B total / 3.3B activated; Mixtral-8x7B 46.7B / 12.9B
    assert round(flops.num_params(q) / 1e9, 1) == 30.5 and round(flops.num_params(q, active=True) / 1e9, 1) == 3.4
    m = presets.get("mixtral-8x7b")
    assert round(flops.num_params(m) / 1e9, 1) == 46.7 and round(flops.num_params(m, active=True) / 1e9, 1) == 12.9
    s = presets.get("qwen1.5-moe-a2.7b")  # published 14.3B / 2.7B (shared expert counted active)
    assert round(flops.num_params(s) / 1e9, 1) == 14.3 and round(flops.num_params(s, active=True) / 1e9, 1) == 2.7
    for name in ("qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"):
        cfg = presets.get(name)
        assert config_from_hf(config_to_hf(cfg, "bfloat16")) == cfg
    # FLOPs count the router and k experts only: a dense model whose MLP is the k active experts, plus the router
    E, K, Fm, D, L = q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size, q.hidden_size, q.num_layers
    dense_equiv = dataclasses.replace(q, architecture="qwen3", num_experts=0, intermediate_size=K * Fm)
    got, want = flops.flops_per_token(q, 4096), flops.flops_per_token(dense_equiv, 4096)
    assert got.attention == want.attention and got.dense == want.dense + L * 2 * D * E
    # exact against the module's parameters on a shrunken copy (with a dense layer)
    small = dataclasses.replace(q, num_layers=3, vocab_size=64, num_experts=4, num_experts_per_tok=2,
                                mlp_only_layers=(1,))
    abstract = nnx.eval_shape(lambda: Decoder(small, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert flops.num_params(small) == count
    specs = tensor_specs(small)
    assert {s.path for s in specs} == {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    shared = dataclasses.replace(small, architecture="qwen2_moe", shared_expert_intermediate_size=24, qkv_bias=True,
                                 qk_norm=False)
    abstract = nnx.eval_shape(lambda: Decoder(shared, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    assert flops.num_params(shared) == sum(int(np.prod(v.get_value().shape)) for _, v in params)
    assert {s.path for s in tensor_specs(shared)} == {tuple(p) for p, _ in params}


# --------------------------------------------------------------------------------------------------------------
# training and decoding through the existing step and generate
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe():
    cfg = presets.get("tiny_moe", vocab_size=32)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(0))))())  # one compiled init


def _sft_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, size=(4, 12)).astype(np.int32)
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[:, 6:] = True
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask)}


def test_sft_train_steps_with_aux_loss(tiny_moe):
    """Two SFT steps through make_train_step with the router aux loss added, on the data x expert x tensor mesh."""
    opt = optax.adam(3e-3)
    loss_fn = moe.with_router_aux_loss(sft_loss)
    batch = _sft_batch()
    cfg = tiny_moe.cfg

    @jax.jit
    def parts():  # CE and aux loss of the initial parameters, unsharded
        ce, n, _ = sft_loss(tiny_moe, batch, None)
        return ce / n, loss_fn(tiny_moe, batch, None)[2]["router_aux_loss"] / n

    ce0, lb0 = parts()
    router0 = np.asarray(tiny_moe.layers[0].mlp.router_weight_de[...])
    mesh = make_mesh(2, 1, 2, expert=2)
    graphdef, state = init_train_state(tiny_moe, opt, mesh=mesh)
    step = make_train_step(tiny_moe, opt, loss_fn, mesh=mesh)
    metrics = []
    for _ in range(2):
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[1]["loss"] < metrics[0]["loss"]
    # the reported loss is CE + coef * aux of the parameters before the update; HF's aux is >= 1 (k=2 slots)
    np.testing.assert_allclose(metrics[0]["loss"], float(ce0) + cfg.router_aux_loss_coef * float(lb0), rtol=1e-5)
    assert metrics[0]["router_aux_loss"] == pytest.approx(float(lb0), rel=1e-5)
    assert 1.0 <= metrics[0]["router_aux_loss"] <= cfg.num_experts
    router = state.params["layers"][0]["mlp"]["router_weight_de"].get_value()
    assert router.sharding.spec == P() or router.sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    assert not np.allclose(np.asarray(router), router0)  # the router is trained
    gate = state.params["layers"][0]["mlp"]["gate_weight_edf"].get_value()
    assert gate.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", None, "tensor")), 3)


def test_train_step_equal_across_dispatches(tiny_moe):
    """One SFT step (router aux loss included) from the same parameters: tiled and ragged_dot give the same loss and
    the same updated parameters (plain SGD with rate 1: the update is the gradient)."""
    opt = optax.sgd(1.0)
    loss_fn = moe.with_router_aux_loss(sft_loss)
    out = {}
    for d in ("ragged_dot", "tiled"):
        model = with_execution(tiny_moe, moe_dispatch=d)
        graphdef, state = init_train_state(model, opt)
        state, m = make_train_step(model, opt, loss_fn, donate=False)(state, _sft_batch())  # tiny_moe shares arrays
        out[d] = (float(m["loss"]), jax.tree.leaves(state.params))
    assert out["tiled"][0] == pytest.approx(out["ragged_dot"][0], rel=1e-6)
    for a, b in zip(out["ragged_dot"][1], out["tiled"][1]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_greedy_generate_equals_full_forward_argmax(tiny_moe):
    rows = [[5, 6, 7], [9, 10, 11, 12, 13], [4]]
    width, n = 5, 5
    prompt = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    for i, r in enumerate(rows):
        prompt[i, width - len(r):], valid[i, width - len(r):] = r, True
    out = generate(tiny_moe, prompt, valid, max_new_tokens=n, stop_tokens=(), sampling=GREEDY, rng=jax.random.key(0))
    fwd = jax.jit(lambda toks, at: jnp.argmax(tiny_moe(toks).logits[0, at]))
    for i, row in enumerate(rows):
        toks = np.zeros((1, width + n), np.int32)  # one buffer width: right padding is invisible to causal attention
        toks[0, :len(row)] = row
        for t in range(len(row), len(row) + n):
            toks[0, t] = int(fwd(jnp.asarray(toks), t - 1))
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), toks[0, len(row):len(row) + n])


@pytest.mark.slow
def test_sft_run_through_the_train_loop_adds_the_aux_loss(tmp_path):
    """``jaxtok train`` on a one-layer tiny_moe on a data 2 x expert 2 x tensor 2 mesh (``mesh.expert``): the loop's
    objective carries the router aux loss (build_objective wraps every objective) and the final eval decodes with
    the MoE model."""
    from jaxtok.config import from_dict
    from jaxtok.train import loop

    cfg = from_dict({
        "model": {"preset": "tiny_moe", "overrides": {"num_layers": 1}},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 24, "batch_size": 8,
                 "num_eval": 8},
        "objective": {"name": "sft"},
        "optimizer": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 2, "log_every": 1, "eval_batches": 1},
        "decode": {"max_new_tokens": 6, "batch_size": 8},
        "run": {"progress": False},
        "mesh": {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2},
    })
    from jaxtok.mesh import mesh_from_config

    assert dict(mesh_from_config(cfg.mesh).shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    summary = loop.train(cfg, tmp_path / "run")
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert all(1.0 <= r["router_aux_loss"] <= 8.0 for r in records)
    assert 0.0 <= summary["eval/exact_match"] <= 1.0


def test_model_moe_dispatch_config_key():
    """``model.moe_dispatch`` reaches the built model (preset path and ``init_from`` path through
    ``with_model_execution``); a bad value is a ConfigError naming the key and the allowed values."""
    from jaxtok.config import from_dict
    from jaxtok.registry import ConfigError
    from jaxtok.train.loop import build_model, with_model_execution

    def cfg(**model):
        return from_dict({"model": {"preset": "tiny_moe", **model}, "data": {"task": "arith"}})

    assert build_model(cfg(moe_dispatch="tiled"), vocab_size=64).cfg.moe_dispatch == "tiled"
    assert build_model(cfg(), vocab_size=64).cfg.moe_dispatch == "auto"
    built = build_model(cfg(moe_dispatch="tiled"), vocab_size=64)
    assert with_model_execution(built, cfg(moe_dispatch="ragged_dot").model).cfg.moe_dispatch == "ragged_dot"
    with pytest.raises(ConfigError, match=r"model.moe_dispatch.*'ragged_dot'.*'tiled'"):
        cfg(moe_dispatch="gather")
