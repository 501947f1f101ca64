"""LoRA (models/lora.py, train/step.py's trainable filter, the loop's checkpoints): adapters start at the base model,
only they train and have optimizer state, the base stays bit-for-bit, merge == adapter model, merged HF export
round-trips, bad targets are config errors, a LoRA run resumes exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.config import LORA_TARGETS, ConfigError, from_dict, to_dict
from jaxtok.models import Decoder, presets
from jaxtok.models import lora
from jaxtok.train.objectives.sft import sft_loss
from jaxtok.train.step import init_train_state, make_train_step

from _worker import tiny_batch, tiny_model_config, tiny_train_config


def _tokens(seed=1, shape=(2, 9)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


def _randomise_b(model, seed=3, scale=0.1):
    """Give every B a random value (B = 0 at init makes the update vanish)."""
    for i, (path, var) in enumerate(nnx.to_flat_state(lora.lora_state(model))):
        if path[-1] == "lora_b":
            var[...] = scale * jax.random.normal(jax.random.key(seed + i), var.shape, var[...].dtype)


def test_config_targets_match_the_model_table():
    assert LORA_TARGETS == tuple(lora.TARGETS)


@pytest.mark.parametrize("targets, message", [
    (["o_proj"], "PEFT's 'o_proj' is 'o' here"),
    (["q", "attn"], "'attn' is not a projection"),
    (["q", "q"], "named twice"),
])
def test_bad_target_is_a_config_error(targets, message):
    with pytest.raises(ConfigError, match="lora.targets") as e:
        from_dict({"lora": {"rank": 8, "targets": targets}})
    assert message in str(e.value)
    with pytest.raises(ConfigError, match="lora.rank"):
        from_dict({"lora": {"rank": -1}})


def test_mlp_targets_on_moe_layers_are_refused():
    model = Decoder(presets.get("tiny_moe", vocab_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4, targets=("o", "down")), rngs=nnx.Rngs(1))
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4, targets=("q", "o")), rngs=nnx.Rngs(1))
    assert lora.num_lora_params(model) > 0


def test_adapter_hand_case():
    """One adapter against numpy: (alpha/r) (x A) B for the o projection's two input axes, and delta = (alpha/r) AB."""
    w = nnx.Param(jnp.zeros((2, 3, 4)), logical_axes=("heads", "head_dim", "embed"))  # [H, N, D]
    ad = lora.LoRAAdapter(w, n_in=2, n_out=1, rank=2, alpha=6.0, rngs=nnx.Rngs(0))
    a = np.asarray(ad.lora_a[...])
    assert a.shape == (2, 3, 2) and np.all(np.abs(a) <= 1 / np.sqrt(6)) and ad.lora_b[...].shape == (2, 4)
    assert np.all(np.asarray(ad.lora_b[...]) == 0)
    assert ad.lora_a.get_metadata()["logical_axes"] == ("heads", "head_dim", None)
    assert ad.lora_b.get_metadata()["logical_axes"] == (None, "embed")
    b = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    ad.lora_b[...] = jnp.asarray(b)
    x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
    want = 3.0 * (x.reshape(5, 6) @ a.reshape(6, 2)) @ b  # alpha / r = 3
    np.testing.assert_allclose(np.asarray(ad(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ad.delta()), 3.0 * (a.reshape(6, 2) @ b).reshape(2, 3, 4), rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_start_at_the_base_and_merge_equals_the_adapter_model(scan):
    cfg = dataclasses.replace(tiny_model_config(), num_layers=2, scan_layers=scan)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens()
    base = np.asarray(model(tokens).logits)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS), rngs=nnx.Rngs(1))
    lead = (2,) if scan else ()
    q_a = model.layers.attn.q_lora.lora_a if scan else model.layers[0].attn.q_lora.lora_a
    assert q_a.shape == lead + (32, 4)
    # B = 0: the base model (exactly so op by op; a compiled scan body may round its fused ops differently)
    np.testing.assert_allclose(np.asarray(model(tokens).logits), base, rtol=1e-6, atol=1e-6)
    _randomise_b(model)
    adapted = np.asarray(model(tokens).logits)
    assert np.max(np.abs(adapted - base)) > 0.1
    merged = lora.merged(model)
    assert not lora.has_lora(merged) and lora.has_lora(model)
    assert type(merged) is Decoder
    np.testing.assert_allclose(np.asarray(merged(tokens).logits), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))


def test_only_adapters_train_and_the_base_stays_bit_for_bit():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=16, targets=("q", "v", "o", "down")), rngs=nnx.Rngs(1))
    opt = optax.adam(1e-2)
    _, state = init_train_state(model, opt)
    adapter_leaves = jax.tree.leaves(state.params)
    n_adapter = sum(x.size for x in adapter_leaves)
    # q [32 -> 4x8], v [32 -> 2x8], o [4x8 -> 32], down [64 -> 32]: r (in + out) each
    assert n_adapter == lora.num_lora_params(model) == 4 * (32 + 32) + 4 * (32 + 16) + 4 * (32 + 32) + 4 * (64 + 32)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state.params))
    base_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.rest)]
    # Adam's two moments cover the adapters only (plus its step counter)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapter
    step = make_train_step(model, opt, sft_loss)
    batch = tiny_batch(0)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for a, b in zip(base_before, jax.tree.leaves(state.rest)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(np.any(np.asarray(x) != 0) for p, x in nnx.to_flat_state(state.params) if p[-1] == "lora_b")


def test_lora_step_on_a_mesh_equals_single_device():
    """Adapters carry their weight's logical axes (rank axis unsharded): two LoRA steps on a data 2 x fsdp 2 x
    tensor 2 mesh give the single-device adapters, and they stay on their declared shardings."""
    from jaxtok import mesh as M
    from jaxtok.mesh import put_batch

    def run(mesh):
        model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets=("q", "o", "up")), rngs=nnx.Rngs(1))
        opt = optax.adam(1e-2)
        _, state = init_train_state(model, opt, mesh=mesh)
        step = make_train_step(model, opt, sft_loss, mesh=mesh)
        for i in range(2):
            state, _ = step(state, put_batch(tiny_batch(i), mesh))
        return state

    ref, sharded = run(None), run(M.make_mesh(2, 2, 2))
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    o_a = sharded.params["layers"][0]["attn"]["o_lora"]["lora_a"].get_value()  # [H, N, r]
    assert o_a.sharding.spec == M.logical_to_spec(("heads", "head_dim", None), mesh=o_a.sharding.mesh, shape=o_a.shape)


def test_merged_hf_export_round_trips(tmp_path):
    from jaxtok.models.hf import load_hf

    cfg = dataclasses.replace(tiny_model_config(), architecture="qwen3")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4, targets=("k", "o", "up")), rngs=nnx.Rngs(1))
    _randomise_b(model)
    tokens = _tokens()
    want = np.asarray(model(tokens).logits)
    lora.save_merged_hf(model, str(tmp_path))
    again, again_cfg = load_hf(str(tmp_path))
    assert not lora.has_lora(again) and again_cfg.num_layers == cfg.num_layers
    np.testing.assert_allclose(np.asarray(again(tokens).logits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_run_checkpoints_merged_weights_and_resumes_exactly(tmp_path):
    """A LoRA training run: its checkpoint loads as a plain model equal to the adapter model; stopping at step 4
    and resuming to 6 gives the adapters of an uninterrupted 6-step run bit for bit."""
    from jaxtok import checkpoint as ckpt_lib
    from jaxtok.config import validate_names
    from jaxtok.train.loop import build_train_model, load_model, load_tokenizer_for, train

    d = to_dict(tiny_train_config())
    d["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q", "o", "gate"]}
    d["train"]["eval_every"] = 0
    d["optimizer"].update(schedule="constant", warmup_steps=0)  # the same rates whatever train.steps says
    cfg6 = from_dict(d)
    cfg4 = from_dict(d, ["train.steps=4"])
    out = train(cfg6, tmp_path / "straight", final_eval=False)
    assert out["step"] == 6
    train(cfg4, tmp_path / "resumed", final_eval=False)
    out = train(cfg6, tmp_path / "resumed", final_eval=False)
    assert out["resumed_from"] == 4

    # the adapters of both runs, from the checkpoints' train items
    from jaxtok.config import build_optimizer

    model, _ = build_train_model(validate_names(cfg6), load_tokenizer_for(cfg6).get_vocab_size())
    graphdef, state = init_train_state(model, build_optimizer(cfg6.optimizer, 6))
    plain_like = nnx.state(nnx.merge(graphdef, state.params, state.rest), nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    train_like = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng, "lora": state.params}
    stored = {}
    for name in ("straight", "resumed"):
        with ckpt_lib.Checkpointer(tmp_path / name / "checkpoints", async_save=False) as ck:
            stored[name] = ck.restore(6, params=ckpt_lib.abstract_of(plain_like),
                                      train=ckpt_lib.abstract_of(train_like), data=False)
    for a, b in zip(jax.tree.leaves(stored["straight"]["train"]), jax.tree.leaves(stored["resumed"]["train"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the checkpoint's params are the merged weights: a plain model equal to base + trained adapters
    plain, meta = load_model(tmp_path / "straight")
    assert not lora.has_lora(plain) and meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "o", "gate"]}
    nnx.update(model, stored["straight"]["train"]["lora"])
    tokens = _tokens(shape=(2, 6))
    np.testing.assert_allclose(np.asarray(plain(tokens).logits), np.asarray(model(tokens).logits), rtol=1e-5,
                               atol=1e-5)
