"""Training the learned commit policies of the diffusion sampler from recorded decoding trajectories:
the Learn2PD unmask filter (decode_methods.md §B16) and the TraceLock commitment controller (§B17).

Data (both heads): the diffusion LM decodes training prompts with a reference policy (LLaDA, one token per step,
``T = 0``, ``stop_early=False`` so the tail holds the model's own terminators); :func:`diffusion_generate` returns
the final tokens and the commit trajectory ``commit_step [B, N]``. :func:`replay_trajectory` re-runs the model on
every intermediate state ``x^(s)`` (:func:`jaxtok.decode.diffusion.trajectory_state`) — at ``T = 0`` this gives
exactly the proposals ``x0_s``, confidences ``conf_s`` and hidden states the sampler saw at step s — and
:func:`block_starts` rebuilds each row's active block ``[lo, hi)`` with the sampler's fixed-block rule.

Labels (:func:`commit_labels`) over positions still masked at step s:

- ``final`` (Learn2PD's ``is_correct`` and TraceLock's ``step_token_ids == final_token_ids``):
  ``y[s, i] = [x0_s[i] == final[i]]``.
- ``stable`` (strict future stability): the proposal equals the final token at step s and at every later step up to
  the position's commit, ``y[s, i] = Π_{u = s}^{commit_step[i]} [x0_u[i] == final[i]]``.

Learn2PD filter (:func:`learn2pd_examples`, :func:`filter_loss`): input = the block's confidence vector
``where(masked, conf, 1)`` gathered at ``lo .. lo+K-1`` (:func:`jaxtok.decode.commit_policies.block_features`, the
decode-time features), output one logit per block position; ``BCEWithLogits`` averaged over the masked positions
of the block (decoded positions are trivially correct and carry no signal). AdamW, lr 3e-3 (reference).
End-of-Text Prediction has nothing to train: it is the decode-time truncation rule of the ``learn2pd`` policy
(``Learn2PDArgs.eot``), driven by the same filter.

TraceLock controller (:func:`tracelock_examples`, :func:`controller_loss`): input = the decode-time trace state
(:func:`jaxtok.decode.commit_policies.tracelock_inputs`: the backbone's hidden state and confidence per generated
position, state ids LOCKED/GEN/EOT, the window from the first mask); prediction ``σ(logit_i − threshold_logit)``;
loss = weighted BCE over the window's GEN/EOT (masked) positions with negatives weighted ``neg_weight`` (2.0),
positives weighted ``1 − frontier_bias · (i − first) / (window − 1)`` ("frontier positive bias", 0.5), plus
``centre · threshold_logit²`` (threshold-centre loss, 0.001); random crops keep ``U[crop_min, 1]`` of each window
(25–100 %). AdamW lr 1e-4, weight decay 0.01 in the reference (here a larger lr for the short runs).

CLI::

    python -m jaxtok.decode.train_commit_heads {learn2pd,tracelock} CONFIG --out DIR [--prompts 512] [--steps 400]
        [--eval 256] [key=value overrides]

with a diffusion decode config (``model.init_from`` = the diffusion LM, ``data`` = its task,
``decode.max_new_tokens``, ``decode.policy_args.block_len``). Writes ``DIR/head.npz`` + ``DIR/head.json`` (loadable
with ``decode.policy_args.head_path=DIR`` in ``jaxtok decode``) and ``DIR/train.json`` (losses, held-out label
metrics); ``--eval N`` also decodes N held-out prompts with ``llada`` (1 token/step), ``threshold`` 0.9 and the
trained policy and writes ``DIR/results.{json,md}`` and ``DIR/accuracy_vs_nfe.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import types
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtok.models.heads import FilterHead, TraceController

from jaxtok.bench.plots import draw_accuracy_vs_nfe

from . import commit_policies as cp
from .diffusion import DEFAULT_MASK_ID, diffusion_generate, fixed_block_end, trajectory_state
from .train_heads import save_head

HEAD_KINDS = {"learn2pd_filter": ("filter", FilterHead), "tracelock_controller": ("controller", TraceController)}
POLICY_OF_KIND = {"learn2pd_filter": "learn2pd", "tracelock_controller": "tracelock"}


# ----------------------------------------------------------------------------------------------------------------
# Trajectories: record, replay, blocks, labels
# ----------------------------------------------------------------------------------------------------------------


def record_trajectories(model, prompt, prompt_valid, *, gen_len: int, block_len: int, rng=None,
                        stop_tokens: Sequence[int] = (2,), pad_id: int = 0, attention: str = "bidirectional",
                        block_size: Optional[int] = None, shift_logits: bool = False):
    """Reference traces: ``llada`` with one token per step, ``T = 0``, ``stop_early=False``. Returns the
    :class:`DiffusionResult` (``tokens``, ``commit_step``, ``num_steps`` are what the replay needs)."""
    args = cp.LLaDAArgs(block_len=block_len, stop_early=False, shift_logits=shift_logits)
    return diffusion_generate(model, prompt, prompt_valid, gen_len=gen_len, policy="llada", policy_args=args,
                              temperature=0.0, rng=rng, stop_tokens=stop_tokens, pad_id=pad_id, attention=attention,
                              block_size=block_size)


def masked_at_steps(commit_step, num_steps: int) -> np.ndarray:
    """``[S, B, N]``: position still masked before step s (not committed at a step ``< s``)."""
    cs = np.asarray(commit_step)
    s = np.arange(num_steps)[:, None, None]
    return ~((cs[None] >= 0) & (cs[None] < s))


def _replay_fn(graphdef, attention, block_size, shift, mask_id, return_hidden):
    """Jitted ``(state, prompt, prompt_valid, gen [B, N]) -> (x0, conf, hidden)`` of one sampler step (T = 0)."""

    @jax.jit
    def step(model_state, prompt, prompt_valid, gen):
        model = nnx.merge(graphdef, model_state)
        b, p = prompt.shape
        n = gen.shape[1]
        x = jnp.concatenate([prompt, gen], axis=1)
        valid = jnp.concatenate([prompt_valid, jnp.ones((b, n), bool)], axis=1)
        cols = jnp.broadcast_to(p + jnp.arange(n, dtype=jnp.int32) - shift, (b, n))
        out = model(x, valid=valid, attention=attention, block_size=block_size, logits_at=cols,
                    return_hidden=return_hidden)
        logits = out.logits.at[..., mask_id].set(-jnp.inf)  # as the sampler: the mask is never a proposal
        x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        conf = jnp.exp(jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0])
        hidden = out.hidden[:, p:].astype(jnp.float32) if return_hidden else jnp.zeros((b, n, 0), jnp.float32)
        return x0, conf, hidden

    return step


def replay_trajectory(model, prompt, prompt_valid, tokens, commit_step, num_steps: int, *,
                      mask_id: Optional[int] = None, attention: str = "bidirectional",
                      block_size: Optional[int] = None, shift_logits: bool = False, return_hidden: bool = False,
                      pad_id: int = 0) -> dict:
    """Re-run the model on every state ``x^(s)``, ``s = 0..num_steps-1`` of recorded trajectories (``T = 0``).

    Returns numpy ``x0 [S, B, N]`` int32 proposals, ``conf [S, B, N]``, ``masked [S, B, N]`` and, with
    ``return_hidden``, ``hidden [S, B, N, D]`` (the sampler's ``info.hidden``)."""
    if mask_id is None:
        mask_id = model.cfg.mask_token_id if model.cfg.mask_token_id is not None else DEFAULT_MASK_ID
    graphdef, state = nnx.split(model)
    step = _replay_fn(graphdef, attention, block_size, 1 if shift_logits else 0, int(mask_id), return_hidden)
    prompt = jnp.where(jnp.asarray(prompt_valid, bool), jnp.asarray(prompt, jnp.int32), pad_id)
    pv = jnp.asarray(prompt_valid, bool)
    toks, cs = jnp.asarray(tokens, jnp.int32), jnp.asarray(commit_step, jnp.int32)
    x0s, confs, hiddens = [], [], []
    for s in range(int(num_steps)):
        x0, conf, hidden = step(state, prompt, pv, trajectory_state(toks, cs, s, mask_id))
        x0s.append(np.asarray(x0))
        confs.append(np.asarray(conf))
        if return_hidden:
            hiddens.append(np.asarray(hidden))
    out = {"x0": np.stack(x0s), "conf": np.stack(confs), "masked": masked_at_steps(commit_step, int(num_steps))}
    if return_hidden:
        out["hidden"] = np.stack(hiddens)
    return out


def block_starts(masked: np.ndarray, block_len: int, plen=None, aligned: bool = False) -> np.ndarray:
    """``lo [S, B]``: each row's active block start at every step, by the sampler's fixed-block rule (a row whose
    block ``[lo, hi)`` has no masks left starts its next block at its first masked position; ``hi`` =
    :func:`fixed_block_end`). ``masked [S, B, N]``; ``plen [B]`` prompt lengths (only for ``aligned``)."""
    S, B, N = masked.shape
    plen = np.zeros((B,), np.int32) if plen is None else np.asarray(plen, np.int32)
    lo = np.zeros((B,), np.int32)
    hi = np.zeros((B,), np.int32)
    out = np.zeros((S, B), np.int32)
    idx = np.arange(N)[None, :]
    for s in range(S):
        m = masked[s]
        in_block = (idx >= lo[:, None]) & (idx < hi[:, None])
        new = ~np.any(m & in_block, -1) & np.any(m, -1)
        first = np.where(np.any(m, -1), np.argmax(m, -1), N).astype(np.int32)
        end = np.asarray(fixed_block_end(jnp.asarray(first), jnp.asarray(plen), block_len, N, aligned))
        lo = np.where(new, first, lo)
        hi = np.where(new, np.maximum(end, first + 1), hi)
        out[s] = lo
    return out


def commit_labels(x0: np.ndarray, tokens: np.ndarray, commit_step: np.ndarray, kind: str = "final") -> np.ndarray:
    """``[S, B, N]`` bool labels of the step proposals ``x0 [S, B, N]`` against the final ``tokens [B, N]``.

    ``final``: ``x0_s == final`` (Learn2PD ``is_correct``; TraceLock's label). ``stable``: equal at step s and at
    every step up to the position's commit (``commit_step [B, N]``; never committed: up to the last step)."""
    x0 = np.asarray(x0)
    eq = x0 == np.asarray(tokens)[None]
    if kind == "final":
        return eq
    if kind != "stable":
        raise ValueError(f"label kind={kind!r}: allowed 'final', 'stable'")
    S = x0.shape[0]
    cs = np.asarray(commit_step)
    after = np.arange(S)[:, None, None] > np.where(cs < 0, S, cs)[None]  # steps after the commit do not count
    ok = eq | after
    return np.flip(np.cumprod(np.flip(ok, 0), axis=0), 0).astype(bool)  # AND over u >= s


# ----------------------------------------------------------------------------------------------------------------
# Per-head examples
# ----------------------------------------------------------------------------------------------------------------


def learn2pd_examples(rep: dict, labels: np.ndarray, lo: np.ndarray, block_len: int) -> dict:
    """One example per (step, row) with a masked position: ``feats [M, K]`` (the block's ``where(masked, conf, 1)``
    from ``lo``), ``valid [M, K]`` (inside the sequence), ``label [M, K]``, ``weight [M, K]`` (masked & valid)."""
    S, B, N = rep["masked"].shape
    live = rep["masked"].any(-1).reshape(-1)  # [S*B]
    flat = lambda a: jnp.asarray(a.reshape((S * B,) + a.shape[2:]))  # noqa: E731
    lo_f = jnp.asarray(lo.reshape(-1))
    values = jnp.where(flat(rep["masked"]), flat(rep["conf"]), 1.0)
    feats, fvalid = cp.block_features(values, lo_f, block_len)
    lab, _ = cp.block_features(flat(labels).astype(jnp.float32), lo_f, block_len)
    msk, _ = cp.block_features(flat(rep["masked"]).astype(jnp.float32), lo_f, block_len)
    weight = (msk > 0) & fvalid
    keep = np.asarray(live)
    return {"feats": np.asarray(feats)[keep], "valid": np.asarray(fvalid)[keep],
            "label": np.asarray(lab)[keep], "weight": np.asarray(weight, np.float32)[keep]}


def tracelock_examples(rep: dict, labels: np.ndarray, window: int, stop_tokens: Sequence[int]) -> dict:
    """One example per (step, row) with a masked position: the decode-time controller inputs
    (:func:`commit_policies.tracelock_inputs`) ``feats [M, N, D+1]``, ``states [M, N]``, ``valid [M, N]``, and
    ``label [M, N]``, ``weight [M, N]`` (masked & in the window)."""
    S, B, N = rep["masked"].shape
    live = rep["masked"].any(-1).reshape(-1)
    flat = lambda a: jnp.asarray(a.reshape((S * B,) + a.shape[2:]))  # noqa: E731
    x0 = flat(rep["x0"])
    info = types.SimpleNamespace(conf=flat(rep["conf"]), masked=flat(rep["masked"]), hidden=flat(rep["hidden"]),
                                 is_stop=jnp.isin(x0, jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)))
    feats, states, valid = cp.tracelock_inputs(info, window)
    weight = np.asarray(valid & info.masked, np.float32)
    keep = np.asarray(live)
    return {"feats": np.asarray(feats)[keep], "states": np.asarray(states)[keep], "valid": np.asarray(valid)[keep],
            "label": np.asarray(labels.reshape(S * B, N), np.float32)[keep], "weight": weight[keep]}


def merge_records(records: Sequence[dict]) -> dict:
    """Concatenate example dicts along the first axis."""
    return {k: np.concatenate([r[k] for r in records]) for k in records[0]}


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def _bce(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy with logits: ``softplus(z) − y·z`` (stable for large |z|)."""
    z = logits.astype(jnp.float32)
    return jax.nn.softplus(z) - label.astype(jnp.float32) * z


def filter_loss(head: FilterHead, feats, valid, label, weight) -> jax.Array:
    """Learn2PD (§B16): ``Σ w · BCE(f(feats)_j, y_j) / Σ w`` over the block positions; 0 when ``Σ w = 0``."""
    w = weight.astype(jnp.float32)
    num = jnp.sum(w * _bce(head(feats, valid), label))
    den = jnp.sum(w)
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)


def controller_loss(head: TraceController, feats, states, valid, label, weight, *, neg_weight: float = 2.0,
                    frontier_bias: float = 0.5, centre: float = 1e-3) -> jax.Array:
    """TraceLock (§B17): weighted BCE of ``σ(logit_i − threshold_logit)`` over masked window positions
    (negatives ×``neg_weight``; positives ×``1 − frontier_bias · (i − first)/(count − 1)``) + ``centre · θ²``."""
    out = head(feats, states, valid)
    y = label.astype(jnp.float32)
    v = valid.astype(jnp.float32)
    rank = jnp.cumsum(v, axis=-1) - 1.0  # [M, N] offset inside the window
    count = jnp.sum(v, axis=-1, keepdims=True)
    frac = rank / jnp.maximum(count - 1.0, 1.0)
    w = weight.astype(jnp.float32) * v * jnp.where(y > 0, 1.0 - frontier_bias * frac, neg_weight)
    num = jnp.sum(w * _bce(out.commit_logits, y))
    den = jnp.sum(w)
    bce = jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)
    return bce + centre * jnp.mean(out.threshold_logit**2)


def random_crop(batch: dict, rng: np.random.Generator, crop_min: float) -> dict:
    """TraceLock's random crops: keep the first ``ceil(u · count)`` positions of each window, ``u ~ U[crop_min, 1]``
    (at least one)."""
    if crop_min >= 1.0:
        return batch
    valid = batch["valid"]
    count = valid.sum(-1, keepdims=True)
    keep = np.maximum(np.ceil(rng.uniform(crop_min, 1.0, count.shape) * count), 1)
    rank = np.cumsum(valid, -1) - 1
    new_valid = valid & (rank < keep)
    return dict(batch, valid=new_valid, weight=batch["weight"] * new_valid)


# ----------------------------------------------------------------------------------------------------------------
# Training, metrics, saving, loading
# ----------------------------------------------------------------------------------------------------------------


def fit(head: nnx.Module, loss_fn: Callable, data: Mapping[str, np.ndarray], *, steps: int = 400, lr: float = 3e-3,
        weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0,
        augment: Optional[Callable[[dict, np.random.Generator], dict]] = None) -> list[float]:
    """AdamW on ``head``'s parameters with minibatches of ``data``; ``loss_fn(head, **batch)``. Updates ``head`` in
    place; returns the loss per step."""
    n = len(next(iter(data.values())))
    if n == 0:
        raise ValueError("fit: the data has no examples (no masked positions were recorded)")
    graphdef, params = nnx.split(head, nnx.Param)
    opt = optax.adamw(lr, weight_decay=weight_decay)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), **batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(n, min(batch_size, n), replace=False)
        batch = {k: v[idx] for k, v in data.items()}
        if augment is not None:
            batch = augment(batch, rng)
        params, opt_state, value = step(params, opt_state, {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(value))
    nnx.update(head, params)
    return losses


def label_metrics(prob: np.ndarray, label: np.ndarray, weight: np.ndarray, threshold: float) -> dict:
    """Over weighted positions: base rate, accuracy at 0.5, and at ``threshold`` the accepted fraction, precision
    (accepted that were correct — what a commit rule needs) and recall."""
    w = np.asarray(weight) > 0
    p, y = np.asarray(prob)[w], np.asarray(label)[w] > 0.5
    acc = p >= threshold
    return {"positions": int(w.sum()), "base_rate": float(y.mean()) if y.size else 0.0,
            "accuracy@0.5": float(((p >= 0.5) == y).mean()) if y.size else 0.0,
            "accepted": float(acc.mean()) if y.size else 0.0,
            "precision": float(y[acc].mean()) if acc.any() else 1.0,
            "recall": float(acc[y].mean()) if y.any() else 0.0}


def save_commit_head(head: nnx.Module, path: str | Path, kind: str, **ctor) -> None:
    """``path/head.npz`` + ``path/head.json`` (``kind`` ∈ :data:`HEAD_KINDS` and the constructor arguments)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind={kind!r}: allowed {sorted(HEAD_KINDS)}")
    save_head(head, path, kind, **ctor)


def load_commit_heads(path: str | Path) -> dict[str, nnx.Module]:
    """``{name: module}`` for ``diffusion_generate(heads=...)`` from a directory written by
    :func:`save_commit_head` (``filter`` for Learn2PD, ``controller`` for TraceLock)."""
    path = Path(path)
    if not (path / "head.json").is_file():
        raise FileNotFoundError(f"head_path={str(path)!r}: no head.json (train one with "
                                f"`python -m jaxtok.decode.train_commit_heads`)")
    meta = json.loads((path / "head.json").read_text())
    kind = meta.pop("kind", None)
    if kind not in HEAD_KINDS:
        raise ValueError(f"{path}/head.json: kind={kind!r} is not a commit-policy head (allowed {sorted(HEAD_KINDS)})")
    name, cls = HEAD_KINDS[kind]
    head = cls(**meta, rngs=nnx.Rngs(0))
    arrays = np.load(path / "head.npz")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(head, nnx.Param))
    missing = [jax.tree_util.keystr(k) for k, _ in leaves if jax.tree_util.keystr(k) not in arrays]
    if missing:
        raise ValueError(f"{path}/head.npz lacks parameters {missing[:4]} for {kind} {meta}")
    new = [jnp.asarray(arrays[jax.tree_util.keystr(k)]) for k, _ in leaves]
    nnx.update(head, jax.tree_util.tree_unflatten(treedef, new))
    return {name: head}


def policy_of_heads(path: str | Path) -> str:
    """The commit policy a saved head serves (``learn2pd`` / ``tracelock``)."""
    return POLICY_OF_KIND[json.loads((Path(path) / "head.json").read_text())["kind"]]


# ----------------------------------------------------------------------------------------------------------------
# Driver: log traces, train, evaluate
# ----------------------------------------------------------------------------------------------------------------


def collect_examples(model, batches, kind: str, *, gen_len: int, block_len: int, stop_tokens: Sequence[int],
                     pad_id: int = 0, labels: str = "final", window: int = 128, attention: str = "bidirectional",
                     block_size: Optional[int] = None, shift_logits: bool = False, rng=None) -> dict:
    """Reference traces of every ``{prompt, prompt_valid}`` batch, replayed into the examples of ``kind``
    (``learn2pd`` or ``tracelock``); also ``group [M]`` (the prompt each example comes from, for a split by
    prompt)."""
    if kind not in ("learn2pd", "tracelock"):
        raise ValueError(f"kind={kind!r}: allowed 'learn2pd', 'tracelock'")
    records, offset = [], 0
    rng = jax.random.key(0) if rng is None else rng
    for i, batch in enumerate(batches):
        prompt, pv = np.asarray(batch["prompt"]), np.asarray(batch["prompt_valid"], bool)
        common = dict(attention=attention, block_size=block_size, shift_logits=shift_logits)
        out = record_trajectories(model, prompt, pv, gen_len=gen_len, block_len=block_len,
                                  rng=jax.random.fold_in(rng, i), stop_tokens=stop_tokens, pad_id=pad_id, **common)
        tokens, cs = np.asarray(out.tokens), np.asarray(out.commit_step)
        rep = replay_trajectory(model, prompt, pv, tokens, cs, int(out.num_steps), return_hidden=kind == "tracelock",
                                pad_id=pad_id, **common)
        lab = commit_labels(rep["x0"], tokens, cs, labels)
        S, B = rep["masked"].shape[:2]
        group = np.broadcast_to(offset + np.arange(B)[None, :], (S, B)).reshape(-1)[rep["masked"].any(-1).reshape(-1)]
        if kind == "learn2pd":
            lo = block_starts(rep["masked"], block_len, pv.sum(-1), aligned=attention == "block_causal")
            ex = learn2pd_examples(rep, lab, lo, block_len)
        else:
            ex = tracelock_examples(rep, lab, window, stop_tokens)
        ex["group"] = group
        records.append(ex)
        offset += B
    return merge_records(records)


def split_by_group(data: dict, heldout: float = 0.1, seed: int = 0) -> tuple[dict, dict]:
    """(train, held-out) with whole prompts on one side (``heldout`` of the prompts held out)."""
    groups = np.unique(data["group"])
    rng = np.random.default_rng(seed)
    held = set(rng.choice(groups, max(1, int(round(heldout * len(groups)))), replace=False).tolist())
    is_held = np.isin(data["group"], list(held))
    pick = lambda m: {k: v[m] for k, v in data.items() if k != "group"}  # noqa: E731
    return pick(~is_held), pick(is_held)


def head_probs(kind: str, head, data: dict) -> np.ndarray:
    """Commit probabilities of the trained head on examples (``[M, K]`` filter, ``[M, N]`` controller)."""
    if kind == "learn2pd":
        return np.asarray(jax.nn.sigmoid(head(jnp.asarray(data["feats"]), jnp.asarray(data["valid"]))))
    out = head(jnp.asarray(data["feats"]), jnp.asarray(data["states"]), jnp.asarray(data["valid"]))
    return np.asarray(jax.nn.sigmoid(out.commit_logits))


def train_head(kind: str, data: dict, *, steps: int, block_len: int, seed: int = 0, lr: Optional[float] = None,
               batch_size: int = 256, crop_min: float = 0.25, neg_weight: float = 2.0, frontier_bias: float = 0.5,
               hidden: int = 64, d_model: int = 64, num_layers: int = 2) -> tuple[nnx.Module, dict, list[float]]:
    """Build and fit the head of ``kind`` on ``data``; returns ``(head, constructor args, losses)``."""
    rngs = nnx.Rngs(seed)
    if kind == "learn2pd":
        ctor = {"block_size": block_len, "hidden": hidden, "num_features": 1, "depth": 1}
        head = FilterHead(**ctor, rngs=rngs)
        losses = fit(head, filter_loss, data, steps=steps, lr=lr or 3e-3, batch_size=batch_size, seed=seed)
    else:
        ctor = {"in_features": int(data["feats"].shape[-1]), "d_model": d_model, "num_heads": 4,
                "num_layers": num_layers}
        head = TraceController(**ctor, rngs=rngs)

        def loss(h, **b):
            return controller_loss(h, **b, neg_weight=neg_weight, frontier_bias=frontier_bias)

        losses = fit(head, loss, data, steps=steps, lr=lr or 1e-3, weight_decay=0.01, batch_size=batch_size,
                     seed=seed, augment=lambda b, r: random_crop(b, r, crop_min))
    return head, ctor, losses


def _eval_runs(kind: str, block_len: int, thresholds: Sequence[float]) -> list[dict]:
    runs = [{"label": "llada 1 tok/step", "policy": "llada", "args": {"block_len": block_len}},
            {"label": "threshold 0.9", "policy": "threshold", "args": {"block_len": block_len, "threshold": 0.9}}]
    for t in thresholds:
        runs.append({"label": f"{kind} {t}", "policy": kind, "args": {"block_len": block_len, "threshold": t}})
    return runs


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.metrics import write_results
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for
    from jaxtok.tasks.tokenizer import SpecialTokens

    from .diffusion import evaluate_policy, policy_args_of, stop_ids_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("learn2pd", "tracelock"))
    ap.add_argument("config", help="a diffusion decode config (model.init_from = the diffusion LM)")
    ap.add_argument("overrides", nargs="*", help="key.subkey=value config overrides")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=512, help="training prompts to trace")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps")
    ap.add_argument("--labels", choices=("final", "stable"), default="final")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--eval", type=int, default=0, help="held-out prompts to decode with llada/threshold/the head")
    ap.add_argument("--thresholds", type=float, nargs="*", default=None,
                    help="head thresholds to evaluate (default: the policy's default)")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if not cfg.model.init_from:
        raise SystemExit("set model.init_from=<run dir of a trained diffusion LM>")
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True)
    tok = load_tokenizer_for(cfg)
    sp = SpecialTokens.of(tok)
    task = make_task_from_config(cfg.data)
    pa = dict(cfg.decode.policy_args)
    args = policy_args_of(a.kind, pa)
    bsz = cfg.decode.batch_size
    n_prompts = max(bsz, (a.prompts // bsz) * bsz)  # whole batches: one compiled shape
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=bsz,
                           num_examples=n_prompts, overlong=cfg.data.overlong, drop_remainder=True)
    stop = stop_ids_of(tok)
    data = collect_examples(model, list(ds), a.kind, gen_len=cfg.decode.max_new_tokens, block_len=args.block_len,
                            stop_tokens=stop, pad_id=sp.pad, labels=a.labels,
                            window=getattr(args, "window", 128), attention=cfg.model.attention,
                            block_size=cfg.model.block_size, shift_logits=args.shift_logits,
                            rng=jax.random.key(cfg.train.seed))
    train, held = split_by_group(data, 0.1, cfg.train.seed)
    head, ctor, losses = train_head(a.kind, train, steps=a.steps, block_len=args.block_len, seed=cfg.train.seed,
                                    lr=a.lr)
    kind_name = {"learn2pd": "learn2pd_filter", "tracelock": "tracelock_controller"}[a.kind]
    save_commit_head(head, a.out, kind_name, **ctor)
    thr = args.threshold
    report = {"kind": a.kind, "labels": a.labels, "prompts": n_prompts, "train_examples": len(train["label"]),
              "heldout_examples": len(held["label"]), "first_loss": losses[0], "last_loss": losses[-1],
              "heldout": {f"t={t}": label_metrics(head_probs(a.kind, head, held), held["label"], held["weight"], t)
                          for t in sorted({0.5, 0.9, thr})},
              "out": a.out, "head": ctor}
    Path(a.out, "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if a.eval:
        heads = load_commit_heads(a.out)  # what `jaxtok decode ... head_path=` loads
        table = []
        for run in _eval_runs(a.kind, args.block_len, a.thresholds or [thr]):
            run_args = policy_args_of(run["policy"], dict(pa, **run["args"]) if run["policy"] == a.kind
                                      else run["args"])
            m, _ = evaluate_policy(cfg, model, tok, task, policy=run["policy"], policy_args=run_args,
                                   heads=heads if run["policy"] == a.kind else None, num_examples=a.eval)
            table.append({"run": run["label"], **{k: v for k, v in m.items() if k not in ("policy", "compile_s")}})
            print(json.dumps(table[-1]))

        results = {"kind": a.kind, "init_from": cfg.model.init_from, "train": report, "rows": table,
                   "device": jax.devices()[0].device_kind}
        write_results(a.out, results, table, title=f"{a.kind}: accuracy vs NFE ({a.eval} held-out prompts)",
                      plots={"accuracy_vs_nfe": functools.partial(draw_accuracy_vs_nfe, table)})
        report["rows"] = table
    return report


if __name__ == "__main__":
    main()
