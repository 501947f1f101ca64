"""models/attention.py: every attention kernel against the xla path (and the xla path against a hand-written
softmax), each jaxtok mask kind run or refused, impl selection per backend, and the Decoder wired to it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import ConfigError, ModelSection
from jaxtok.models import Decoder
from jaxtok.models.attention import ATTENTION_IMPLS, attend, attend_xla, resolve_impl
from jaxtok.models.cache import KVCache
from jaxtok.models.transformer import ModelConfig, attention_mask

from _worker import tiny_model_config


def _qkv(B, T, S, H, K, N, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, N)), jax.random.normal(ks[1], (B, S, K, N)),
            jax.random.normal(ks[2], (B, S, K, N)))


def _masks(B, T, left_pad):
    """Each jaxtok mask kind (attention_mask) for left-padded rows: ``{kind: (mask [B, T, T], valid [B, T])}``."""
    valid = jnp.arange(T)[None, :] >= jnp.asarray(left_pad)[:, None]  # [B, T]
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    slot = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    sib_pos = pos.at[:, -2:].set(pos[:, -3:-2])  # the last two tokens are alternatives at the third-last position
    return {
        "causal": (attention_mask("causal", pos, valid, pos, valid), valid),
        "bidirectional": (attention_mask("bidirectional", pos, valid, pos, valid), valid),
        "block_causal": (attention_mask("block_causal", pos, valid, pos, valid, block_size=4), valid),
        "siblings": (attention_mask("siblings", sib_pos, valid, sib_pos, valid, q_slot=slot, k_slot=slot), valid),
    }


def _on_valid(x, valid):
    return np.asarray(jnp.where(valid[:, :, None, None], x, 0.0))


def test_xla_path_is_the_softmax_formula_and_the_old_code():
    # attend(impl='xla') against softmax(q k^T / sqrt(N) masked) v computed in float64 numpy, per head with GQA
    B, T, H, K, N = 2, 6, 4, 2, 8
    q, k, v = _qkv(B, T, T, H, K, N)
    mask, valid = _masks(B, T, [2, 0])["block_causal"]
    out = np.asarray(attend(q, k, v, mask, impl="xla"))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    mn, valid = np.asarray(mask), np.asarray(valid)
    for b in range(B):
        for t in range(T):
            if not valid[b, t]:
                continue
            for h in range(H):
                s = kn[b, :, h // (H // K)] @ qn[b, t, h] / np.sqrt(N)
                s = np.where(mn[b, t], s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                np.testing.assert_allclose(out[b, t, h], p @ vn[b, :, h // (H // K)], rtol=1e-5, atol=1e-5)
    # the xla kernel is jaxtok's previous attention core, bit for bit
    vz = jnp.where(jnp.any(mask, axis=1)[:, :, None, None], v, 0.0)
    qg = q.reshape(B, T, K, H // K, N)
    scores = jnp.einsum("btkgn,bskn->bkgts", qg, k, preferred_element_type=jnp.float32) * (N**-0.5)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -1e30), axis=-1)
    old = jnp.einsum("bkgts,bskn->btkgn", probs, vz).reshape(B, T, H, N)
    np.testing.assert_array_equal(np.asarray(attend_xla(q, k, vz, mask, jnp.float32)), np.asarray(old))
    np.testing.assert_array_equal(out, np.asarray(old))


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "block_causal", "siblings"])
def test_dot_product_attention_matches_xla_on_every_mask(kind):
    # jax.nn.dot_product_attention (implementation='xla' on CPU) with GQA; causal/bidirectional through
    # is_causal + a key-padding mask, the rest through the full mask array
    B, T, H, K, N = 2, 8, 4, 2, 8
    q, k, v = _qkv(B, T, T, H, K, N, seed=1)
    mask, valid = _masks(B, T, [3, 0])[kind]
    mk = kind if kind in ("causal", "bidirectional") else "general"
    ref = attend(q, k, v, mask, kind=mk, valid=valid, impl="xla")
    out = attend(q, k, v, mask, kind=mk, valid=valid, impl="dot_product_attention")
    np.testing.assert_allclose(_on_valid(out, valid), _on_valid(ref, valid), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pallas_splash_interpret_matches_xla_forward_and_grad():
    # JAX's Pallas TPU splash attention in interpret mode on CPU; its tiles are multiples of 128, so T = 128
    B, T, H, K, N = 2, 128, 4, 2, 8
    q, k, v = _qkv(B, T, T, H, K, N, seed=2)
    masks = _masks(B, T, [5, 0])
    for kind in ("causal", "bidirectional"):
        mask, valid = masks[kind]

        def loss(q, k, v, impl):
            out = attend(q, k, v, mask, kind=kind, valid=valid, impl=impl)
            return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) ** 2)

        ref = attend(q, k, v, mask, kind=kind, valid=valid, impl="xla")
        out = attend(q, k, v, mask, kind=kind, valid=valid, impl="pallas")
        np.testing.assert_allclose(_on_valid(out, valid), _on_valid(ref, valid), rtol=1e-5, atol=2e-6)
        g_ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
        g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "pallas")
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_impl_resolution_per_backend_and_refusals():
    assert resolve_impl("auto", "causal", "cpu") == "xla"
    assert resolve_impl("auto", "general", "gpu", jnp.bfloat16, 128) == "dot_product_attention"
    assert resolve_impl("auto", "causal", "gpu", jnp.float32, 128) == "xla"  # cuDNN: bfloat16/float16 only
    assert resolve_impl("auto", "causal", "gpu", jnp.bfloat16, 256) == "xla"
    with pytest.raises(ValueError, match="bfloat16/float16 only"):
        resolve_impl("dot_product_attention", "causal", "gpu", jnp.float32, 64)
    assert resolve_impl("auto", "causal", "tpu") == "pallas"
    assert resolve_impl("auto", "bidirectional", "tpu") == "pallas"
    assert resolve_impl("auto", "general", "tpu") == "xla"  # block_causal / siblings / KV cache on TPU
    assert resolve_impl("dot_product_attention", "general", "cpu") == "dot_product_attention"
    with pytest.raises(ValueError, match=r"pallas.*'general'"):
        resolve_impl("pallas", "general", "tpu")
    with pytest.raises(ValueError, match="allowed"):
        resolve_impl("flash", "causal", "cpu")
    q, k, v = _qkv(1, 16, 16, 2, 1, 4)
    mask, valid = _masks(1, 16, [0])["causal"]
    with pytest.raises(ValueError, match="multiples of 128"):
        attend(q, k, v, mask, kind="causal", valid=valid, impl="pallas")
    with pytest.raises(ValueError, match="ModelConfig.attention_impl"):
        dataclasses.replace(tiny_model_config(), attention_impl="flash")
    with pytest.raises(ConfigError, match="model.attention_impl"):
        ModelSection(attention_impl="flash")
    assert ModelSection().attention_impl == "auto" and set(ModelSection.__dataclass_fields__["attention_impl"]
                                                          .metadata["choices"]) == set(ATTENTION_IMPLS)


def test_decoder_with_dot_product_attention_equals_xla():
    # every attention kind with left padding, and a cached decode step (a 'general' mask over cache slots)
    cfg = tiny_model_config()
    ref_model = Decoder(dataclasses.replace(cfg, attention_impl="xla"), rngs=nnx.Rngs(0))
    dpa = Decoder(dataclasses.replace(cfg, attention_impl="dot_product_attention"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    valid = jnp.arange(8)[None] >= jnp.array([[3], [0]])
    for kind in ("causal", "bidirectional", "block_causal"):
        kw = dict(valid=valid, attention=kind, block_size=4 if kind == "block_causal" else None)
        a, b = ref_model(tokens, **kw).logits, dpa(tokens, **kw).logits
        np.testing.assert_allclose(np.asarray(a)[np.asarray(valid)], np.asarray(b)[np.asarray(valid)], atol=2e-5)
    outs = []
    for m in (ref_model, dpa):
        pre = m(tokens, valid=valid, cache=KVCache.init(m.cfg, 2, 12))
        outs.append(m(tokens[:, :2], cache=pre.cache).logits)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=2e-5)


def test_decoder_pallas_refuses_block_causal_and_auto_runs_it():
    cfg = tiny_model_config()
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"pallas.*'general'"):
        Decoder(dataclasses.replace(cfg, attention_impl="pallas"), rngs=nnx.Rngs(0))(
            tokens, attention="block_causal", block_size=4)
    auto = Decoder(cfg, rngs=nnx.Rngs(0))(tokens, attention="block_causal", block_size=4).logits
    xla = Decoder(dataclasses.replace(cfg, attention_impl="xla"), rngs=nnx.Rngs(0))(
        tokens, attention="block_causal", block_size=4).logits
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))  # auto is xla on CPU
    assert isinstance(cfg, ModelConfig) and cfg.attention_impl == "auto"


def test_tied_head_contracts_the_embedding_without_a_transposed_copy():
    # item 5 (decode): Decoder.logits of a tied model contracts embed [V, D]'s D axis in the dot (dense_t) instead
    # of dense(h, embed.T), which made XLA:CPU copy a transposed [D, V] embedding in every decode step
    from jaxtok.models.transformer import dense, dense_t

    x = jax.random.normal(jax.random.key(4), (2, 3, 16))
    w = jax.random.normal(jax.random.key(5), (40, 16))
    np.testing.assert_allclose(np.asarray(dense_t(x, w)), np.asarray(dense(x, w.T)), rtol=1e-5, atol=1e-5)
    for dt in (jnp.float32, jnp.bfloat16):
        xb, wb = x.astype(dt), w.astype(dt)
        f = lambda fn: (lambda a, b: jnp.sum(jnp.sin(fn(a, b))))  # noqa: E731
        ga = jax.grad(f(lambda a, b: dense_t(a, b, preferred_element_type=jnp.float32)), argnums=(0, 1))(xb, wb)
        gb = jax.grad(f(lambda a, b: dense(a, b.T, preferred_element_type=jnp.float32)), argnums=(0, 1))(xb, wb)
        for a, b in zip(ga, gb):
            assert a.dtype == dt
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    cfg = dataclasses.replace(tiny_model_config(), tie_embeddings=True, vocab_size=96)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    h = jnp.ones((1, 1, cfg.hidden_size))
    hlo = jax.jit(lambda m, h: m.logits(h)).lower(model, h).compile().as_text()
    shape = f"[{cfg.hidden_size},{cfg.vocab_size}]"
    assert not [ln for ln in hlo.splitlines() if shape in ln and ("transpose(" in ln or " copy(" in ln)]
    np.testing.assert_allclose(np.asarray(model.logits(h)), np.asarray(h[0] @ model.embed_vd[...].T)[None],
                               rtol=1e-5, atol=1e-5)
