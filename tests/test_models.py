"""Tests for the jaxtok decoder (models/transformer.py), its KV cache, presets and FLOP counts.

float32 throughout (highest matmul precision is set in conftest) unless a test says otherwise.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtok.mesh import axis_rules, logical_to_spec, make_mesh
from jaxtok.models import Decoder, KVCache, ModelConfig, RopeScaling, flops_per_token, num_params, presets
from jaxtok.models.transformer import rope_inv_freq

V = 32
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=4)
TOL = 1e-5


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "block_size", "return_hidden"))
def _fwd(graphdef, state, tokens, positions=None, valid=None, cache=None, logits_at=None, attention="causal",
         block_size=None, return_hidden=False):
    return nnx.merge(graphdef, state)(tokens, positions=positions, valid=valid, cache=cache, logits_at=logits_at,
                                      attention=attention, block_size=block_size, return_hidden=return_hidden)


def fwd(model, tokens, **kw):
    """A jitted forward (one compile per shape instead of op-by-op dispatch)."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    if kw.get("valid") is None:
        kw["valid"] = jnp.ones(tokens.shape, bool)
    return _fwd(graphdef, state, tokens, **kw)


@functools.lru_cache(maxsize=None)
def model_for(cfg=CFG, seed=0):
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def toks(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def maxdiff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# --------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------


CAP = 12  # one cache capacity and one reference shape for every cache test (fewer compiles)


def causal_ref(model, *seqs):
    """Reference causal logits of each 1-D sequence (<= CAP tokens), from one full forward of shape [2, CAP]:
    each sequence is right-extended with arbitrary tokens, which causal attention never lets earlier positions see
    (checked by test_bidirectional_sees_the_future_causal_does_not)."""
    out = []
    for i in range(0, len(seqs), 2):
        pair = list(seqs[i:i + 2])
        rows = [jnp.concatenate([q, jnp.full((CAP - q.shape[0],), 7, jnp.int32)]) for q in pair]
        rows += rows[:1] * (2 - len(rows))
        logits = fwd(model, jnp.stack(rows)).logits
        out += [logits[j, :q.shape[0]] for j, q in enumerate(pair)]
    return out


def test_incremental_decoding_equals_full_forward():
    """Prefill 3 tokens, then 1-token, 1-token and 3-token appends == one full forward (f32, 1e-5)."""
    model = model_for()
    tokens = toks(0, (2, 8))
    full = fwd(model, tokens).logits
    cache = KVCache.init(CFG, 2, CAP)
    pieces = []
    for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 8)):
        out = fwd(model, tokens[:, lo:hi], cache=cache)
        cache = out.cache
        pieces.append(out.logits)
    np.testing.assert_array_equal(cache.lengths, [8, 8])
    assert maxdiff(jnp.concatenate(pieces, axis=1), full) < TOL


def _poison(cache: KVCache, value) -> KVCache:
    """Fill every slot at or beyond each row's length with ``value`` (k, v) and garbage positions."""
    stale = jnp.arange(cache.capacity)[None, :] >= cache.lengths[:, None]  # [B, S]
    s5 = stale[None, :, :, None, None]
    garbage_pos = jax.random.randint(jax.random.key(9), cache.positions.shape, 0, 1000)
    return dataclasses.replace(cache, k=jnp.where(s5, value, cache.k), v=jnp.where(s5, value, cache.v),
                               positions=jnp.where(stale, garbage_pos, cache.positions))


@pytest.mark.parametrize("garbage", [1e30, -3e4, jnp.nan])
def test_stale_cache_entries_never_influence_outputs(garbage):
    """Entries beyond a row's length (after a per-row rollback) hold garbage; outputs are unchanged.

    The NaN case fails while attention multiplies zero probabilities by stale values (0 * NaN = NaN)."""
    model = model_for()
    tokens = toks(1, (2, 8))
    cache = fwd(model, tokens[:, :6], cache=KVCache.init(CFG, 2, CAP)).cache
    cache = cache.rollback(jnp.array([4, 2]))
    new = toks(2, (2, 3))
    clean = fwd(model, new, cache=cache).logits
    dirty = fwd(model, new, cache=_poison(cache, garbage)).logits
    assert bool(jnp.all(jnp.isfinite(dirty))), f"stale cache entries = {garbage} leak into the outputs"
    assert maxdiff(dirty, clean) < TOL


def test_rollback_then_reappend_equals_never_written():
    """Per-row rollback, then appending other tokens == full forwards over the kept prefix + new tokens, row by row
    (rows of different lengths in one batch)."""
    model = model_for()
    tokens = toks(3, (2, 6))
    cache = fwd(model, tokens, cache=KVCache.init(CFG, 2, CAP)).cache
    keep = [4, 2]
    cache = cache.rollback(jnp.array(keep))
    np.testing.assert_array_equal(cache.lengths, keep)
    new = toks(4, (2, 3))
    out = fwd(model, new, cache=cache)
    np.testing.assert_array_equal(out.cache.lengths, [7, 5])
    nxt = toks(5, (2, 1))  # one more 1-token step from rows of different lengths
    out2 = fwd(model, nxt, cache=out.cache)
    refs = causal_ref(model, *[jnp.concatenate([tokens[b, :n], new[b], nxt[b]]) for b, n in enumerate(keep)])
    for b, n in enumerate(keep):
        assert maxdiff(out.logits[b], refs[b][n:n + 3]) < TOL, f"row {b}"
        assert maxdiff(out2.logits[b], refs[b][n + 3:]) < TOL, f"row {b}"


def test_right_padded_prefill_rows_of_different_lengths():
    """A right-padded prefill, rolled back to each row's true length, then decoded == per-row full forwards."""
    model = model_for()
    tokens = toks(6, (2, 8))
    lengths = np.array([8, 3])
    valid = jnp.arange(8)[None, :] < lengths[:, None]
    out = fwd(model, tokens, valid=valid, cache=KVCache.init(CFG, 2, CAP))
    cache = out.cache.rollback(jnp.asarray(lengths))
    nxt = toks(7, (2, 3))
    step = fwd(model, nxt, cache=cache)
    refs = causal_ref(model, *[jnp.concatenate([tokens[b, :n], nxt[b]]) for b, n in enumerate(lengths)])
    for b, n in enumerate(lengths):
        assert maxdiff(out.logits[b, :n], refs[b][:n]) < TOL, f"row {b}"
        assert maxdiff(step.logits[b], refs[b][n:]) < TOL, f"row {b}"


def test_left_padding_with_and_without_cache():
    """A left-padded row gives the unpadded sequence's logits at its valid positions (causal), and decoding after a
    left-padded prefill matches too."""
    model = model_for()
    pad = 3
    seq, other = toks(8, (5,)), toks(10, (8,))
    padded = jnp.concatenate([toks(9, (pad,)), seq])  # padding holds arbitrary (valid) ids
    tokens = jnp.stack([padded, other])
    valid = jnp.stack([jnp.arange(8) >= pad, jnp.ones(8, bool)])
    out = fwd(model, tokens, valid=valid).logits
    pre = fwd(model, tokens, valid=valid, cache=KVCache.init(CFG, 2, CAP))
    nxt = toks(11, (2, 1))
    s1 = fwd(model, nxt, cache=pre.cache)
    s2 = fwd(model, nxt[::-1], cache=s1.cache)
    ref0, ref1 = causal_ref(model, jnp.concatenate([seq, nxt[0], nxt[1]]), jnp.concatenate([other, nxt[1], nxt[0]]))
    assert maxdiff(out[0, pad:], ref0[:5]) < TOL and maxdiff(out[1], ref1[:8]) < TOL
    assert maxdiff(pre.logits[0, pad:], ref0[:5]) < TOL and maxdiff(pre.logits[1], ref1[:8]) < TOL
    assert maxdiff(s1.logits[0, 0], ref0[5]) < TOL and maxdiff(s2.logits[0, 0], ref0[6]) < TOL
    assert maxdiff(s1.logits[1, 0], ref1[8]) < TOL and maxdiff(s2.logits[1, 0], ref1[9]) < TOL


def test_cache_overflow_is_a_clear_error():
    model = model_for()
    cache = fwd(model, toks(0, (2, 8)), cache=KVCache.init(CFG, 2, CAP)).cache
    cache = cache.rollback(jnp.array([8, 2]))
    with pytest.raises(ValueError, match=f"KV cache overflow.*capacity {CAP}"):
        model(toks(1, (2, 5)), cache=cache)


# --------------------------------------------------------------------------------------------------------------
# Attention kinds
# --------------------------------------------------------------------------------------------------------------


def _changed_at(model, t, **kw):
    """Per-position max |Δlogit| [T] after changing the token at position t."""
    tokens = toks(12, (2, 8))
    altered = tokens.at[:, t].set((tokens[:, t] + 1) % V)
    return np.asarray(jnp.abs(fwd(model, altered, **kw).logits - fwd(model, tokens, **kw).logits)).max((0, 2))


def test_bidirectional_sees_the_future_causal_does_not():
    model = model_for()
    d_bi = _changed_at(model, 5, attention="bidirectional")
    d_causal = _changed_at(model, 5)
    assert d_bi[:5].min() > 1e-4
    assert d_causal[:5].max() < 1e-6 and d_causal[5:].min() > 1e-4


def test_block_causal_masks():
    """block_size=3 over T=8: blocks {0,1,2}, {3,4,5}, {6,7}. Changing token 4 changes its block and later ones."""
    model = model_for()
    d = _changed_at(model, 4, attention="block_causal", block_size=3)
    assert d[:3].max() < 1e-6
    assert d[3:].min() > 1e-4  # position 3 sees position 4 (same block)


def test_block_causal_limits():
    model = model_for()
    tokens = toks(13, (2, 8))
    valid = jnp.stack([jnp.ones(8, bool), jnp.arange(8) >= 2])
    causal = fwd(model, tokens, valid=valid).logits
    bi = fwd(model, tokens, valid=valid, attention="bidirectional").logits
    b1 = fwd(model, tokens, valid=valid, attention="block_causal", block_size=1).logits
    b8 = fwd(model, tokens, valid=valid, attention="block_causal", block_size=8).logits
    b20 = fwd(model, tokens, valid=valid, attention="block_causal", block_size=20).logits
    assert maxdiff(b1, causal) < TOL
    assert maxdiff(b8, bi) < TOL and maxdiff(b20, bi) < TOL
    assert maxdiff(causal, bi) > 1e-3
    with pytest.raises(ValueError, match="block_size"):
        model(tokens, attention="block_causal")
    with pytest.raises(ValueError, match="attention='sliding'"):
        model(tokens, attention="sliding")


@pytest.mark.parametrize("attention, block_size", [("bidirectional", None), ("block_causal", 2)])
def test_left_padding_non_causal(attention, block_size):
    """Padding keys are never attended and blocks count from the first valid token (positions), so a left-padded
    row equals the unpadded sequence under bidirectional and block_causal attention too."""
    model = model_for()
    seq = toks(23, (1, 5))
    padded = jnp.concatenate([toks(24, (1, 3)), seq], axis=1)
    valid = (jnp.arange(8) >= 3)[None]
    ref = fwd(model, seq, attention=attention, block_size=block_size).logits
    out = fwd(model, padded, valid=valid, attention=attention, block_size=block_size).logits
    assert maxdiff(out[:, 3:], ref) < TOL


def test_block_causal_with_cache_equals_full():
    """Block diffusion: appending whole blocks to the cache == a full block_causal forward."""
    model = model_for()
    tokens = toks(14, (2, 8))
    full = fwd(model, tokens, attention="block_causal", block_size=4).logits
    c = KVCache.init(CFG, 2, CAP)
    a = fwd(model, tokens[:, :4], cache=c, attention="block_causal", block_size=4)
    b = fwd(model, tokens[:, 4:], cache=a.cache, attention="block_causal", block_size=4)
    assert maxdiff(jnp.concatenate([a.logits, b.logits], 1), full) < TOL


# --------------------------------------------------------------------------------------------------------------
# Logits: selective, shifted (Dream), tied / untied
# --------------------------------------------------------------------------------------------------------------


def test_selective_logits_equal_gathered_full_logits():
    model = model_for()
    tokens = toks(15, (2, 8))
    idx = jnp.array([[0, 7, 3], [5, 5, 1]], jnp.int32)
    full = fwd(model, tokens, return_hidden=True)
    sel = fwd(model, tokens, logits_at=idx)
    assert sel.logits.shape == (2, 3, V)
    assert maxdiff(sel.logits, jnp.take_along_axis(full.logits, idx[..., None], axis=1)) < TOL
    assert maxdiff(model.logits(full.hidden), full.logits) < TOL


def test_dream_shift_logits_alignment():
    """Dream: the raw logit at i predicts token i+1; after the shift, logits[:, i] (i >= 1) is the raw logit at i-1,
    and logits_at gathers the shifted logits."""
    cfg = dataclasses.replace(CFG, shift_logits=True, mask_token_id=1)
    shifted_model = model_for(cfg)
    raw_model = model_for(dataclasses.replace(cfg, shift_logits=False))
    tokens = toks(16, (2, 6))
    shifted = fwd(shifted_model, tokens, attention="bidirectional").logits
    raw = fwd(raw_model, tokens, attention="bidirectional").logits
    assert maxdiff(shifted[:, 1:], raw[:, :-1]) < TOL
    assert maxdiff(shifted[:, 0], raw[:, 0]) < TOL
    idx = jnp.array([[0, 1, 5], [3, 2, 4]], jnp.int32)
    sel = fwd(shifted_model, tokens, logits_at=idx, attention="bidirectional").logits
    assert maxdiff(sel, jnp.take_along_axis(shifted, idx[..., None], axis=1)) < TOL


def test_dream_shift_logits_with_cache_is_refused():
    """Dream's shifted logits with a KV cache would misalign the first logit of every appended chunk (it is
    predicted by the previous chunk's last hidden state, which the cache does not keep): refused clearly."""
    cfg = dataclasses.replace(CFG, shift_logits=True, mask_token_id=1)
    model = model_for(cfg)
    with pytest.raises(ValueError, match="shift_logits"):
        model(toks(25, (2, 4)), cache=KVCache.init(cfg, 2, CAP), attention="block_causal", block_size=4)


def test_tied_and_untied_embeddings():
    tokens = toks(17, (2, 8))
    tied = model_for(dataclasses.replace(CFG, tie_embeddings=True))
    untied = model_for()
    assert not hasattr(tied, "lm_head_dv") and hasattr(untied, "lm_head_dv")
    out_t = fwd(tied, tokens, return_hidden=True)
    out_u = fwd(untied, tokens, return_hidden=True)
    assert maxdiff(out_t.logits, out_t.hidden @ tied.embed_vd[...].T) < TOL
    assert maxdiff(out_u.logits, out_u.hidden @ untied.lm_head_dv[...]) < TOL
    n_t = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    n_u = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
    assert n_u - n_t == CFG.hidden_size * V


def test_qkv_bias_and_qk_norm_variants():
    tokens = toks(18, (2, 8))
    base = fwd(model_for(), tokens).logits
    bias_model = Decoder(dataclasses.replace(CFG, qkv_bias=True), rngs=nnx.Rngs(0))
    # zero-initialised biases: same weights, same outputs; non-zero biases change them
    assert maxdiff(fwd(bias_model, tokens).logits, base) < TOL
    for layer in bias_model.layers:
        for name in ("q_bias_hn", "k_bias_kn", "v_bias_kn"):
            p = getattr(layer.attn, name)
            p[...] = jax.random.normal(jax.random.key(len(name)), p[...].shape) * 0.5
    assert maxdiff(fwd(bias_model, tokens).logits, base) > 1e-3
    norm_model = model_for(dataclasses.replace(CFG, qk_norm=True))
    assert norm_model.layers[0].attn.q_norm.weight[...].shape == (CFG.head_dim,)
    out = fwd(norm_model, tokens).logits
    assert bool(jnp.all(jnp.isfinite(out))) and maxdiff(out, base) > 1e-3


# --------------------------------------------------------------------------------------------------------------
# RoPE scaling
# --------------------------------------------------------------------------------------------------------------


def test_rope_inverse_frequencies_hand_computed():
    """head_dim 8, theta 1e4: inv_freq = [1, 0.1, 0.01, 0.001]; wavelengths 2π/inv = [6.28, 62.8, 628, 6283]."""
    np.testing.assert_allclose(rope_inv_freq(8, 1e4, None), [1, 0.1, 0.01, 0.001], rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(8, 1e4, RopeScaling("linear", factor=4.0)),
                               [0.25, 0.025, 0.0025, 0.00025], rtol=1e-6)
    # llama3: original 64, low 1, high 4 -> low_wavelen 64, high_wavelen 16, factor 8.
    # 6.28 < 16: kept; 628, 6283 > 64: divided by 8; 62.8 in [16, 64]: smoothed with
    # s = (64 / 62.83 - 1) / (4 - 1) = 0.0061968, inv = (1 - s) * 0.1 / 8 + s * 0.1 = 0.0130422
    s = (64 / (2 * np.pi / 0.1) - 1) / 3
    assert abs(s - 0.0061968) < 1e-6
    llama3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=64)
    np.testing.assert_allclose(rope_inv_freq(8, 1e4, llama3), [1.0, 0.0130422, 0.00125, 0.000125], rtol=1e-5)


def test_rope_scaling_reaches_the_model():
    tokens = toks(19, (2, 8))
    base = fwd(model_for(), tokens).logits
    lin = model_for(dataclasses.replace(CFG, rope_scaling=RopeScaling("linear", factor=4.0)))
    assert maxdiff(fwd(lin, tokens).logits, base) > 1e-4
    # linear scaling by f at positions p == no scaling at positions p / f
    pos = jnp.broadcast_to(jnp.arange(8) * 4, (2, 8))
    assert maxdiff(fwd(lin, tokens, positions=pos).logits, fwd(model_for(), tokens, positions=pos // 4).logits) < TOL


# --------------------------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [V, V + 100, -1])
def test_token_ids_outside_vocab_rejected(bad):
    model = model_for()
    tokens = np.array(toks(20, (2, 4))).copy()
    tokens[1, 2] = bad
    msg = rf"tokens: token id {bad} at index \[1, 2\] is outside the vocabulary \[0, {V}\)"
    with pytest.raises(ValueError, match=msg):
        model(jnp.asarray(tokens))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(jnp.asarray(tokens[:, 2:]), cache=KVCache.init(CFG, 2, 4))


# --------------------------------------------------------------------------------------------------------------
# Sharding, presets, parameter counts, FLOPs, bf16
# --------------------------------------------------------------------------------------------------------------


def test_preset_sharded_on_2x2x2_mesh_matches_unsharded():
    cfg = presets.get("tiny_student", vocab_size=64)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(21), (4, 6), 0, 64, jnp.int32)
    valid = jnp.ones((4, 6), bool).at[1, :2].set(False)
    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda s, t, v: nnx.merge(graphdef, s)(t, valid=v).logits)(state, tokens, valid)

    mesh = make_mesh(2, 2, 2)

    def place(var):
        spec = logical_to_spec(var.get_metadata()["logical_axes"], mesh=mesh, shape=var.get_value().shape)
        return var.replace(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    sharded = jax.tree.map(place, state, is_leaf=is_var)
    for path, var in nnx.to_flat_state(sharded):
        axes = var.get_metadata()["logical_axes"]
        assert var.get_value().sharding.spec == logical_to_spec(axes, mesh=mesh, shape=var.get_value().shape), path
    block = sharded["layers"][0]
    assert sharded["embed_vd"].get_value().sharding.spec == P("tensor", "fsdp")
    assert block["attn"]["q_weight_dhn"].get_value().sharding.spec == P("fsdp", "tensor", None)
    assert block["mlp"]["down_weight_fd"].get_value().sharding.spec == P("tensor", "fsdp")
    assert block["attn_norm"]["weight"].get_value().sharding.spec == P("fsdp")

    batch = NamedSharding(mesh, logical_to_spec(("batch", None), mesh=mesh))
    with axis_rules(mesh):
        out = jax.jit(lambda s, t, v: nnx.merge(graphdef, s)(t, valid=v).logits)(
            sharded, jax.device_put(tokens, batch), jax.device_put(valid, batch))
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert maxdiff(out, ref) < TOL


@pytest.mark.parametrize("name", presets.names())
def test_num_params_matches_module(name):
    cfg = presets.get(name)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert num_params(cfg) == count
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    assert num_params(cfg, include_embedding=False) == count - embed


def test_num_params_real_shape_sanity():
    """Published sizes: Qwen3-0.6B ~0.60B (tied), Llama-3.2-1B ~1.24B, Qwen2.5-7B ~7.6B."""
    assert abs(num_params(presets.get("qwen3-0.6b")) / 1e9 - 0.596) < 0.01
    assert abs(num_params(presets.get("llama-3.2-1b")) / 1e9 - 1.236) < 0.01
    assert abs(num_params(presets.get("qwen2.5-7b")) / 1e9 - 7.616) < 0.01


def test_flops_hand_computed():
    """D=4, F=8, H=2, K=1, N=2, V=10, L=1, seq 6.
    qkvo = 2*4*(2*2 + 2*1*2) + 2*2*2*4 = 64 + 32 = 96; mlp = 2*3*4*8 = 192; lm head = 2*4*10 = 80 -> dense 368.
    attention = L * 2 (scores + context) * 2 * H*N * attended = 4 * 4 * attended: causal 6/2 -> 48, full 6 -> 96."""
    cfg = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=2)
    causal = flops_per_token(cfg, 6)
    assert causal.dense == 368 and causal.attention == 48 and causal.forward == 416
    assert causal.train == 3 * 416
    bi = flops_per_token(cfg, 6, attention="bidirectional")
    assert bi.dense == 368 and bi.attention == 96 and bi.train == 3 * bi.forward
    two = flops_per_token(dataclasses.replace(cfg, num_layers=2), 6)
    assert two.dense == 368 + 288 and two.attention == 96


def test_flops_dense_is_twice_matmul_params():
    """Dense forward FLOPs/token = 2 x (non-embedding params that are matmul weights + LM head)."""
    cfg = presets.get("llama-3.2-1b")
    matmul = num_params(cfg, include_embedding=False) - cfg.num_layers * 2 * cfg.hidden_size - cfg.hidden_size
    assert flops_per_token(cfg, 1).dense == 2 * (matmul + cfg.vocab_size * cfg.hidden_size)


def test_bf16_compute_close_to_f32():
    """bf16 matmuls (f32 params; norms, softmax and logits in f32) stay within 5% of the f32 logits' range:
    max |Δlogit| < 0.05 * max |logit_f32| (bf16 keeps 8 mantissa bits, rel. 2^-8 per rounding; measured ~2%, eager
    and jitted differ because XLA fuses away some roundings)."""
    f32 = model_for()
    bf16 = Decoder(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = toks(22, (2, 8))
    ref = fwd(f32, tokens).logits
    out = fwd(bf16, tokens)
    assert out.logits.dtype == jnp.float32
    bound = 0.05 * float(jnp.max(jnp.abs(ref)))
    d = maxdiff(out.logits, ref)
    assert 0 < d < bound, (d, bound)
    step = fwd(bf16, tokens[:, :5], cache=KVCache.init(bf16.cfg, 2, CAP))
    assert step.cache.k.dtype == jnp.bfloat16
    assert maxdiff(step.logits, ref[:, :5]) < bound
