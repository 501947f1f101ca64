"""One decode-and-score loop (issue 16, item 3): every decoding method is a *step*, one :func:`evaluate` runs it.

A step decodes one batch of held-out prompts::

    step(prompt [B, P] int32, valid [B, P] bool, key) -> (tokens [B, N], valid [B, N], stats)

with everything else (the model(s), special tokens, sampling parameters, the method's policy) bound when the step
is built. ``stats`` maps names to per-row arrays ``[B, ...]`` (the evaluator sums the real rows ``[:b]`` of each,
so the copies padding a short last batch never count) or to 0-d values (totals of the whole batch, e.g. the
target forwards of a speculative batch, summed as they are). :func:`summarize` derives the reported metrics
(acceptance rates, NFE per row, length-control errors, ...) from the sums.

Builders here take their settings explicitly (:func:`ar_step`, :func:`speculative_step`, :func:`ead_step`,
:func:`diffusion_step`, :func:`lave_step`, :func:`lud_step`); :mod:`jaxtok.decode.run` builds them from a config for ``jaxtok
decode``, the training loop for held-out evaluation, the benchmarks for their rows.

:func:`evaluate` does the batching (:func:`jaxtok.data.prompt_dataset`, one static padded shape), the untimed
compile pass, the timing (device-to-host copy of the tokens included), the scoring with the task's verifier and
the summing of the step's stats.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from jaxtok.data import pad_prompt_batch, prompt_dataset
from jaxtok.sampling import GREEDY, SamplingParams
from jaxtok.tasks import tokenizer as tokenizer_lib
from jaxtok.tasks.tokenizer import SpecialTokens

Step = Callable[[Any, Any, jax.Array], tuple[Any, Any, dict]]
Score = Callable[[list, list], Mapping[str, float]]


def host(x) -> np.ndarray:
    """A host numpy copy of a (global) array, gathered across processes when it is not fully addressable."""
    if isinstance(x, jax.Array) and jax.process_count() > 1 and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def add_stats(sums: dict, stats: Mapping[str, Any], rows: int) -> dict:
    """``sums`` plus one batch's ``stats``: per-row arrays summed over their first ``rows`` rows (int64 / float64),
    0-d values (batch totals) added as they are. Returns ``sums`` (updated in place)."""
    for k, v in stats.items():
        a = host(v)
        a = a[:rows].sum(0) if a.ndim else a
        sums[k] = sums[k] + a if k in sums else a
    return sums


def _plain(v):
    """A 0-d numpy value as a Python int (integer dtypes) or float."""
    v = np.asarray(v)
    return int(v) if np.issubdtype(v.dtype, np.integer) or v.dtype == bool else float(v)


def summarize(stats: Mapping[str, Any], n_tok: int, rows: int) -> dict:
    """Derived metrics of the summed stats (``n_tok`` valid generated tokens over ``rows`` decoded rows); stats not
    consumed here are reported as their sums.

    - speculative (``row_forwards``, ``rounds``, ``accepted``, ``drafted``, ``*_by_position``, ``route_counts``):
      tokens per target forward (per row), mean accepted length, acceptance rate (overall and by draft position);
    - LUD (``lud_row_forwards``, ``lud_accept_hist``): tokens per forward (per row), mean accepted span and its
      histogram (steps whose rule accepted 1..k tokens);
    - EAD (``large_tokens``): the share of tokens the large model produced;
    - AR with a logit guide (``rows``): mean length; ``grammar_stopped`` share; length control's
      ``length_abs_err`` / ``exact_length`` / ``over_target`` per row;
    - diffusion (``nfe``): mean NFE per row, tokens per NFE, mean length;
    - LAVE (``verifies`` / ``rejections`` / ``recoveries``, ``grammar_ok``): per row.
    """
    s = dict(stats)
    out: dict = {}
    if "row_forwards" in s:
        out["tokens_per_target_forward"] = n_tok / max(int(s["row_forwards"]), 1)
        out["mean_accepted_length"] = int(s["accepted"]) / max(int(s["rounds"]), 1)
        out["acceptance_rate"] = int(s["accepted"]) / max(int(s["drafted"]), 1)
        dr = s.pop("drafted_by_position")
        out["acceptance_rate_by_position"] = [float(a / x) if x else None
                                              for a, x in zip(s.pop("accepted_by_position"), dr)]
        out["route_counts"] = np.asarray(s.pop("route_counts")).tolist()
    if "lud_row_forwards" in s:  # LUD: tokens per forward and the accepted-span histogram
        out["tokens_per_forward"] = n_tok / max(int(s.pop("lud_row_forwards")), 1)
        hist = np.asarray(s.pop("lud_accept_hist"), np.int64)
        out["mean_accepted_span"] = float((hist * np.arange(1, hist.size + 1)).sum() / max(hist.sum(), 1))
        out["accepted_span_hist"] = hist.tolist()
    if "large_tokens" in s:
        out["large_share"] = int(s["large_tokens"]) / max(n_tok, 1)
    if "rows" in s:  # a logit guide (length control, grammar)
        n = max(int(s.pop("rows")), 1)
        out["mean_length"] = n_tok / n
        if "grammar_stopped" in s:  # rows that reached a terminator inside the grammar (their text parses)
            out["grammar_stopped_share"] = int(s.pop("grammar_stopped")) / n
        if "length_abs_err" in s:
            out["length_abs_err"] = float(s.pop("length_abs_err")) / n
            out["exact_length_share"] = int(s.pop("exact_length")) / n
            out["over_target_share"] = int(s.pop("over_target")) / n
    if "nfe" in s:  # diffusion: forwards each row took part in
        nfe = int(s.pop("nfe"))
        out["mean_nfe"] = nfe / max(rows, 1)
        out["tokens_per_nfe"] = n_tok / max(nfe, 1)
        out["mean_length"] = n_tok / max(rows, 1)
    for k in ("verifies", "rejections", "recoveries"):
        if k in s:
            out[f"{k}_per_row"] = int(s.pop(k)) / max(rows, 1)
    if "grammar_ok" in s:
        out["grammar_ok"] = int(s.pop("grammar_ok")) / max(rows, 1)
    return {**{k: _plain(v) for k, v in s.items()}, **out}


def exact_match_score(task) -> Score:
    """Sums over completions: ``exact_match`` (the task's verifier gives 1) and ``format_ok`` when the task has an
    answer format (``task.has_format``, default True)."""

    def score(texts, examples):
        out = {"exact_match": float(sum(task.reward(t, ex) >= 1.0 for t, ex in zip(texts, examples)))}
        if getattr(task, "has_format", True):
            out["format_ok"] = float(sum(bool(task.format_ok(t)) for t in texts))
        return out

    return score


def evaluate(step: Step, task, tok, *, split: str = "eval", prompt_len: int, batch_size: int, num_examples: int,
             overlong: str = "drop", key: jax.Array, score: Optional[Score] = None, warmup: bool = True,
             pad: bool = True, num_samples: int = 16, sample_stats: Sequence[str] = (),
             keep_rows: Sequence[str] = ()) -> tuple[dict, list[dict]]:
    """Decode ``num_examples`` prompts of ``task``'s ``split`` with ``step`` and score them.

    Batches of ``batch_size`` left-padded prompts; with ``pad`` a short last batch is padded to ``batch_size``
    with copies of its first row (one static shape for a jitted step; host loops such as LAVE pass
    ``pad=False``). Batch ``i`` decodes with ``fold_in(key, i)``. With ``warmup`` the first batch is decoded once
    untimed (compilation, ``compile_s``); ``wall_s`` covers the timed calls and their tokens' copy to the host.
    ``score(texts, examples)`` returns sums over completions (default :func:`exact_match_score`), reported as
    means over ``num_examples`` — over-long prompts are not decoded, score 0 and stay in the denominator.

    Returns ``(metrics, sample rows)``: the score means, ``num_examples``, ``overlong_prompts``, ``decoded`` (rows
    decoded), ``generated_tokens``, ``wall_s``, ``tokens_per_s``, ``compile_s`` and :func:`summarize` of the summed
    stats, and ``per_row``: the per-row values of the stats named in ``keep_rows`` over all decoded rows; the first
    ``num_samples`` rows as ``{prompt, completion, answer, correct}`` plus the per-row values of ``sample_stats``.
    """
    score = score or exact_match_score(task)
    ds, dropped = prompt_dataset(task, split, tok, prompt_len=prompt_len, batch_size=batch_size,
                                 num_examples=num_examples, overlong=overlong)
    sums: dict = {}
    stats: dict = {}
    kept: dict = {k: [] for k in keep_rows}
    samples: list[dict] = []
    decoded = n_tok = 0
    wall, compile_s = 0.0, None
    for i, batch in enumerate(ds):
        b = batch["prompt"].shape[0]
        prompt, valid = pad_prompt_batch(batch, batch_size) if pad else (batch["prompt"], batch["prompt_valid"])
        sub = jax.random.fold_in(key, i)
        if warmup and compile_s is None:  # compile (and warm up) outside the timed region
            t0 = time.perf_counter()
            jax.block_until_ready(step(prompt, valid, sub)[0])
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_tokens, out_valid, batch_stats = step(prompt, valid, sub)
        tokens = host(out_tokens)
        wall += time.perf_counter() - t0
        n_tok += int(host(out_valid)[:b].sum())
        add_stats(stats, batch_stats, b)
        for k in keep_rows:
            kept[k].append(host(batch_stats[k])[:b])
        examples = [task.example(split, int(batch["index"][r])) for r in range(b)]
        texts = [tokenizer_lib.decode(tok, tokens[r]) for r in range(b)]
        for k, v in score(texts, examples).items():
            sums[k] = sums.get(k, 0.0) + v
        decoded += b
        for r in range(min(b, num_samples - len(samples))):
            ex = examples[r]
            samples.append({"prompt": ex.prompt, "completion": texts[r], "answer": ex.answer,
                            "correct": bool(task.reward(texts[r], ex) >= 1.0),
                            **{k: _plain(host(batch_stats[k])[r]) for k in sample_stats}})
    if not sums:  # every prompt over-long (overlong=drop): the keys still appear, at 0
        sums = {k: 0.0 for k in score([], [])}
    total = decoded + dropped.count
    metrics = {**{k: v / max(total, 1) for k, v in sums.items()}, "num_examples": total,
               "overlong_prompts": dropped.count, "decoded": decoded, "generated_tokens": n_tok, "wall_s": wall,
               "tokens_per_s": n_tok / max(wall, 1e-9), "compile_s": compile_s}
    metrics.update(summarize(stats, n_tok, decoded))
    if keep_rows:
        metrics["per_row"] = {k: np.concatenate(v) if v else np.zeros(0) for k, v in kept.items()}
    return metrics, samples


# ----------------------------------------------------------------------------------------------------------------
# Step builders, one per method (settings explicit; jaxtok.decode.run builds them from a config)
# ----------------------------------------------------------------------------------------------------------------


def ar_step(model, tok, *, max_new_tokens: int, sampling: SamplingParams = GREEDY, guide=None, guide_args=None,
            mesh=None) -> Step:
    """Autoregressive decoding (:func:`jaxtok.decode.generate.generate`); ``guide`` a logit guide built from
    ``guide_args`` (``lenvm``: length control, which reports per-row length errors against a target; ``grammar``:
    a token-level grammar mask on the host, which reports the rows that stopped inside the grammar). Stats:
    ``target_forwards`` and, with a guide, ``rows`` (mean length) and the guide's own."""
    from jaxtok.decode.generate import generate

    from .length_control import length_errors

    sp = SpecialTokens.of(tok)
    host_session = getattr(guide, "host_session", False)
    if host_session:  # grammar matchers on the host: decode on one device
        from flax import nnx

        graphdef, state = nnx.split(model)
        model, mesh = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0])), None
    target = getattr(guide_args, "target_length", None) if getattr(guide_args, "mode", None) in (
        "target", "budget") else None

    def step(prompt, valid, key):
        out = generate(model, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad, mesh=mesh, guide=guide,
                       max_new_tokens=max_new_tokens, sampling=sampling)
        stats = {"target_forwards": out.num_forwards}
        if guide is not None:
            stats["rows"] = np.ones(prompt.shape[0], np.int64)
            if host_session:  # surface the engine's error
                jax.block_until_ready(out.tokens)
                guide.close()
                stats["grammar_stopped"] = out.done
            if target is not None:  # a length target to score against
                stats.update(length_errors(host(out.lengths), target))
        return out.tokens, out.valid, stats

    return step


def speculative_stats(out) -> dict:
    """The stats of a :class:`jaxtok.decode.speculative.SpecResult` (per row, forwards per batch)."""
    return {"target_forwards": out.target_forwards, "draft_forwards": out.draft_forwards, "rounds": out.rounds,
            "accepted": out.accepted, "drafted": out.drafted, "row_forwards": out.rounds + 1,
            "accepted_by_position": out.accepted_by_position, "drafted_by_position": out.drafted_by_position,
            "route_counts": out.route_counts}


def speculative_step(model, drafter, policy, tok, *, draft_len: int, max_new_tokens: int,
                     sampling: SamplingParams = GREEDY) -> Step:
    """Lossless draft-and-verify (:func:`jaxtok.decode.speculative.speculative_generate`) of ``model`` with
    ``drafter`` (model, DEER, n-gram or routed TAPS) and the draft-length ``policy``; stats
    :func:`speculative_stats`."""
    from .speculative import speculative_generate

    sp = SpecialTokens.of(tok)

    def step(prompt, valid, key):
        out = speculative_generate(model, drafter, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad,
                                   draft_len=draft_len, policy=policy, max_new_tokens=max_new_tokens,
                                   sampling=sampling)
        return out.tokens, out.valid, speculative_stats(out)

    return step


def ead_step(small, large, tok, *, args, max_new_tokens: int, sampling: SamplingParams = GREEDY) -> Step:
    """Entropy Adaptive Decoding (:func:`jaxtok.decode.speculative.ead_generate`, lossy small/large switching with
    :class:`~jaxtok.decode.draft_policies.EADArgs`); stats ``large_tokens`` per row, forwards of each model."""
    from .speculative import ead_generate

    sp = SpecialTokens.of(tok)

    def step(prompt, valid, key):
        out = ead_generate(small, large, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad, args=args,
                           max_new_tokens=max_new_tokens, sampling=sampling)
        return out.tokens, out.valid, {"large_tokens": out.from_large.sum(-1), "small_forwards": out.small_forwards,
                                       "large_forwards": out.large_forwards}

    return step


def lud_step(model, tok, *, args, max_new_tokens: int, sampling: SamplingParams = GREEDY) -> Step:
    """Lexical Unit Decoding (:func:`jaxtok.decode.lud.lud_generate`, §A8, lossy): k tokens per forward from
    placeholders with :class:`~jaxtok.decode.lud.LUDArgs`; ``args.placeholder_id`` None = the tokenizer's mask
    token. Stats: ``target_forwards`` (batched), ``lud_row_forwards [B]`` and ``lud_accept_hist [B, k]``."""
    from jaxtok.registry import ConfigError

    from .lud import lud_generate

    sp = SpecialTokens.of(tok)
    ph = args.placeholder_id if args.placeholder_id is not None else sp.mask
    if ph is None:
        raise ConfigError("decode.policy_args.placeholder_id=None: the tokenizer has no mask token; give the id the "
                          "model was fine-tuned with (objective lud's placeholder_id)")

    def step(prompt, valid, key):
        out = lud_generate(model, prompt, valid, rng=key, stop_tokens=sp.eos_ids, pad_id=sp.pad, args=args,
                           placeholder_id=ph, max_new_tokens=max_new_tokens, sampling=sampling)
        return out.tokens, out.valid, {"target_forwards": out.forwards, "lud_row_forwards": out.row_forwards,
                                       "lud_accept_hist": out.accept_hist}

    return step


def diffusion_step(model, tok, *, gen_len: int, policy, heads=None, temperature: float = 0.0,
                   attention: str = "bidirectional", block_size: Optional[int] = None) -> Step:
    """Masked-diffusion sampling (:func:`jaxtok.decode.diffusion.diffusion_generate`) with the resolved commit
    ``policy`` (a :class:`~jaxtok.decode.diffusion.CommitPolicy`: its arguments parsed once, at build time) and the
    learned ``heads`` it needs; terminators: :func:`~jaxtok.decode.diffusion.stop_ids_of` the tokenizer. Stats:
    ``nfe`` per row."""
    from .diffusion import diffusion_generate, stop_ids_of

    sp = SpecialTokens.of(tok)
    kw = dict(gen_len=gen_len, policy=policy, temperature=temperature, stop_tokens=stop_ids_of(tok), pad_id=sp.pad,
              attention=attention, block_size=block_size, heads=heads)

    def step(prompt, valid, key):
        out = diffusion_generate(model, prompt, valid, rng=key, **kw)
        return out.tokens, out.valid, {"nfe": out.nfe}

    return step


def lave_step(model, tok, grammar, *, args, gen_len: int, temperature: float = 0.0,
              attention: str = "bidirectional", block_size: Optional[int] = None) -> Step:
    """LAVE (:func:`jaxtok.decode.constrained.lave_generate`, a host loop around jitted forwards) under ``grammar``
    with :class:`~jaxtok.decode.constrained.LaveArgs`. Stats per row: ``nfe``, ``verifies``, ``rejections``,
    ``recoveries``, ``grammar_ok`` (the completion parses, Earley); per batch ``forward_s`` (jitted forwards,
    compilation included) and ``host_s`` (proposals, parser, lookahead)."""
    from .constrained import lave_generate
    from .diffusion import stop_ids_of

    sp = SpecialTokens.of(tok)
    stops = stop_ids_of(tok)

    def step(prompt, valid, key):
        out = lave_generate(model, prompt, valid, grammar, gen_len=gen_len, args=args, temperature=temperature,
                            rng=key, stop_tokens=stops, pad_id=sp.pad, attention=attention, block_size=block_size)
        parses = np.array([grammar.parses(grammar.text_of(t)) for t in out.tokens], np.int64)
        return out.tokens, out.valid, {"nfe": out.nfe, "verifies": out.verifies, "rejections": out.rejections,
                                       "recoveries": out.recoveries, "grammar_ok": parses,
                                       "forward_s": np.float64(out.forward_s), "host_s": np.float64(out.host_s)}

    return step


def evaluate_policy(cfg, model, tok, task, *, policy, policy_args=None, heads=None,
                    num_examples: Optional[int] = None) -> tuple[dict, list[dict]]:
    """Decode ``num_examples`` (default ``data.num_eval``) held-out prompts of ``task`` with one commit policy:
    :func:`evaluate` of a :func:`diffusion_step` (the shorthand of the benchmarks and the training loop's held-out
    evaluation). ``policy``: a resolved :class:`~jaxtok.decode.diffusion.CommitPolicy`, or a ``COMMIT_POLICIES``
    name with ``policy_args`` (its dataclass, a mapping or None; on a block-causal model ``block_len`` defaults to
    ``model.block_size`` unless given), resolved here once; learned heads load from ``policy_args.head_path`` unless
    ``heads`` are given.

    Settings from ``cfg``: ``decode.max_new_tokens`` (= gen_len), ``decode.temperature``, ``decode.batch_size``,
    ``model.attention``/``model.block_size``, ``train.seed``. Returns ``(metrics, sample rows)``: ``policy``,
    ``exact_match``, ``format_ok`` (tasks with an answer format), ``mean_nfe`` (forwards per decoded row),
    ``tokens_per_nfe``, ``mean_length``, ``wall_s``, ``tokens_per_s``, ``compile_s``, ``num_examples`` (over-long
    prompts included: they score 0) and ``overlong_prompts``.
    """
    from .diffusion import CommitPolicy, commit_policy, policy_and_heads

    m = cfg.model
    if not isinstance(policy, CommitPolicy) and m.attention == "block_causal" and m.block_size and (
            policy_args is None or (isinstance(policy_args, Mapping) and "block_len" not in policy_args)):
        policy = commit_policy(policy, policy_args, block_len=m.block_size)  # blocks = the model's position blocks
        policy_args = None
    if heads:
        policy = commit_policy(policy, policy_args)
    else:
        policy, heads = policy_and_heads(policy, policy_args)  # heads from policy_args.head_path
    temperature = 0.0 if cfg.decode.method == "greedy" else float(cfg.decode.temperature)
    step = diffusion_step(model, tok, gen_len=cfg.decode.max_new_tokens, policy=policy, heads=heads,
                          temperature=temperature, attention=m.attention, block_size=m.block_size)
    metrics, samples = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                                num_examples=num_examples or cfg.data.num_eval, overlong=cfg.data.overlong,
                                key=jax.random.key(cfg.train.seed), sample_stats=("nfe",))
    keys = ("exact_match", "mean_nfe", "tokens_per_nfe", "mean_length", "wall_s", "tokens_per_s", "compile_s",
            "num_examples", "overlong_prompts", "format_ok")
    return {"policy": policy.name, **{k: metrics[k] for k in keys if k in metrics}}, samples
