"""The learned commit policies of the diffusion sampler, trained from recorded decoding trajectories of a frozen
diffusion LM: the Learn2PD unmask filter (decode_methods.md §B16) and the TraceLock commitment controller (§B17).
``jaxtok train configs/heads/{learn2pd,tracelock}.yaml model.init_from=<diffusion run>`` (run by
:mod:`jaxtok.train.heads`); the run directory is the ``decode.policy_args.head_path`` of ``jaxtok decode``.

Data (both heads): the diffusion LM decodes ``prompts`` training prompts (whole batches of ``decode.batch_size``,
``decode.max_new_tokens`` new tokens, ``model.attention``) with a reference policy (LLaDA, one token per step,
``T = 0``, ``stop_early=False`` so the tail holds the model's own terminators); :func:`diffusion_generate` returns
the final tokens and the commit trajectory ``commit_step [B, N]``. :func:`replay_trajectory` re-runs the model on
every intermediate state ``x^(s)`` (:func:`jaxtok.decode.diffusion.trajectory_state`) — at ``T = 0`` this gives
exactly the proposals ``x0_s``, confidences ``conf_s`` and hidden states the sampler saw at step s — and
:func:`block_starts` rebuilds each row's active block ``[lo, hi)`` with the sampler's fixed-block rule. A share
``heldout`` of the prompts (whole prompts) is held out for the label metrics of ``summary.json``
(:func:`label_metrics`: base rate, accuracy, and at each of ``thresholds`` the accepted fraction, precision, recall).

Labels (:func:`commit_labels`) over positions still masked at step s:

- ``final`` (Learn2PD's ``is_correct`` and TraceLock's ``step_token_ids == final_token_ids``):
  ``y[s, i] = [x0_s[i] == final[i]]``.
- ``stable`` (strict future stability): the proposal equals the final token at step s and at every later step up to
  the position's commit, ``y[s, i] = Π_{u = s}^{commit_step[i]} [x0_u[i] == final[i]]``.

Learn2PD filter (:func:`learn2pd_examples`, :func:`filter_loss`): input = the block's confidence vector
``where(masked, conf, 1)`` gathered at ``lo .. lo+K-1`` (:func:`jaxtok.decode.commit_policies.block_features`, the
decode-time features), output one logit per block position; ``BCEWithLogits`` averaged over the masked positions
of the block (decoded positions are trivially correct and carry no signal). AdamW, lr 3e-3 (reference;
``configs/heads/learn2pd.yaml``). End-of-Text Prediction has nothing to train: it is the decode-time truncation
rule of the ``learn2pd`` policy (``Learn2PDArgs.eot``), driven by the same filter.

TraceLock controller (:func:`tracelock_examples`, :func:`controller_loss`): input = the decode-time trace state
(:func:`jaxtok.decode.commit_policies.tracelock_inputs`: the backbone's hidden state and confidence per generated
position, state ids LOCKED/GEN/EOT, the window from the first mask); prediction ``σ(logit_i − threshold_logit)``;
loss = weighted BCE over the window's GEN/EOT (masked) positions with negatives weighted ``neg_weight`` (2.0),
positives weighted ``1 − frontier_bias · (i − first) / (window − 1)`` ("frontier positive bias", 0.5), plus
``centre · threshold_logit²`` (threshold-centre loss, 0.001); random crops keep ``U[crop_min, 1]`` of each window
(25–100 %, :func:`random_crop`, applied to each minibatch). AdamW lr 1e-4, weight decay 0.01 in the reference
(``configs/heads/tracelock.yaml`` uses a larger lr for the short runs).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.decode import commit_policies as cp
from jaxtok.decode.diffusion import DEFAULT_MASK_ID, diffusion_generate, fixed_block_end, trajectory_state
from jaxtok.models.heads import build_head
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.heads import HeadRun, merge_records, prompt_batches

LABEL_KINDS = ("final", "stable")


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
        raise ValueError(f"label kind={kind!r}: allowed {list(LABEL_KINDS)}")
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



# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------


def _bce(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy with logits: ``softplus(z) − y·z`` (stable for large |z|)."""
    z = logits.astype(jnp.float32)
    return jax.nn.softplus(z) - label.astype(jnp.float32) * z


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
# Collection, metrics and the objectives
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


@dataclasses.dataclass(frozen=True)
class CommitHeadArgs:
    """Trace settings shared by both heads: ``prompts`` recorded (whole batches of ``decode.batch_size``),
    ``block_len`` of the reference LLaDA traces (= the policy's), ``labels`` (``final`` or ``stable``),
    ``shift_logits`` (AR-initialised diffusion LMs), ``heldout`` share of prompts and the ``thresholds`` of the
    held-out label metrics."""

    prompts: int = 512
    block_len: int = 8
    labels: str = "final"
    shift_logits: bool = False
    heldout: float = 0.1
    thresholds: Tuple[float, ...] = (0.5, 0.9)

    def __post_init__(self):
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels={self.labels!r}: allowed {list(LABEL_KINDS)}")
        if self.prompts < 1 or self.block_len < 1 or not 0.0 < self.heldout < 1.0:
            raise ValueError(f"prompts={self.prompts} >= 1, block_len={self.block_len} >= 1 and heldout="
                             f"{self.heldout} in (0, 1) required")


@dataclasses.dataclass(frozen=True)
class Learn2PDHeadArgs(CommitHeadArgs):
    """The filter MLP's ``hidden`` width (one ReLU layer over the block's confidences)."""

    hidden: int = 64


@dataclasses.dataclass(frozen=True)
class TraceLockHeadArgs(CommitHeadArgs):
    """``window`` positions from the first mask the controller sees (the policy's); the controller's size
    (``d_model``, ``num_heads``, ``num_layers``); the loss weights ``neg_weight``, ``frontier_bias``, ``centre``
    and the random crops' ``crop_min``."""

    thresholds: Tuple[float, ...] = (0.5, 0.9, 0.99)
    window: int = 128
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    neg_weight: float = 2.0
    frontier_bias: float = 0.5
    centre: float = 1e-3
    crop_min: float = 0.25


def _commit_run(kind: str, cfg, args: CommitHeadArgs, *, tokenizer, task) -> tuple[dict, dict]:
    """Trace ``args.prompts`` training prompts with the frozen diffusion LM (``model.init_from``), replay them into
    the examples of ``kind`` and split off whole held-out prompts: ``(train, heldout)``."""
    from jaxtok.decode.diffusion import stop_ids_of
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import SpecialTokens

    if not cfg.model.init_from:
        raise ConfigError(f"model.init_from=None: objective {cfg.objective.name!r} needs the run directory of a "
                          f"trained diffusion LM")
    model, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype, diffusion=True)
    data = collect_examples(model, prompt_batches(cfg, tokenizer, task, args.prompts), kind,
                            gen_len=cfg.decode.max_new_tokens, block_len=args.block_len,
                            stop_tokens=stop_ids_of(tokenizer), pad_id=SpecialTokens.of(tokenizer).pad,
                            labels=args.labels, window=getattr(args, "window", 128), attention=cfg.model.attention,
                            block_size=cfg.model.block_size, shift_logits=args.shift_logits,
                            rng=jax.random.key(cfg.train.seed))
    return split_by_group(data, args.heldout, cfg.train.seed)


def _evaluate(kind: str, thresholds):
    def evaluate(head, held: dict) -> dict:
        probs = head_probs(kind, head, held)
        return {f"t={t}": label_metrics(probs, held["label"], held["weight"], t) for t in sorted(set(thresholds))}

    return evaluate


def learn2pd_run(cfg, args: Learn2PDHeadArgs, *, tokenizer, task) -> HeadRun:
    """Learn2PD examples and a fresh :class:`~jaxtok.models.heads.FilterHead` of ``block_len`` positions."""
    train, held = _commit_run("learn2pd", cfg, args, tokenizer=tokenizer, task=task)
    ctor = {"block_size": args.block_len, "hidden": args.hidden, "num_features": 1, "depth": 1}
    return HeadRun(head=build_head("learn2pd_filter", cfg.train.seed, **ctor), kind="learn2pd_filter", ctor=ctor,
                   train=train, heldout=held, evaluate=_evaluate("learn2pd", args.thresholds))


def tracelock_run(cfg, args: TraceLockHeadArgs, *, tokenizer, task) -> HeadRun:
    """TraceLock examples and a fresh :class:`~jaxtok.models.heads.TraceController` on the LM's hidden width + 1."""
    train, held = _commit_run("tracelock", cfg, args, tokenizer=tokenizer, task=task)
    ctor = {"in_features": int(train["feats"].shape[-1]), "d_model": args.d_model, "num_heads": args.num_heads,
            "num_layers": args.num_layers}
    return HeadRun(head=build_head("tracelock_controller", cfg.train.seed, **ctor), kind="tracelock_controller",
                   ctor=ctor, train=train, heldout=held, evaluate=_evaluate("tracelock", args.thresholds),
                   augment=lambda b, r: random_crop(b, r, args.crop_min))


@OBJECTIVES.register("learn2pd", Learn2PDHeadArgs, head=learn2pd_run)
def filter_loss(head, batch: dict, rng, args) -> tuple:
    """Learn2PD (§B16): ``(Σ w · BCE(f(feats)_j, y_j), Σ w, aux)`` over the block positions of
    ``batch = {feats [M, K], valid [M, K], label [M, K], weight [M, K]}``; the step divides once."""
    w = batch["weight"].astype(jnp.float32)
    return jnp.sum(w * _bce(head(batch["feats"], batch["valid"]), batch["label"])), jnp.sum(w), {}


@OBJECTIVES.register("tracelock", TraceLockHeadArgs, head=tracelock_run)
def controller_loss(head, batch: dict, rng, args) -> tuple:
    """TraceLock (§B17): weighted BCE of ``σ(logit_i − threshold_logit)`` over masked window positions (negatives
    ×``neg_weight``; positives ×``1 − frontier_bias · (i − first)/(count − 1)``) + ``centre · mean θ²``, as
    ``(Σ w·BCE + centre · mean θ² · Σ w, Σ w, aux)`` so the step's ratio is the weighted mean plus the centre
    term (0 when nothing is selected). ``batch = {feats [M, N, F], states [M, N], valid, label, weight [M, N]}``."""
    out = head(batch["feats"], batch["states"], batch["valid"])
    y = batch["label"].astype(jnp.float32)
    v = batch["valid"].astype(jnp.float32)
    rank = jnp.cumsum(v, axis=-1) - 1.0  # [M, N] offset inside the window
    count = jnp.sum(v, axis=-1, keepdims=True)
    frac = rank / jnp.maximum(count - 1.0, 1.0)
    w = batch["weight"].astype(jnp.float32) * v * jnp.where(y > 0, 1.0 - args.frontier_bias * frac, args.neg_weight)
    den = jnp.sum(w)
    centre = args.centre * jnp.mean(out.threshold_logit**2)
    return jnp.sum(w * _bce(out.commit_logits, y)) + centre * den, den, {"centre": (centre, 1.0)}
