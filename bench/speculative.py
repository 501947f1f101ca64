"""``speculative`` benchmark: every speculative-decoding method of decode_methods.md Part A against greedy AR with the
same target, on the same held-out prompts, in one run (issue 6).

Models: the target ``model.init_from`` (zoo teacher), the AR drafter ``decode.draft_init_from`` (zoo draft) and the
DEER drafter ``bench.args.deer`` (zoo masked-diffusion LM). Greedy decoding (``decode.temperature`` must be 0), so
every lossless method must reproduce AR token for token: ``identical_to_ar`` is the share of rows that do.

Per method (``bench.args.methods``: fixed γ ∈ {2, 4, 8}, heuristic, confidence, SpecDec++, SpecKV, TAPS, DEER,
n-gram): wall-clock speedup over AR (each timed pass of a method alternates with a pass of the compiled AR
baseline, so both see the same load of the shared machine; the fastest of ``repeats`` passes counts), tokens per
target forward ``Σ tokens / Σ (rounds + 1)`` per row, mean accepted length, acceptance rate overall and by draft
position, batched target/draft forward counts, task exact match.

Cost model. On a 2-core CPU tiny models are dispatch-bound, so wall-clock alone understates what the acceptance
numbers are worth; the bench times one batched cached forward of each model (target: 1 token; drafter: 1 token;
DEER: its full bidirectional forward) and reports, beside the measured speedup, the standard estimate
(Leviathan et al. 2023, §A1)

    cost_model_speedup = tokens_per_target_forward / (1 + drafts_per_round · c),   c = t_draft / t_target,

with ``drafts_per_round`` = batched drafter forwards per verification round (n-gram: c = 0; TAPS: the summed cost of
its drafters), and the batched variant ``AR forwards / (target forwards + Σ draft forwards · c)`` that also charges
the rounds where the slowest row of the batch holds the others.

SpecDec++ and SpecKV heads are trained in the bench from acceptance data logged on train-split prompts
(:mod:`jaxtok.train.objectives.draft_heads`) and saved under ``<run dir>/heads``, unless a method's
``args.head_path`` or ``bench.args.heads_from`` names saved heads.

EAD (lossy, §A4): exact match against the share of tokens produced by the large model for each threshold of
``bench.args.ead_thresholds``, with the draft alone (share 0) and the target alone (share 1) as end points.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.metrics import markdown_table, write_results
from jaxtok.models import KVCache
from jaxtok.registry import BENCHES, DRAFT_POLICIES, ConfigError

from jaxtok.decode import draft_policies as dp
from jaxtok.models.heads import load_head, save_head
from jaxtok.decode.generate import generate
from jaxtok.decode.evaluate import add_stats, speculative_stats, summarize
from jaxtok.train.objectives import draft_heads as th
from jaxtok.decode.speculative import (DeerDrafter, ModelDrafter, NgramDrafter, RoutedDrafter, ead_generate,
                                      speculative_generate)
from jaxtok.sampling import GREEDY

from .plots import speculative_plots

ADAPTIVE = ("heuristic", "confidence", "specdecpp", "speckv")
DRAFTER_NAMES = ("draft", "ngram", "deer")

DEFAULT_METHODS = (
    {"label": "fixed γ=2", "drafter": "draft", "policy": "fixed", "draft_len": 2},
    {"label": "fixed γ=4", "drafter": "draft", "policy": "fixed", "draft_len": 4},
    {"label": "fixed γ=8", "drafter": "draft", "policy": "fixed", "draft_len": 8},
    {"label": "heuristic", "drafter": "draft", "policy": "heuristic", "draft_len": 8,
     "args": {"initial": 4, "increase": 2, "decrease": 1, "minimum": 1}},
    {"label": "confidence 0.4", "drafter": "draft", "policy": "confidence", "draft_len": 8, "args": {"threshold": 0.4}},
    {"label": "SpecDec++", "drafter": "draft", "policy": "specdecpp", "draft_len": 8,
     "args": {"threshold": 0.3, "min_len": 2, "max_len": 20}},
    {"label": "SpecKV", "drafter": "draft", "policy": "speckv", "draft_len": 8,
     "args": {"candidates": [2, 4, 6, 8], "initial": 4}},
    {"label": "TAPS (draft+DEER)", "drafter": ["draft", "deer"], "policy": "fixed", "draft_len": 4},
    {"label": "DEER γ=4", "drafter": "deer", "policy": "fixed", "draft_len": 4},
    {"label": "n-gram γ=4", "drafter": "ngram", "policy": "fixed", "draft_len": 4},
)


@dataclasses.dataclass(frozen=True)
class SpecBenchArgs:
    """``methods``: ``[{label, drafter, policy, draft_len, args}]`` with ``drafter`` one of ``draft`` (the AR model
    ``decode.draft_init_from``), ``ngram``, ``deer`` (the diffusion LM ``deer``) or a list of them (TAPS routing);
    ``policy``/``args`` a draft-length policy of ``DRAFT_POLICIES``. ``num_examples``: held-out prompts (default
    ``data.num_eval``). ``repeats``: timed passes per method (the fastest counts; the CPU is shared). Heads:
    ``head_batches`` train-split prompt batches logged, ``head_steps`` Adam steps. ``cost_repeats``: timed calls
    per forward-cost measurement. EAD: ``ead_thresholds`` (entropy in bits) with ``ead_args`` (window,
    min_dwell, chunk, start). Trained heads are saved to ``<run dir>/heads/{specdecpp,speckv}``; ``heads_from``: a
    directory laid out so (e.g. an earlier bench run's ``heads``) to load them instead of training."""

    deer: Optional[str] = "runs/zoo/diffusion"
    methods: tuple = DEFAULT_METHODS
    num_examples: Optional[int] = None
    repeats: int = 2
    head_batches: int = 4
    head_steps: int = 300
    cost_repeats: int = 20
    ead_thresholds: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    ead_args: dict = dataclasses.field(default_factory=lambda: {"window": 5, "min_dwell": 5, "chunk": 8})
    heads_from: Optional[str] = None

    def __post_init__(self):
        if self.repeats < 1 or self.cost_repeats < 1 or self.head_batches < 1 or self.head_steps < 1:
            raise ValueError("repeats, cost_repeats, head_batches and head_steps must be >= 1")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples={self.num_examples}: must be >= 1")
        for i, m in enumerate(self.methods):
            where = f"methods[{i}]"
            if not isinstance(m, dict) or set(m) - {"label", "drafter", "policy", "draft_len", "args"}:
                raise ValueError(f"{where}={m!r}: allowed keys label, drafter, policy, draft_len, args")
            names = m.get("drafter", "draft")
            names = [names] if isinstance(names, str) else list(names)
            bad = [n for n in names if n not in DRAFTER_NAMES]
            if bad or not names:
                raise ValueError(f"{where}.drafter={m.get('drafter')!r}: allowed {list(DRAFTER_NAMES)} or a list")
            if m.get("policy", "fixed") in ("taps", "ead"):
                raise ValueError(f"{where}.policy={m['policy']!r}: give TAPS as a drafter list; EAD has "
                                 f"ead_thresholds")
            if int(m.get("draft_len", 4)) < 1:
                raise ValueError(f"{where}.draft_len={m.get('draft_len')!r}: must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------------------


def _method_label(m: dict) -> str:
    d = m.get("drafter", "draft")
    return m.get("label") or f"{m.get('policy', 'fixed')} ({d if isinstance(d, str) else '+'.join(d)}, " \
                              f"γ={m.get('draft_len', 4)})"


def timed_against(call: Callable, reference: Callable, batches: list, repeats: int) -> tuple[list, float, float, float]:
    """Like :func:`timed_pass`, alternating each timed pass of ``call`` with a pass of the (compiled) ``reference``
    so both see the same machine load: ``(outputs, fastest pass s, fastest reference pass s, compile_s)``."""
    t0 = time.perf_counter()
    jax.block_until_ready(call(*batches[0]))
    compile_s = time.perf_counter() - t0
    best, best_ref, outs = float("inf"), float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([reference(p, v) for p, v in batches])
        best_ref = min(best_ref, time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = [jax.block_until_ready(call(p, v)) for p, v in batches]
        best = min(best, time.perf_counter() - t0)
    return outs, best, best_ref, compile_s


def timed_pass(call: Callable, batches: list, repeats: int) -> tuple[list, float, float]:
    """Run ``call(prompt, valid)`` over every batch: one untimed call on the first batch (compile), then
    ``repeats`` timed passes over all batches; ``(outputs of the last pass, fastest pass seconds, compile_s)``."""
    t0 = time.perf_counter()
    jax.block_until_ready(call(*batches[0]))
    compile_s = time.perf_counter() - t0
    best, outs = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [jax.block_until_ready(call(p, v)) for p, v in batches]
        best = min(best, time.perf_counter() - t0)
    return outs, best, compile_s


def forward_costs(target, draft, deer, batch: int, capacity: int, gamma: int, repeats: int) -> dict:
    """Milliseconds of one batched forward: target and draft with one new token on a KV cache of ``capacity``
    slots (an AR step; a draft step), the target on ``gamma + 1`` tokens (a verification), and DEER's
    bidirectional forward over ``capacity`` tokens with ``gamma`` logit rows (one DEER draft). The calls are
    interleaved (one of each per repeat, the fastest counts), so load changes on a shared machine hit all alike."""
    def cached(model, width):
        graphdef, state = nnx.split(model)
        cache = KVCache.init(model.cfg, batch, capacity)
        tok = jnp.full((batch, width), 5, jnp.int32)
        step = jax.jit(lambda s, c, t: nnx.merge(graphdef, s)(t, cache=c).logits)
        return lambda: step(state, cache, tok)

    calls = {"target_step": cached(target, 1), "target_verify": cached(target, gamma + 1)}
    if draft is not None:
        calls["draft_step"] = cached(draft, 1)
    if deer is not None:
        graphdef, state = nnx.split(deer)
        tok = jnp.full((batch, capacity), 5, jnp.int32)
        at = jnp.broadcast_to(jnp.arange(gamma, dtype=jnp.int32)[None] + capacity - gamma, (batch, gamma))
        fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, attention="bidirectional", logits_at=at).logits)
        calls["deer_forward"] = lambda: fwd(state, tok)
    return best_ms(calls, repeats)


def best_ms(calls: dict, repeats: int) -> dict:
    """Fastest wall time in ms of each zero-argument call (each compiled first), the calls interleaved."""
    for fn in calls.values():
        jax.block_until_ready(fn())  # compile
    best = {k: float("inf") for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: v * 1e3 for k, v in best.items()}


def draft_cost_per_round(names: list, draft_forwards: int, rounds: int, c: dict) -> float:
    """Drafter cost of one verification round in target-forward units: DEER spends exactly one forward per round,
    n-gram none, the AR draft the remaining forwards (prefill excluded by the caller)."""
    rounds = max(rounds, 1)
    n_deer = names.count("deer")
    model_forwards = max(draft_forwards - n_deer * rounds, 0) if "draft" in names else 0
    return (model_forwards * c.get("draft", 0.0) + n_deer * rounds * c.get("deer", 0.0)) / rounds


def row_cost_model_speedup(row: dict, c: dict) -> float:
    """The batch-1 view of the cost model: per row, a round drafts ``drafted / rounds`` tokens (one AR-draft
    forward each; DEER one forward per round whatever it proposes; TAPS both, the AR part counted by the routed
    drafts) -> ``tokens_per_target_forward / (1 + cost per round)``. Adaptive policies shorten rows' drafts, which
    a batch only turns into fewer forwards when every row stops, so this column is where they can gain."""
    names = row["drafter"].split("+")
    per_round = row["drafted"] / max(row["rounds"], 1)
    cost = (per_round * c.get("draft", 0.0) if "draft" in names else 0.0) + names.count("deer") * c.get("deer", 0.0)
    return row["tokens_per_target_forward"] / (1.0 + cost)


def finish_rows(rows: list[dict], c: dict) -> list[dict]:
    """Derived columns that need only the counts and ``c`` (also applied to saved results), table order first."""
    for r in rows:
        r["row_cost_model_speedup"] = row_cost_model_speedup(r, c)
    return [{k: r[k] for k in TABLE_COLUMNS} | {k: v for k, v in r.items() if k not in TABLE_COLUMNS} for r in rows]


def rows_identical(a_tok, a_valid, b_tok, b_valid) -> np.ndarray:
    """``[B]`` bool: the rows emit the same valid tokens."""
    a_tok, b_tok = np.asarray(a_tok), np.asarray(b_tok)
    a_valid, b_valid = np.asarray(a_valid, bool), np.asarray(b_valid, bool)
    return np.all(a_valid == b_valid, axis=1) & np.all(np.where(a_valid, a_tok == b_tok, True), axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Heads (SpecDec++, SpecKV) from logged acceptance data
# ----------------------------------------------------------------------------------------------------------------


def train_head(kind: str, target, draft, head_batches: list, *, max_new_tokens: int, steps: int, seed: int,
               stop_tokens: tuple, candidates=(2, 4, 6, 8)) -> tuple[Any, dict]:
    """Log acceptance records on ``head_batches`` (train-split prompts) and fit the head
    (train/objectives/draft_heads.py); returns ``(head, info)``."""
    key = jax.random.key(seed)
    records: dict = {}
    for prompt, valid in head_batches:
        key, sub = jax.random.split(key)
        if kind == "specdecpp":
            rec = th.specdecpp_examples(target, draft, prompt, valid, max_new_tokens=max_new_tokens,
                                        temperature=1e-3, rng=sub, stop_tokens=stop_tokens)
        else:
            rec = th.speckv_examples(target, draft, prompt, valid, max_new_tokens=max_new_tokens,
                                     candidates=tuple(candidates), rng=sub, stop_tokens=stop_tokens)
        for k, v in rec.items():
            records[k] = np.concatenate([records[k], v]) if k in records else v
    n = len(next(iter(records.values())))
    if n == 0:
        raise ValueError(f"{kind} head: no training records were logged (prompts too short or responses empty)")
    if kind == "specdecpp":
        head = dp.specdecpp_head(draft.cfg.hidden_size, 3, seed)
        losses = th.fit_records("specdecpp", head, records, steps=steps, seed=seed)
        label_mean = float(np.mean(records["label"]))
    else:
        head = dp.speckv_head(16, seed)
        losses = th.fit_records("speckv", head, records, steps=steps, seed=seed)
        label_mean = float(np.mean(records["rate"]))
    return head, {"examples": int(n), "first_loss": losses[0], "last_loss": losses[-1], "label_mean": label_mean}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("method", "drafter", "policy", "gamma_max", "identical_to_ar", "exact_match", "wall_s",
                 "ar_wall_s", "tokens_per_s", "speedup", "cost_model_speedup", "row_cost_model_speedup",
                 "batched_cost_model_speedup",
                 "tokens_per_target_forward", "mean_accepted_length", "acceptance_rate", "target_forwards",
                 "draft_forwards", "drafts_per_round", "c")
EAD_COLUMNS = ("method", "threshold", "large_share", "exact_match", "wall_s", "tokens_per_s", "small_forwards",
               "large_forwards")


def verdict(rows: list[dict]) -> list[str]:
    """Plain statements: does each adaptive policy beat the best fixed γ (measured speedup, cost-model speedup,
    tokens per target forward)? With the papers' claims beside them."""
    fixed = [r for r in rows if r["policy"] == "fixed" and r["drafter"] == "draft"]
    if not fixed:
        return []
    lines = []
    for metric, name in (("speedup", "measured wall-clock speedup"), ("cost_model_speedup", "cost-model speedup"),
                         ("row_cost_model_speedup", "per-row (batch-1) cost-model speedup"),
                         ("tokens_per_target_forward", "tokens per target forward")):
        best = max(fixed, key=lambda r: r[metric])
        for r in rows:
            if r["policy"] in ADAPTIVE and r["drafter"] == "draft":
                word = "beats" if r[metric] > best[metric] else "does NOT beat"
                lines.append(f"{r['method']} {word} the best fixed γ on {name}: {r[metric]:.3f} vs "
                             f"{best[metric]:.3f} ({best['method']}).")
    g4 = min(fixed, key=lambda r: abs(r["gamma_max"] - 4))  # the paper's baseline is γ=4
    for r in rows:
        if r["drafter"] != "draft":
            continue
        if r["policy"] == "speckv":
            gain = r["tokens_per_target_forward"] / g4["tokens_per_target_forward"] - 1
            lines.append(f"{r['method']} vs fixed γ={g4['gamma_max']}, tokens per target forward: {gain:+.1%} "
                         f"(SpecKV paper: +56% expected tokens per step over γ=4).")
        if r["policy"] == "specdecpp":
            lines.append(f"{r['method']} end-to-end speedup over AR: {r['speedup']:.2f}x measured, "
                         f"{r['cost_model_speedup']:.2f}x cost model (SpecDec++ paper: 2.04-2.26x).")
    return lines


def report_markdown(results: dict, command: Optional[str] = None) -> str:
    """The bench's markdown: the command, setup, the speculative table, the EAD table and the verdict."""
    out = ["# Speculative decoding benchmark", ""]
    if command:
        out += ["```", command, "```", ""]
    costs = results["forward_ms"]
    out += [f"target `{results['target']}`, draft `{results['draft']}`, DEER `{results['deer']}`; "
            f"{results['num_examples']} held-out prompts, batch {results['batch_size']}, "
            f"max {results['max_new_tokens']} new tokens, greedy; device {results['device']}.", "",
            "Per-forward cost (ms, batched): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items())
            + "; c = " + ", ".join(f"{k} {v:.3f}" for k, v in results["c"].items()) + ".", "",
            "Columns: `speedup` = wall time of the AR pass timed next to the method (`ar_wall_s`) / the method's "
            "(fastest of the passes); `cost_model_speedup` = tokens_per_target_forward / (1 + drafts_per_round * c) "
            "with c = drafter forward / target forward time (one batched step each; DEER: its whole "
            "bidirectional re-encode) and drafts_per_round the batched drafter forwards per round; "
            "`row_cost_model_speedup`: the same with each row's own drafts per round (drafted / rounds: the batch-1 "
            "view, where a policy that stops a row early saves its forwards); `batched_cost_model_speedup` = AR "
            "target forwards / (target forwards + draft forwards * c), counting batched forwards (the slowest "
            "row sets the round count). Neither cost model charges the verification forward's extra width "
            "(target_verify vs target_step above).", "",
            f"AR baseline: {results['ar']['tokens_per_s']:.1f} tokens/s (wall {results['ar']['wall_s']:.3f} s, "
            f"mean of the runs before and after the methods: {results['ar']['wall_s_before']:.3f} / "
            f"{results['ar']['wall_s_after']:.3f} s), exact match {results['ar']['exact_match']:.3f}.", "",
            "## Lossless methods", "", markdown_table(results["rows"], list(TABLE_COLUMNS)),
            "Acceptance rate by draft position:", ""]
    for r in results["rows"]:
        acc = ", ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_rate_by_position"])
        out.append(f"- {r['method']}: {acc}")
    out += ["", "## EAD (lossy): exact match vs share of large-model tokens", "",
            markdown_table(results["ead"], list(EAD_COLUMNS))]
    if results.get("heads"):
        out += ["Heads: " + "; ".join(
            f"{k}: loaded from `{v['loaded_from']}`" if "loaded_from" in v else
            f"{k}: trained in the bench on {v['examples']} logged records, loss {v['first_loss']:.3f} -> "
            f"{v['last_loss']:.3f}, mean label {v['label_mean']:.3f}" for k, v in results["heads"].items()) + ".", ""]
    if results.get("verdict"):
        out += ["## Adaptive policies vs the best fixed γ", ""] + [f"- {line}" for line in results["verdict"]] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------------------------


def _prompt_batches(task, split: str, tok, cfg, n: int) -> tuple[list, list]:
    """``([(prompt, valid)] padded to decode.batch_size, [(indices, real rows)])`` of ``n`` prompts of ``split``."""
    from jaxtok.data import pad_prompt_batch, prompt_dataset

    bs = cfg.decode.batch_size
    ds, _ = prompt_dataset(task, split, tok, prompt_len=cfg.data.prompt_len, batch_size=bs, num_examples=n,
                           overlong=cfg.data.overlong)
    batches, meta = [], []
    for batch in ds:
        batches.append(pad_prompt_batch(batch, bs))  # one static shape
        meta.append((np.asarray(batch["index"]), batch["prompt"].shape[0]))
    return batches, meta


@BENCHES.register("speculative", SpecBenchArgs)
def speculative_bench(cfg, run_dir: str | Path, args: SpecBenchArgs) -> dict:
    """AR vs every speculative method and EAD on the same held-out prompts (module docstring): loads the target
    ``model.init_from``, the drafter ``decode.draft_init_from`` and (when a method uses it) DEER ``args.deer``."""
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import load_tokenizer_for

    if not cfg.model.init_from or not cfg.decode.draft_init_from:
        raise ConfigError("bench 'speculative' needs model.init_from=<target run dir> and "
                          "decode.draft_init_from=<AR draft run dir>")
    uses_deer = any("deer" in _drafter_names(m) for m in args.methods)
    if uses_deer and not args.deer:
        raise ConfigError("bench.args.methods use drafter 'deer': set bench.args.deer=<diffusion run dir>")
    target, _ = load_any(cfg.model.init_from, key="model.init_from", dtype=cfg.model.dtype)
    draft, _ = load_any(cfg.decode.draft_init_from, key="decode.draft_init_from", dtype=cfg.model.dtype)
    deer = load_any(args.deer, key="bench.args.deer", dtype=cfg.model.dtype, diffusion=True)[0] if uses_deer else None
    tok = load_tokenizer_for(cfg)
    return run_speculative_bench(cfg, run_dir, args, target=target, draft=draft, deer=deer, tok=tok)


def _drafter_names(m: dict) -> list:
    names = m.get("drafter", "draft")
    return [names] if isinstance(names, str) else list(names)


@dataclasses.dataclass(frozen=True)
class _Prompts:
    """The bench's held-out prompts and their scoring: ``batches [(prompt, valid)]`` padded to
    ``decode.batch_size``, ``meta [(example indices, real rows)]`` per batch (:func:`_prompt_batches`)."""

    task: Any
    tok: Any
    batches: list
    meta: list

    @property
    def rows(self) -> int:
        return sum(b for _, b in self.meta)

    def accuracy(self, outs) -> float:
        """Task exact match (reward >= 1) of the real rows of ``outs`` (one output per batch)."""
        from jaxtok.tasks.tokenizer import decode

        hits = total = 0
        for out, (idx, b) in zip(outs, self.meta):
            toks = np.asarray(out.tokens)
            for r in range(b):
                hits += self.task.reward(decode(self.tok, toks[r]), self.task.example("eval", int(idx[r]))) >= 1.0
                total += 1
        return hits / max(total, 1)

    def n_tokens(self, outs) -> int:
        """Generated tokens of the real rows of ``outs``."""
        return int(sum(np.asarray(o.valid)[:b].sum() for o, (_, b) in zip(outs, self.meta)))


class _Baseline(NamedTuple):
    """Greedy AR of the target: ``call(prompt, valid)``, its ``outs`` per batch and batched ``forwards``."""

    call: Callable
    outs: list
    forwards: int


def _greedy_ar(model, n_new: int, sp, key) -> Callable:
    return lambda p, v: generate(model, p, v, max_new_tokens=n_new, sampling=GREEDY, stop_tokens=sp.eos_ids,
                                 pad_id=sp.pad, rng=key)


def _policy_heads(cfg, run_dir, args: SpecBenchArgs, methods: list, task, tok, target, draft) -> tuple[dict, dict]:
    """SpecDec++ / SpecKV heads for the methods that name no ``args.head_path``: loaded from
    ``bench.args.heads_from`` when saved there, else trained on logged acceptance data (train-split prompts,
    :func:`train_head`) and saved under ``<run dir>/heads/<kind>``. Returns ``(heads, info)`` by kind."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    heads, head_info = {}, {}
    needs = {m.get("policy") for m in methods if not (m.get("args") or {}).get("head_path")}
    head_batches = None
    for kind in ("specdecpp", "speckv"):
        if kind not in needs:
            continue
        saved = Path(args.heads_from) / kind if args.heads_from else None
        if saved is not None and (saved / "head.json").is_file():
            heads[kind], head_info[kind] = load_head(saved), {"loaded_from": str(saved)}
            continue
        if head_batches is None:
            head_batches = _prompt_batches(task, "train", tok, cfg, args.head_batches * cfg.decode.batch_size)[0]
        cand = next(((m.get("args") or {}).get("candidates", (2, 4, 6, 8)) for m in methods
                     if m.get("policy") == kind), (2, 4, 6, 8))
        heads[kind], head_info[kind] = train_head(kind, target, draft, head_batches,
                                                  max_new_tokens=cfg.decode.max_new_tokens, steps=args.head_steps,
                                                  seed=cfg.train.seed, stop_tokens=SpecialTokens.of(tok).eos_ids,
                                                  candidates=cand)
        ctor = {"hidden_size": draft.cfg.hidden_size, "depth": 3} if kind == "specdecpp" else {"hidden": 16}
        save_head(heads[kind], Path(run_dir) / "heads" / kind, kind, **ctor)
    return heads, head_info


def _method_row(m: dict, drafters: dict, heads: dict, target, draft, prompts: _Prompts, ar: _Baseline, c: dict,
                args: SpecBenchArgs, *, n_new: int, sp, key) -> dict:
    """One method of ``bench.args.methods``: its drafter and policy, timed against AR (:func:`timed_against`),
    its acceptance statistics, exactness against AR and cost-model speedups (the bench's results row)."""
    names = _drafter_names(m)
    drafter = drafters[names[0]] if len(names) == 1 else RoutedDrafter(tuple(drafters[n] for n in names))
    name = m.get("policy", "fixed")
    pargs = DRAFT_POLICIES.parse_args(name, m.get("args"), f"bench.args.methods[{m.get('label')}].args")
    policy = dp.build_policy(name, pargs, hidden_size=draft.cfg.hidden_size, head=heads.get(name)
                             if not (m.get("args") or {}).get("head_path") else None)
    g = int(m.get("draft_len", 4))

    def call(p, v):
        return speculative_generate(target, drafter, p, v, max_new_tokens=n_new, draft_len=g, policy=policy,
                                    sampling=GREEDY, stop_tokens=sp.eos_ids, pad_id=sp.pad, rng=key)

    outs, wall, ar_near, compile_s = timed_against(call, ar.call, prompts.batches, args.repeats)
    stats: dict = {}
    same = []
    for o, a, (_, b) in zip(outs, ar.outs, prompts.meta):
        add_stats(stats, speculative_stats(o), b)
        same.append(rows_identical(o.tokens, o.valid, a.tokens, a.valid)[:b])
    n_tok = prompts.n_tokens(outs)
    s = summarize(stats, n_tok, prompts.rows)
    n_batches = len(prompts.batches)
    prefill = sum(drafters[n].prefill_forwards for n in names) * n_batches
    batched_rounds = s["target_forwards"] - n_batches
    dpr = (s["draft_forwards"] - prefill) / max(batched_rounds, 1)
    cost = draft_cost_per_round(names, s["draft_forwards"] - prefill, batched_rounds, c)
    return {
        "method": _method_label(m), "drafter": "+".join(names), "policy": name, "gamma_max": g,
        "identical_to_ar": float(np.mean(np.concatenate(same))), "exact_match": prompts.accuracy(outs),
        "wall_s": wall, "ar_wall_s": ar_near, "speedup": ar_near / wall, "compile_s": compile_s,
        "tokens_per_s": n_tok / wall, "generated_tokens": n_tok,
        "tokens_per_target_forward": s["tokens_per_target_forward"],
        "mean_accepted_length": s["mean_accepted_length"], "acceptance_rate": s["acceptance_rate"],
        "acceptance_rate_by_position": s["acceptance_rate_by_position"],
        "target_forwards": s["target_forwards"], "draft_forwards": s["draft_forwards"],
        "drafts_per_round": dpr, "c": cost / dpr if dpr > 0 else 0.0,
        "cost_model_speedup": s["tokens_per_target_forward"] / (1.0 + cost),
        "batched_cost_model_speedup": ar.forwards / (s["target_forwards"] + (s["draft_forwards"] - prefill)
                                                     * (cost / dpr if dpr > 0 else 0.0)),
        "route_counts": s["route_counts"], "rounds": s["rounds"], "accepted": s["accepted"],
        "drafted": s["drafted"],
    }


def _ead_rows(draft, target, prompts: _Prompts, ar: _Baseline, ar_wall: float, args: SpecBenchArgs, *, n_new: int,
              sp, key) -> list[dict]:
    """EAD (lossy): accuracy against the share of large-model tokens per threshold of ``bench.args.ead_thresholds``,
    between the end points draft alone and target alone (AR)."""
    rows = []
    small_outs, small_wall, _ = timed_pass(_greedy_ar(draft, n_new, sp, key), prompts.batches, args.repeats)
    rows.append({"method": "draft alone", "threshold": "-", "large_share": 0.0,
                 "exact_match": prompts.accuracy(small_outs), "wall_s": small_wall,
                 "tokens_per_s": prompts.n_tokens(small_outs) / small_wall, "small_forwards": "-",
                 "large_forwards": "-"})
    for tau in args.ead_thresholds:
        eargs = dp.EADArgs(threshold=float(tau), **dict(args.ead_args))

        def call(p, v, eargs=eargs):
            return ead_generate(draft, target, p, v, max_new_tokens=n_new, args=eargs, sampling=GREEDY,
                                stop_tokens=sp.eos_ids, pad_id=sp.pad, rng=key)

        outs, wall, _ = timed_pass(call, prompts.batches, args.repeats)
        n_tok = prompts.n_tokens(outs)
        large = int(sum(np.asarray(o.from_large)[:b].sum() for o, (_, b) in zip(outs, prompts.meta)))
        rows.append({"method": "EAD", "threshold": float(tau), "large_share": large / max(n_tok, 1),
                     "exact_match": prompts.accuracy(outs), "wall_s": wall, "tokens_per_s": n_tok / wall,
                     "small_forwards": int(sum(int(o.small_forwards) for o in outs)),
                     "large_forwards": int(sum(int(o.large_forwards) for o in outs))})
    rows.append({"method": "target alone (AR)", "threshold": "-", "large_share": 1.0,
                 "exact_match": prompts.accuracy(ar.outs), "wall_s": ar_wall,
                 "tokens_per_s": prompts.n_tokens(ar.outs) / ar_wall, "small_forwards": "-", "large_forwards": "-"})
    return rows


def run_speculative_bench(cfg, run_dir: str | Path, args: SpecBenchArgs, *, target, draft, deer, tok) -> dict:
    """The bench on given models (``deer`` may be None when no method drafts with it) and tokenizer; writes
    ``results.json``, ``results.md`` and the plots into ``run_dir``; returns the results."""
    from jaxtok.data import make_task_from_config
    from jaxtok.tasks.tokenizer import SpecialTokens

    d = cfg.decode
    if d.temperature != 0.0:
        raise ConfigError(f"decode.temperature={d.temperature}: bench 'speculative' is greedy (exactness vs AR); "
                          f"set decode.temperature=0")
    methods = [dict(m) for m in args.methods]
    uses_deer = any("deer" in _drafter_names(m) for m in methods)
    if uses_deer and deer is None:
        raise ConfigError("bench.args.methods use drafter 'deer' but no DEER model was given")
    sp = SpecialTokens.of(tok)
    task = make_task_from_config(cfg.data)
    prompts = _Prompts(task, tok, *_prompt_batches(task, "eval", tok, cfg, args.num_examples or cfg.data.num_eval))
    n_new, bs = d.max_new_tokens, d.batch_size
    key = jax.random.key(cfg.train.seed)

    # AR baseline (timed again after the methods: the shared CPU drifts)
    ar_target = _greedy_ar(target, n_new, sp, key)
    ar_outs, ar_wall0, ar_compile = timed_pass(ar_target, prompts.batches, args.repeats)
    ar = _Baseline(ar_target, ar_outs, int(sum(int(o.num_forwards) for o in ar_outs)))

    # forward costs and c
    costs = forward_costs(target, draft, deer if uses_deer else None, bs, cfg.data.prompt_len + n_new + 10, 4,
                          args.cost_repeats)
    c = {"draft": costs["draft_step"] / costs["target_step"], "ngram": 0.0}
    if "deer_forward" in costs:
        c["deer"] = costs["deer_forward"] / costs["target_step"]

    heads, head_info = _policy_heads(cfg, run_dir, args, methods, task, tok, target, draft)
    drafters = {"draft": ModelDrafter.of(draft), "ngram": NgramDrafter(vocab_size=target.cfg.vocab_size, max_ngram=3)}
    if deer is not None:
        drafters["deer"] = DeerDrafter.of(deer)
    rows = [_method_row(m, drafters, heads, target, draft, prompts, ar, c, args, n_new=n_new, sp=sp, key=key)
            for m in methods]

    _, ar_wall1, _ = timed_pass(ar_target, prompts.batches, args.repeats)
    ar_wall = (ar_wall0 + ar_wall1) / 2
    rows = finish_rows(rows, c)
    ead_rows = _ead_rows(draft, target, prompts, ar, ar_wall, args, n_new=n_new, sp=sp, key=key)
    n_ar = prompts.n_tokens(ar_outs)
    results = {
        "bench": "speculative", "target": cfg.model.init_from, "draft": d.draft_init_from,
        "deer": args.deer if uses_deer else None, "device": jax.devices()[0].device_kind,
        "num_examples": prompts.rows, "batch_size": bs, "max_new_tokens": n_new,
        "forward_ms": costs, "c": c,
        "ar": {"wall_s": ar_wall, "wall_s_before": ar_wall0, "wall_s_after": ar_wall1, "compile_s": ar_compile,
               "tokens_per_s": n_ar / ar_wall, "generated_tokens": n_ar, "target_forwards": ar.forwards,
               "exact_match": prompts.accuracy(ar_outs)},
        "heads": head_info, "rows": rows, "ead": ead_rows, "verdict": verdict(rows),
    }
    write_results(run_dir, results, rows, title="speculative decoding vs AR", plots=speculative_plots(rows, ead_rows))
    (Path(run_dir) / "results.md").write_text(report_markdown(results))
    return results
