"""Data logging and training for the learned draft-length heads: SpecDec++ (decode_methods.md §A2) and SpecKV (§A3).

SpecDec++ acceptance head (:func:`specdecpp_examples`, :func:`specdecpp_loss`):
  X = the target's own responses (``generate``), Y_t ~ S(q_t(· | X_<t)) the drafter's token at each response
  position under teacher forcing, soft label ``y_t = min(1, p_t(Y_t) / q_t(Y_t))``; the drafter reads the mixed
  sequence Z (Z_t = X_t w.p. ``mix_ratio``, else Y_t) and its last hidden state at t is the head's input; only
  positions with Z_t = Y_t count. Loss: class-weighted soft cross-entropy
  ``Σ[w·(1−y)·CE(·,0) + y·CE(·,1)] / Σ[w·(1−y) + y]`` with ``w = weight_mismatch`` (6).

SpecKV predictor (:func:`speckv_examples`, :func:`speckv_loss`): greedy rounds simulated along the target's
  greedy responses (exact for greedy decoding: drafts match X until the first mismatch, so teacher forcing gives
  the round's acceptance count); each round draws γ from the candidates; a record is the previous round's draft
  statistics, ``comp_enc`` and γ -> the round's acceptance fraction ``nacc / γ``; squared loss (the reference is an
  sklearn ``MLPRegressor``).

CLI: ``python -m jaxtok.decode.train_heads {specdecpp,speckv} CONFIG --out DIR [--steps S]`` with a decode config
(``model.init_from`` = target, ``decode.draft_init_from`` = drafter, ``data`` = the task's training prompts);
writes ``DIR/head.npz`` + ``DIR/head.json``, loadable with ``decode.policy_args.head_path=DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtok import sampling
from jaxtok.models.heads import MLPHead

from . import draft_policies as dp
from .generate import generate


# ----------------------------------------------------------------------------------------------------------------
# SpecDec++
# ----------------------------------------------------------------------------------------------------------------


def _full_sequences(prompt, prompt_valid, response, response_valid):
    """``[B, P + N]`` tokens and validity of prompt + response (left-padded prompt, right-padded response)."""
    tokens = jnp.concatenate([jnp.asarray(prompt, jnp.int32), jnp.asarray(response, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.asarray(prompt_valid, bool), jnp.asarray(response_valid, bool)], axis=1)
    return tokens, valid


def specdecpp_examples(target, drafter, prompt, prompt_valid, *, max_new_tokens: int, temperature: float = 1.0,
                       mix_ratio: float = 0.15, rng: jax.Array, stop_tokens: Sequence[int] = (2,)) -> dict:
    """SpecDec++ training records (§A2 "Training data") from a prompt batch.

    Returns numpy arrays over ``M`` kept positions: ``hidden [M, D]`` drafter hidden states at the position of
    ``Y_t`` in Z, ``label [M]`` soft acceptance probability ``min(1, p/q)``.
    """
    k_gen, k_draft, k_mix = jax.random.split(rng, 3)
    gen = generate(target, prompt, prompt_valid, max_new_tokens=max_new_tokens, temperature=temperature,
                   stop_tokens=stop_tokens, rng=k_gen)
    p_len = prompt.shape[1]
    tokens, valid = _full_sequences(prompt, prompt_valid, gen.tokens, gen.valid)
    t = jnp.float32(temperature)
    # response token i sits at column P+i and is predicted from column P+i-1
    lp_target = jax.nn.log_softmax(sampling.process_logits(target(tokens, valid=valid).logits, t), -1)
    lp_draft = jax.nn.log_softmax(sampling.process_logits(drafter(tokens, valid=valid).logits, t), -1)
    pred = slice(p_len - 1, p_len - 1 + max_new_tokens)
    y = sampling.gumbel_argmax(k_draft, lp_draft[:, pred]) if temperature > 0 else jnp.argmax(lp_draft[:, pred], -1)
    label = jnp.exp(jnp.minimum(0.0, sampling.token_log_probs(lp_target[:, pred], y)
                                - sampling.token_log_probs(lp_draft[:, pred], y)))  # [B, N]
    use_y = jax.random.uniform(k_mix, y.shape) >= mix_ratio
    z = jnp.where(use_y, y, gen.tokens)
    z_tokens, _ = _full_sequences(prompt, prompt_valid, z, gen.valid)
    hidden = drafter(z_tokens, valid=valid, return_hidden=True, return_logits=False).hidden[:, p_len:]  # [B, N, D]
    keep = np.asarray(gen.valid & use_y)
    return {"hidden": np.asarray(hidden)[keep], "label": np.asarray(label)[keep]}


def specdecpp_loss(head, hidden: jax.Array, label: jax.Array, weight_mismatch: float = 6.0,
                   mask: Optional[jax.Array] = None) -> jax.Array:
    """Class-weighted soft cross-entropy of the acceptance head (§A2); 0 when nothing is selected."""
    lp = jax.nn.log_softmax(head(hidden), axis=-1)  # [M, 2]
    y = label.astype(jnp.float32)
    m = jnp.ones_like(y) if mask is None else mask.astype(jnp.float32)
    w0 = weight_mismatch * (1.0 - y) * m
    w1 = y * m
    num = -jnp.sum(w0 * lp[:, 0] + w1 * lp[:, 1])
    den = jnp.sum(w0 + w1)
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# SpecKV
# ----------------------------------------------------------------------------------------------------------------


def speckv_examples(target, drafter, prompt, prompt_valid, *, max_new_tokens: int,
                    candidates: Sequence[int] = (2, 4, 6, 8), comp_enc: int = 0, rng: jax.Array,
                    stop_tokens: Sequence[int] = (2,)) -> dict:
    """SpecKV profiling records from simulated greedy rounds (see the module docstring).

    Returns ``inputs [M, 6]`` (previous round's features, comp_enc, γ) and ``rate [M]`` (= nacc / γ).
    """
    gen = generate(target, prompt, prompt_valid, max_new_tokens=max_new_tokens, temperature=0.0,
                   stop_tokens=stop_tokens, rng=rng)
    p_len = prompt.shape[1]
    tokens, valid = _full_sequences(prompt, prompt_valid, gen.tokens, gen.valid)
    d_logits = drafter(tokens, valid=valid).logits[:, p_len - 1:p_len - 1 + max_new_tokens]  # predicts response i
    match = np.asarray((jnp.argmax(d_logits, -1) == gen.tokens) & gen.valid)  # [B, N]
    stats = dp.draft_stats(d_logits, gen.valid)
    ent, conf = np.asarray(stats.entropy_bits), np.asarray(stats.confidence)
    lengths = np.asarray(gen.lengths)
    choice = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
    inputs, rate = [], []
    for b in range(tokens.shape[0]):
        t, prev = 1, None  # token 0 comes from the prefill
        while t < lengths[b]:
            g = int(choice.choice(candidates))
            span = slice(t, min(t + g, lengths[b]))
            nacc = int(np.cumprod(match[b, span]).sum())
            if prev is not None and t + g <= lengths[b]:  # rounds cut by the response end are not recorded
                inputs.append(list(prev) + [comp_enc, g])
                rate.append(nacc / g)
            e, c = ent[b, span], conf[b, span]
            prev = (e.mean(), c.mean(), e.max(), c.min())
            t += nacc + 1
    return {"inputs": np.asarray(inputs, np.float32).reshape(-1, 6), "rate": np.asarray(rate, np.float32)}


def speckv_loss(head, inputs: jax.Array, rate: jax.Array) -> jax.Array:
    """Mean squared error of the predicted acceptance rate (raw output, as sklearn's MLPRegressor)."""
    return jnp.mean((head(inputs)[..., 0] - rate) ** 2)


# ----------------------------------------------------------------------------------------------------------------
# Training, saving, loading
# ----------------------------------------------------------------------------------------------------------------


def fit_head(head: nnx.Module, loss_fn: Callable, data: dict, *, steps: int = 300, lr: float = 3e-3,
             batch_size: int = 256, seed: int = 0) -> list[float]:
    """Adam on the head's parameters with minibatches of ``data`` (arrays with a common first axis);
    ``loss_fn(head, **batch)``. Updates ``head`` in place; returns the loss per step."""
    graphdef, params = nnx.split(head, nnx.Param)
    opt = optax.adam(lr)
    opt_state = opt.init(params)
    n = len(next(iter(data.values())))
    if n == 0:
        raise ValueError("fit_head: data has no examples")

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p), **batch)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, n, min(batch_size, n))
        params, opt_state, value = step(params, opt_state, {k: jnp.asarray(v[idx]) for k, v in data.items()})
        losses.append(float(value))
    nnx.update(head, params)
    return losses


def save_head(head: MLPHead, path: str | Path, kind: str, **ctor) -> None:
    """``path/head.npz`` (parameters by tree path) and ``path/head.json`` (``kind`` and constructor arguments)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(head, nnx.Param))[0]
    np.savez(path / "head.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    (path / "head.json").write_text(json.dumps({"kind": kind, **ctor}))


def load_head(path: str | Path) -> MLPHead:
    """Rebuild a head saved by :func:`save_head`."""
    path = Path(path)
    if not (path / "head.json").is_file():
        raise FileNotFoundError(f"head_path={str(path)!r}: no head.json (save one with jaxtok.decode.train_heads)")
    meta = json.loads((path / "head.json").read_text())
    kind = meta.pop("kind")
    if kind == "specdecpp":
        head = dp.specdecpp_head(meta["hidden_size"], meta.get("depth", 3))
    elif kind == "speckv":
        head = dp.speckv_head(meta.get("hidden", 16))
    else:
        raise ValueError(f"{path}/head.json: kind={kind!r}, allowed 'specdecpp', 'speckv'")
    arrays = np.load(path / "head.npz")
    state = nnx.state(head, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = [jnp.asarray(arrays[jax.tree_util.keystr(k)]) for k, _ in leaves]
    nnx.update(head, jax.tree_util.tree_unflatten(treedef, new))
    return head


def main(argv: Optional[Sequence[str]] = None) -> None:
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("specdecpp", "speckv"))
    ap.add_argument("config", help="a decode config (model.init_from = target, decode.draft_init_from = drafter)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batches", type=int, default=4, help="prompt batches of decode.batch_size to log")
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    target, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype)
    drafter, _ = load_any(cfg.decode.draft_init_from, key="decode.draft_init_from", dtype=cfg.model.dtype)
    task = make_task_from_config(cfg.data)
    ds, _ = prompt_dataset(task, "train", load_tokenizer_for(cfg), prompt_len=cfg.data.prompt_len,
                           batch_size=cfg.decode.batch_size, num_examples=a.batches * cfg.decode.batch_size)
    key = jax.random.key(cfg.train.seed)
    records: dict = {}
    for batch in ds:
        key, sub = jax.random.split(key)
        if a.kind == "specdecpp":
            rec = specdecpp_examples(target, drafter, batch["prompt"], batch["prompt_valid"], rng=sub,
                                     max_new_tokens=cfg.decode.max_new_tokens,
                                     temperature=max(cfg.decode.temperature, 1e-3))
        else:
            rec = speckv_examples(target, drafter, batch["prompt"], batch["prompt_valid"], rng=sub,
                                  max_new_tokens=cfg.decode.max_new_tokens,
                                  candidates=tuple(cfg.decode.policy_args.get("candidates", (2, 4, 6, 8))))
        for k, v in rec.items():
            records[k] = np.concatenate([records[k], v]) if k in records else v
    if a.kind == "specdecpp":
        ctor = {"hidden_size": drafter.cfg.hidden_size, "depth": 3}
        head = dp.specdecpp_head(**ctor)
        losses = fit_head(head, specdecpp_loss, records, steps=a.steps)
    else:
        ctor = {"hidden": 16}
        head = dp.speckv_head(**ctor)
        losses = fit_head(head, speckv_loss, records, steps=a.steps)
    save_head(head, a.out, a.kind, **ctor)
    n = len(next(iter(records.values())))
    print(json.dumps({"kind": a.kind, "examples": int(n), "first_loss": losses[0], "last_loss": losses[-1],
                      "out": a.out}))


if __name__ == "__main__":
    main()
