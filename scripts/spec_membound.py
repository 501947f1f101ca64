"""Speculative decoding against AR on a memory-bound target/draft pair (issue 20 items 3 and 4).

The pair is trained by two commands (configs committed, run directories under ``runs/membound``)::

    jaxtok train configs/bench/membound_target.yaml   # preset small: 25.2M parameters, 101 MB float32
    jaxtok train configs/bench/membound_draft.yaml    # 2 layers, hidden 256: 1.6M parameters, 6.3 MB

and this script times, on held-out prompts of the same task and at every batch size of ``--batch-sizes``:

- greedy AR (``generate``, tokens only) against speculative decoding with the trained draft at fixed
  γ ∈ ``--gammas``, the adaptive draft-length policies (heuristic, confidence, SpecDec++, SpecKV: per-row γ inside
  a batch) at ``--adaptive-batches``, and ``batch_gamma``: the batch-size-aware policy of
  ``decode/draft_policies.py`` (vLLM's dynamic speculative decoding) whose cost model is calibrated here on
  train-split prompts (forward timings, one fixed-γ calibration run per batch size); γ* = 0 runs plain AR;
- the same at temperature 1 (``--sampled-batches``) for AR, the best greedy fixed γ and ``batch_gamma``;
- losslessness: greedy rows must be token-identical to AR (``identical_to_ar``); at T = 1 a χ² homogeneity test of
  the joint law of generated tokens 2-4 (the first speculative round) between ``--chi2-rows`` AR rows and as many
  speculative rows, one prompt repeated (token 1 comes from the target's prefill in both loops).

Timing is interleaved: each repeat runs the methods in a rotated order with an AR pass before every second method,
and a method's speed ratio in that repeat is its tokens/s over the mean tokens/s of the two AR passes around it;
the median over repeats is reported (the 2-core machine is shared and its load drifts). SpecDec++ and SpecKV
heads are trained here on acceptance data logged from ``--head-batches`` × 64 train-split prompts
(``train/objectives/draft_heads.py``) unless ``--heads-from`` names saved heads.

    python scripts/spec_membound.py --json docs/results/spec_membound.json --md docs/results/spec_membound.md \\
        --png docs/results/spec_membound.png --peers docs/results/decode_peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def chi2_homogeneity(a: np.ndarray, b: np.ndarray, min_count: int = 10) -> tuple[float, int]:
    """χ² test that the rows of ``a [n, k]`` and ``b [m, k]`` (token tuples) come from one law: a 2 × C contingency
    table over the tuples seen, tuples with fewer than ``min_count`` occurrences in both samples together pooled
    into one cell. Returns ``(p-value, number of cells)``."""
    from scipy.stats import chi2_contingency

    keys = {}
    for row in map(tuple, np.concatenate([a, b])):
        keys[row] = keys.get(row, 0) + 1
    cells = sorted(k for k, v in keys.items() if v >= min_count)
    index = {k: i for i, k in enumerate(cells)}
    table = np.zeros((2, len(cells) + 1))
    for r, rows in enumerate((a, b)):
        for row in map(tuple, rows):
            table[r, index.get(row, len(cells))] += 1
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0, int(table.shape[1])
    return float(chi2_contingency(table)[1]), int(table.shape[1])


def bracket_ratios(method_tps: list[float], ar_before: list[float], ar_after: list[float]) -> list[float]:
    """Per repeat: the method's tokens/s over the mean tokens/s of the AR passes just before and after it."""
    return [m / (0.5 * (x + y)) for m, x, y in zip(method_tps, ar_before, ar_after)]


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/bench/membound_target.yaml", help="the target's training config")
    ap.add_argument("--target", default="runs/membound/target")
    ap.add_argument("--draft", default="runs/membound/draft")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--gammas", default="2,4,6,8", help="fixed draft lengths timed (and batch_gamma's candidates)")
    ap.add_argument("--gammas-by-batch", default="", help="fewer fixed γ at some batch sizes, e.g. '16:2/4,64:2/4' "
                    "(each program compiles for ~1 min on the shared CPU)")
    ap.add_argument("--adaptive-batches", default="1,16", help="batch sizes for the adaptive policies")
    ap.add_argument("--sampled-batches", default="1,64", help="batch sizes timed at temperature 1")
    ap.add_argument("--prompts", default="1:16,4:32,16:64,64:128", help="held-out prompts per batch size")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-batches", type=int, default=8, help="64-prompt train batches logged for the heads")
    ap.add_argument("--head-steps", type=int, default=400)
    ap.add_argument("--heads-from", default=None, help="load saved heads (<dir>/specdecpp, <dir>/speckv)")
    ap.add_argument("--heads-out", default="runs/membound/heads", help="where trained heads are saved")
    ap.add_argument("--extra-drafts", default="", help="more drafters timed at fixed γ beside --draft in the same "
                    "interleaved repeats, e.g. '1-layer=runs/membound2/draft1' (label=run directory, comma-separated)")
    ap.add_argument("--extra-gammas", default="4,6,8", help="fixed γ of the --extra-drafts")
    ap.add_argument("--extra-batches", default="1", help="batch sizes at which the --extra-drafts are timed")
    ap.add_argument("--chi2-rows", type=int, default=1024)
    ap.add_argument("--chi2-new-tokens", type=int, default=4, help="the χ² test compares generated tokens 2..this "
                    "(the whole response when >= --max-new-tokens)")
    ap.add_argument("--chi2-only", action="store_true", help="rerun only the χ² test and update --json (then render)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--peers", default=None, help="decode_peers.json to add spec_vs_ar_b1 / spec_vs_ar_b64 to")
    ap.add_argument("--render-from", default=None, help="only rewrite --md/--png/--peers from a results JSON")
    args = ap.parse_args(argv)
    if args.render_from:
        res = json.loads(Path(args.render_from).read_text())
        if args.md:
            Path(args.md).write_text(markdown(res))
        if args.png:
            plot(res, args.png, res["command"])
        if args.peers:
            add_peer_keys(res, args.peers)
        return 0
    command = "python scripts/spec_membound.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    os.chdir(ROOT)

    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.decode import draft_policies as dp
    from jaxtok.models.heads import load_head, save_head
    from jaxtok.decode.generate import generate
    from jaxtok.decode.evaluate import add_stats, speculative_stats, summarize
    from jaxtok.bench.speculative import _prompt_batches, forward_costs, rows_identical, train_head
    from jaxtok.decode.speculative import ModelDrafter, speculative_generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.tokenizer import SpecialTokens, decode, load_tokenizer_for

    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    gammas = [int(x) for x in args.gammas.split(",")]
    gammas_at = {int(k): [int(g) for g in v.split("/")] for k, v in
                 (kv.split(":") for kv in args.gammas_by_batch.split(",") if kv)}
    adaptive_b = {int(x) for x in args.adaptive_batches.split(",") if x}
    sampled_b = {int(x) for x in args.sampled_batches.split(",") if x}
    n_prompts = {int(k): int(v) for k, v in (kv.split(":") for kv in args.prompts.split(","))}
    n_new = args.max_new_tokens
    extra = dict(kv.split("=", 1) for kv in args.extra_drafts.split(",") if kv)
    extra_gammas = [int(x) for x in args.extra_gammas.split(",") if x]
    extra_b = {int(x) for x in args.extra_batches.split(",") if x}
    t_start = time.time()
    load_before = os.getloadavg()

    target, _ = load_any(args.target, key="--target")
    draft, _ = load_any(args.draft, key="--draft")
    extra_models = {lab: load_any(path, key=f"--extra-drafts {lab}")[0] for lab, path in extra.items()}
    cfg0 = load_config(args.config, [f"model.init_from={args.target}"])
    tok = load_tokenizer_for(cfg0)
    sp = SpecialTokens.of(tok)
    stop = sp.eos_ids
    task = make_task_from_config(cfg0.data)
    key = jax.random.key(0)
    n_params = lambda m: int(sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(m))))
    info = {"target_params": n_params(target), "draft_params": n_params(draft)}
    info["target_mb"] = info["target_params"] * 4 / 1e6
    info["draft_mb"] = info["draft_params"] * 4 / 1e6
    info["extra_drafts"] = {lab: {"path": extra[lab], "params": n_params(m), "mb": n_params(m) * 4 / 1e6}
                            for lab, m in extra_models.items()}
    print(f"target {info['target_params']/1e6:.1f}M params ({info['target_mb']:.0f} MB), draft "
          f"{info['draft_params']/1e6:.2f}M ({info['draft_mb']:.1f} MB)", flush=True)

    def cfg_b(b):
        return load_config(args.config, [f"model.init_from={args.target}", f"decode.batch_size={b}"])

    def ar_fn(temp):
        return lambda p, v: generate(target, p, v, max_new_tokens=n_new, sampling=SamplingParams(temperature=temp),
                                     stop_tokens=stop, pad_id=sp.pad, rng=key, return_logprobs=False)

    def spec_fn(g, policy, temp, draft_model=None):
        drafter = ModelDrafter.of(draft if draft_model is None else draft_model)
        return lambda p, v: speculative_generate(target, drafter, p, v, max_new_tokens=n_new, draft_len=g,
                                                 policy=policy, sampling=SamplingParams(temperature=temp),
                                                 stop_tokens=stop, pad_id=sp.pad, rng=key)

    def run_all(fn, batches):
        return [jax.block_until_ready(fn(p, v)) for p, v in batches]

    def n_tokens(outs, meta):
        return int(sum(np.asarray(o.valid)[:b].sum() for o, (_, b) in zip(outs, meta)))

    if args.chi2_only:
        res = json.loads(Path(args.json).read_text())
        rows, batch_sizes = res["rows"], [int(b) for b in res["calibration"]]
    # --- heads (SpecDec++, SpecKV) from logged acceptance data on train-split prompts
    heads, head_info = {}, {}
    for kind in (() if args.chi2_only or not adaptive_b else ("specdecpp", "speckv")):
        saved = Path(args.heads_from) / kind if args.heads_from else None
        if saved is not None and (saved / "head.json").is_file():
            heads[kind], head_info[kind] = load_head(saved), {"loaded_from": str(saved)}
            continue
        t0 = time.time()
        hb = _prompt_batches(task, "train", tok, cfg_b(64), args.head_batches * 64)[0]
        heads[kind], head_info[kind] = train_head(kind, target, draft, hb, max_new_tokens=n_new,
                                                  steps=args.head_steps, seed=0, stop_tokens=stop)
        head_info[kind]["seconds"] = time.time() - t0
        ctor = {"hidden_size": draft.cfg.hidden_size, "depth": 3} if kind == "specdecpp" else {"hidden": 16}
        save_head(heads[kind], Path(args.heads_out) / kind, kind, **ctor)
        print(f"head {kind}: {head_info[kind]}", flush=True)

    if args.chi2_only:
        batch_sizes_run = []
    else:
        batch_sizes_run = batch_sizes
    adaptive = {} if args.chi2_only or not adaptive_b else {
        "heuristic": dp.build_policy("heuristic", {"initial": 4, "increase": 2, "decrease": 1, "minimum": 1}),
        "confidence 0.4": dp.build_policy("confidence", {"threshold": 0.4}),
        "SpecDec++ h=0.3": dp.build_policy("specdecpp", {"threshold": 0.3, "min_len": 2, "max_len": 20},
                                           head=heads["specdecpp"]),
        "SpecKV": dp.build_policy("speckv", {"candidates": [g for g in (2, 4, 6, 8) if g <= max(gammas)],
                                             "initial": min(4, max(gammas))}, head=heads["speckv"]),
    }
    fixed = dp.build_policy("fixed")
    gmax = max(gammas)

    # --- per batch size: calibration of batch_gamma's cost model on train prompts, then the timed methods
    results_b, calib = {}, {}
    for b in batch_sizes_run:
        cfg = cfg_b(b)
        batches, meta = _prompt_batches(task, "eval", tok, cfg, n_prompts.get(b, 4 * b))
        cal_batches = _prompt_batches(task, "train", tok, cfg, b * max(1, 8 // b))[0]
        ar = ar_fn(0.0)
        ar_outs = run_all(ar, batches)  # compile + reference outputs
        # calibration on train prompts, in the loop: AR steps and fixed γ ∈ {2, 4} rounds, interleaved (best of 3);
        # a round's time is modelled as linear in γ through the two measured points. Isolated forward timings are
        # reported beside it (c = draft step / target step) but not used: under load they are too noisy.
        costs = forward_costs(target, draft, None, b, cfg.data.prompt_len + n_new + 2 * gmax + 4, gmax, 5)
        cal = {g: spec_fn(g, fixed, 0.0) for g in (2, 4)}
        for fn in cal.values():
            jax.block_until_ready(fn(*cal_batches[0]))
        t_ar, t_sp = [], {2: [], 4: []}
        for _ in range(3):
            t0 = time.perf_counter(); o_ar = run_all(ar, cal_batches); t_ar.append(time.perf_counter() - t0)
            o_sp = {}
            for g, fn in cal.items():
                t0 = time.perf_counter(); o_sp[g] = run_all(fn, cal_batches); t_sp[g].append(time.perf_counter() - t0)
        ar_step = min(t_ar) / sum(int(o.num_forwards) for o in o_ar)
        round_t = {g: min(t_sp[g]) / max(sum(int(o.target_forwards) - 1 for o in o_sp[g]), 1) for g in (2, 4)}
        mean_acc = float(np.sum([np.asarray(o.accepted) for o in o_sp[4]])
                         / max(np.sum([np.asarray(o.rounds) for o in o_sp[4]]), 1))
        slope = max((round_t[4] - round_t[2]) / 2 / ar_step, 0.0)  # per drafted position, in AR steps
        intercept = round_t[4] / ar_step - 4 * slope
        # α for the cost model from AR loop steps per speculative loop round on the same prompts (the time unit is an
        # AR loop step and a round, so the modelled speedup is steps/rounds over the round cost), not a row's mean
        # accepted length: both loops run until their slowest row is done and a row's last round is cut at
        # max_new_tokens, so a batch's rounds replace fewer AR steps than its rows' acceptance says (batch 64 of
        # docs/results/spec_membound_x4_ft.md: the row-level α 0.94 modelled γ = 6 at 1.40x AR; it ran at 0.95x)
        steps_per_round = sum(int(o.num_forwards) for o in o_ar) / max(
            sum(int(o.target_forwards) - 1 for o in o_sp[4]), 1)
        alpha_row = dp.alpha_from_accepted(mean_acc, 4)
        alpha = alpha_for(steps_per_round, 4)
        calib[b] = {"forward_ms": costs, "c_isolated": costs["draft_step"] / costs["target_step"],
                    "ar_step_ms": ar_step * 1e3, "round_ms": {str(g): v * 1e3 for g, v in round_t.items()},
                    "mean_accepted_gamma4": mean_acc, "alpha_row": alpha_row,
                    "ar_steps_per_round_gamma4": steps_per_round, "alpha": alpha,
                    "slope": slope,
                    "overhead": max(intercept - 1.0, -0.99)}
        print(f"[b={b}] calibration {calib[b]}", flush=True)
        hits = [task.reward(decode(tok, np.asarray(o.tokens)[r]),
                            task.example("eval", int(idx[r]))) >= 1.0
                for o, (idx, bb) in zip(ar_outs, meta) for r in range(bb)]
        calib[b]["target_exact_match_eval"] = float(np.mean(hits))
        results_b[b] = {"batches": batches, "meta": meta, "ar_outs": ar_outs}

    if not args.chi2_only:
      bg_args = dp.BatchGammaArgs(
        batch_sizes=tuple(batch_sizes), acceptance=tuple(calib[b]["alpha"] for b in batch_sizes),
        draft_cost=tuple(calib[b]["slope"] for b in batch_sizes), verify_cost=tuple(0.0 for b in batch_sizes),
        round_overhead=tuple(calib[b]["overhead"] for b in batch_sizes), candidates=tuple([0] + gammas))
      bg_policy = dp.build_policy("batch_gamma", bg_args)
      for b in batch_sizes:
        calib[b]["batch_gamma_choice"], scores = dp.batch_gamma_choice(bg_args, b)
        calib[b]["modelled_speedup"] = {str(g): v for g, v in scores.items()}

    rows = rows if args.chi2_only else []
    for temp in (() if args.chi2_only else (0.0, 1.0)):
        for b in batch_sizes:
            if temp > 0 and b not in sampled_b:
                continue
            R = results_b[b]
            batches, meta = R["batches"], R["meta"]
            ar = ar_fn(temp)
            methods = []  # (label, policy name, gamma, callable)
            g_star = bg_policy.gamma_for(b)
            if temp == 0.0:
                for g in gammas_at.get(b, gammas):
                    methods.append((f"fixed γ={g}", "fixed", g, spec_fn(g, fixed, temp)))
                if b in adaptive_b:
                    for label, pol in adaptive.items():
                        methods.append((label, label.split()[0].lower(), gmax, spec_fn(gmax, pol, temp)))
                if b in extra_b:
                    for lab, m in extra_models.items():
                        for g in extra_gammas:
                            methods.append((f"{lab} γ={g}", "fixed", g, spec_fn(g, fixed, temp, m)))
            else:
                best = max((r for r in rows if r["temperature"] == 0.0 and r["batch"] == b
                            and r["policy"] == "fixed" and r.get("draft", args.draft) == args.draft),
                           key=lambda r: r["speed_ratio"])
                methods.append((best["method"], "fixed", best["gamma_max"], spec_fn(best["gamma_max"], fixed, temp)))
            methods.append((f"batch_gamma (γ*={g_star})", "batch_gamma", g_star,
                            ar if g_star == 0 else spec_fn(g_star, bg_policy, temp)))
            # compile everything first
            ar_ref = run_all(ar, batches)
            outs_of = {}
            for label, _, _, fn in methods:
                t0 = time.perf_counter()
                outs_of[label] = run_all(fn, batches[:1])
                print(f"[T={temp} b={b}] compiled {label} in {time.perf_counter() - t0:.1f}s", flush=True)
            tps = {m[0]: [] for m in methods}
            ar_tps_before, ar_tps_after = {m[0]: [] for m in methods}, {m[0]: [] for m in methods}
            for r in range(args.repeats):
                order = methods[r % len(methods):] + methods[:r % len(methods)]
                last_ar = None
                pending = []
                for i, (label, _, _, fn) in enumerate(order):
                    if i % 2 == 0:
                        t0 = time.perf_counter(); o = run_all(ar, batches); dt = time.perf_counter() - t0
                        ar_now = n_tokens(o, meta) / dt
                        for p_label in pending:
                            ar_tps_after[p_label].append(ar_now)
                        pending, last_ar = [], ar_now
                    t0 = time.perf_counter(); o = run_all(fn, batches); dt = time.perf_counter() - t0
                    tps[label].append(n_tokens(o, meta) / dt)
                    ar_tps_before[label].append(last_ar)
                    pending.append(label)
                    outs_of[label] = o
                t0 = time.perf_counter(); o = run_all(ar, batches); dt = time.perf_counter() - t0
                for p_label in pending:
                    ar_tps_after[p_label].append(n_tokens(o, meta) / dt)
            for label, pol, g, _ in methods:
                outs = outs_of[label]
                ratios = bracket_ratios(tps[label], ar_tps_before[label], ar_tps_after[label])
                lab0 = label.split(" γ=")[0]
                row = {"temperature": temp, "batch": b, "method": label, "policy": pol, "gamma_max": g,
                       "draft": extra[lab0] if lab0 in extra else args.draft,
                       "speed_ratio": float(np.median(ratios)), "per_repeat": [float(x) for x in ratios],
                       "tokens_per_s": float(np.median(tps[label])),
                       "ar_tokens_per_s": float(np.median(ar_tps_before[label] + ar_tps_after[label])),
                       "load_1min": os.getloadavg()[0]}
                if temp == 0.0:
                    same = np.concatenate([rows_identical(o.tokens, o.valid, a.tokens, a.valid)[:bb]
                                           for o, a, (_, bb) in zip(outs, R["ar_outs"], meta)])
                    row["identical_to_ar"] = float(np.mean(same))
                if hasattr(outs[0], "rounds"):
                    stats = {}
                    for o, (_, bb) in zip(outs, meta):
                        add_stats(stats, speculative_stats(o), bb)
                    s = summarize(stats, n_tokens(outs, meta), sum(bb for _, bb in meta))
                    drafted_rows = s["drafted"] / max(s["rounds"], 1)
                    row |= {"tokens_per_target_forward": s["tokens_per_target_forward"],
                            "mean_accepted_length": s["mean_accepted_length"],
                            "acceptance_rate": s["acceptance_rate"],
                            "acceptance_rate_by_position": s["acceptance_rate_by_position"],
                            "drafts_per_row_round": drafted_rows,
                            "batched_target_forwards": s["target_forwards"],
                            "batched_draft_forwards": s["draft_forwards"]}
                rows.append(row)
                if args.json:  # partial results after every method (a later crash keeps them)
                    Path(args.json + ".partial").write_text(json.dumps({"rows": rows, "calibration": calib,
                                                                        "heads": head_info}, default=float))
                print(f"[T={temp} b={b}] {label}: ratio {row['speed_ratio']:.2f} per repeat "
                      f"{[round(x, 2) for x in ratios]} tok/fwd {row.get('tokens_per_target_forward', 1):.2f} "
                      f"identical {row.get('identical_to_ar', '-')}", flush=True)

    # --- χ² at T = 1: AR vs speculative (best fixed γ at batch 1), one held-out prompt repeated
    chi2 = {}
    if args.chi2_rows:
      try:
        batches1, meta1 = _prompt_batches(task, "eval", tok, cfg_b(1), 1)
        ex = task.example("eval", int(meta1[0][0][0]))
        p1, v1 = batches1[0]
        p = np.repeat(np.asarray(p1), args.chi2_rows, 0)
        v = np.repeat(np.asarray(v1), args.chi2_rows, 0)
        best1 = max((r for r in rows if r["temperature"] == 0.0 and r["batch"] == batch_sizes[0]
                     and r["policy"] == "fixed" and r.get("draft", args.draft) == args.draft),
                    key=lambda r: r["speed_ratio"])
        g = best1["gamma_max"]
        m = min(args.chi2_new_tokens, n_new)
        a = generate(target, p, v, max_new_tokens=m, sampling=SamplingParams(temperature=1.0), stop_tokens=stop,
                     pad_id=sp.pad, rng=jax.random.key(11), return_logprobs=False)
        s_ = speculative_generate(target, ModelDrafter.of(draft), p, v, max_new_tokens=m, draft_len=g, policy=fixed,
                                  sampling=SamplingParams(temperature=1.0), stop_tokens=stop, pad_id=sp.pad,
                                  rng=jax.random.key(12))
        vocab = target.cfg.vocab_size
        ta = np.where(np.asarray(a.valid), np.asarray(a.tokens), vocab)[:, 1:m]
        ts = np.where(np.asarray(s_.valid), np.asarray(s_.tokens), vocab)[:, 1:m]
        pval, cells = chi2_homogeneity(ta, ts)
        chi2 = {"prompt": ex.prompt, "rows_each": args.chi2_rows, "gamma": g,
                "tokens": f"2-{m} (joint; the whole response)" if m == n_new else f"2-{m} (joint)",
                "p_value": pval, "cells": cells, "distinct_ar_tuples": len({tuple(x) for x in ta}),
                "distinct_spec_tuples": len({tuple(x) for x in ts}), "command": command}
        print(f"chi2: {chi2}", flush=True)
      except Exception as e:  # keep the timing results
        chi2 = {"error": repr(e)}
        print(f"chi2 failed: {e!r}", flush=True)

    if args.chi2_only:
        res["chi2_t1"] = chi2
        Path(args.json).write_text(json.dumps(res, indent=2, default=float) + "\n")
        if args.md:
            Path(args.md).write_text(markdown(res))
        return 0
    results = {
        "command": command, "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "wall_minutes": (time.time() - t_start) / 60, "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)",
        "jax": jax.__version__, "target": args.target, "draft": args.draft, "config": args.config, **info,
        "json": args.json, "load_before": load_before, "load_after": os.getloadavg(),
        "max_new_tokens": n_new, "repeats": args.repeats, "prompts": {str(k): v for k, v in n_prompts.items()},
        "heads": head_info, "calibration": {str(b): v for b, v in calib.items()},
        "batch_gamma_args": {k: list(v) for k, v in dataclasses_asdict(bg_args).items()},
        "rows": rows, "chi2_t1": chi2,
    }
    text = json.dumps(results, indent=2, default=float)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.md:
        Path(args.md).write_text(markdown(results))
    if args.png:
        plot(results, args.png, command)
    if args.peers:
        add_peer_keys(results, args.peers)
    print(markdown(results))
    return 0


def dataclasses_asdict(x) -> dict:
    import dataclasses

    return dataclasses.asdict(x)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def _best(rows, temp, b, pred=lambda r: True):
    cand = [r for r in rows if r["temperature"] == temp and r["batch"] == b and pred(r)]
    return max(cand, key=lambda r: r["speed_ratio"]) if cand else None


def add_peer_keys(res: dict, path: str) -> None:
    """``spec_vs_ar_b1`` (the best greedy fixed γ at batch 1) and ``spec_vs_ar_b64`` (batch_gamma at batch 64) into
    ``decode_peers.json``; an earlier ``spec_vs_ar_b1`` measured with draft = target copy moves to
    ``spec_copy_vs_ar_b1``; every other key is kept."""
    peers = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    old = peers.get("spec_vs_ar_b1")
    if old is not None and "copy" in str(old.get("draft", "")) and "spec_copy_vs_ar_b1" not in peers:
        peers["spec_copy_vs_ar_b1"] = old
    drafts = {res["draft"]: (res["draft_params"], res["draft_mb"])}
    drafts |= {v["path"]: (v["params"], v["mb"]) for v in res.get("extra_drafts", {}).values()}
    settings = {"target": f"{res['target']} ({res['target_params']/1e6:.1f}M params, {res['target_mb']:.0f} MB f32)",
                "task": f"held-out 2-digit 2-step arithmetic prompts ({res.get('config', 'configs/bench/membound_target.yaml')})",
                "max_new_tokens": res["max_new_tokens"], "greedy": True, "repeats": res["repeats"],
                "timing": "tokens/s over the mean of the AR passes just before and after, median over repeats",
                "details": res.get("json") or "docs/results/spec_membound.json"}
    for b, key, pred, what in ((1, "spec_vs_ar_b1", lambda r: r["policy"] == "fixed", "best fixed γ"),
                               (64, "spec_vs_ar_b64", lambda r: r["policy"] == "batch_gamma", "batch_gamma policy")):
        r = _best(res["rows"], 0.0, b, pred)
        if r is None:
            continue
        peers[key] = {"ratio": r["speed_ratio"], "per_repeat": r["per_repeat"], "batch": b, "method": r["method"],
                      "choice": what, "draft_len": r["gamma_max"],
                      "token_identical_to_ar": r.get("identical_to_ar") == 1.0,
                      "spec_tokens_per_s": r["tokens_per_s"], "ar_tokens_per_s": r["ar_tokens_per_s"],
                      "tokens_per_target_forward": r.get("tokens_per_target_forward", 1.0),
                      "settings": settings | {"draft": "{} ({:.2f}M params, {:.1f} MB f32)".format(
                          r.get("draft", res["draft"]), drafts[r.get("draft", res["draft"])][0] / 1e6,
                          drafts[r.get("draft", res["draft"])][1])},
                      "command": res["command"], "measured_utc": res["measured_utc"]}
    Path(path).write_text(json.dumps(peers, indent=2) + "\n")


def alpha_for(tokens_per_round: float, gamma: int) -> float:
    """The per-token acceptance α whose expected tokens per round σ(α, γ) = (1 − α^(γ+1)) / (1 − α) (Leviathan et
    al. 2023, eq. 1) equal ``tokens_per_round`` (``decode/spec_cost.alpha_from_accepted`` of ``tokens − 1``)."""
    from jaxtok.decode.spec_cost import alpha_from_accepted

    return alpha_from_accepted(tokens_per_round - 1.0, gamma)


def markdown(res: dict) -> str:
    lines = [f"Measured {res['measured_utc']} UTC on {res['machine']} ({res['wall_minutes']:.0f} min) with "
             f"`{res['command']}`.", "",
             f"Target `{res['target']}`: {res['target_params']/1e6:.1f}M parameters ({res['target_mb']:.0f} MB "
             f"float32); draft `{res['draft']}`: {res['draft_params']/1e6:.2f}M ({res['draft_mb']:.1f} MB). "
             f"Up to {res['max_new_tokens']} new tokens, {res['repeats']} interleaved repeats; prompts per batch "
             f"size {res['prompts']}." + (f" Load average (1 min) at start / end: {res['load_before'][0]:.1f} / "
                                          f"{res['load_after'][0]:.1f}." if res.get("load_before") else ""), "",
             "`ratio` = median over repeats of (method tokens/s ÷ mean tokens/s of the AR passes just before and "
             "after it); `tok/fwd` = tokens per target forward (per row, prefill counted); `acc` = accepted / "
             "drafted; `drafts/round` = drafted tokens per row and round.", ""]
    for temp in sorted({r["temperature"] for r in res["rows"]}):
        lines += [f"### {'greedy' if temp == 0 else f'temperature {temp:g}'}", "",
                  "| batch | method | γmax | ratio | per repeat | tokens/s | AR tokens/s | tok/fwd | acc | "
                  "drafts/round | identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["temperature"] != temp:
                continue
            lines.append(
                f"| {r['batch']} | {r['method']} | {r['gamma_max']} | **{r['speed_ratio']:.2f}** | "
                f"{', '.join(f'{x:.2f}' for x in r['per_repeat'])} | {r['tokens_per_s']:.0f} | "
                f"{r['ar_tokens_per_s']:.0f} | {r.get('tokens_per_target_forward', 1.0):.2f} | "
                f"{r.get('acceptance_rate', float('nan')):.2f} | {r.get('drafts_per_row_round', 0):.2f} | "
                f"{r.get('identical_to_ar', '-') if temp == 0 else '-'} |")
        lines.append("")
    need = [r for r in res["rows"] if r["temperature"] == 0.0 and r["policy"] == "fixed" and r["batch"] == 1]
    if need:
        lines += ["### What 2× would need (batch 1, greedy, fixed γ)", "",
                  "`round cost` = tok/fwd ÷ ratio: the time of one target forward of the loop (a round, or the prefill) "
                  "in AR steps, as measured; `tok/fwd for 2×` = 2 × that; `α for 2×` = the per-token acceptance that "
                  "gives it, from tok/fwd = (1 − α^(γ+1)) / (1 − α) (ignores the prefill and rows that stop mid-round); "
                  "`α now` = the same formula solved for the measured tok/fwd.", "",
                  "| draft | γ | ratio | tok/fwd | round cost (AR steps) | tok/fwd for 2× | α now | α for 2× |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in need:
            g, tpf = r["gamma_max"], r.get("tokens_per_target_forward", 1.0)
            cost = tpf / r["speed_ratio"]
            lines.append(f"| {r.get('draft', res['draft'])} | {g} | {r['speed_ratio']:.2f} | {tpf:.2f} | {cost:.2f} | "
                         f"{2 * cost:.2f} | {alpha_for(tpf, g):.3f} | "
                         + (f"{alpha_for(2 * cost, g):.3f}" if 2 * cost < g + 1 else f"impossible (> γ + 1 = {g + 1})")
                         + " |")
        lines.append("")
    lines += ["### batch_gamma calibration (train-split prompts)", "",
              "Round time in the loop, modelled as `AR step × (1 + overhead + slope·γ)` through the measured γ = 2 "
              "and γ = 4 rounds; α solved from the AR loop steps per γ = 4 loop round on the same prompts (both "
              "loops wait for their slowest row; `α (row)`: from the rows' mean accepted length, what older runs "
              "used); modelled speedup = "
              "`(1 − α^(γ+1)) / (1 − α) / (1 + overhead + slope·γ)`.", "",
              "| batch | AR step ms | γ=2 round ms | γ=4 round ms | slope | overhead | target fwd ms (isolated) | "
              "draft fwd ms | c (isolated) | mean accepted (γ=4) | α (row) | α | γ* | modelled speedup by γ |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, cb in res["calibration"].items():
        f = cb["forward_ms"]
        lines.append(f"| {b} | {cb['ar_step_ms']:.2f} | {cb['round_ms']['2']:.2f} | {cb['round_ms']['4']:.2f} | "
                     f"{cb['slope']:.3f} | {cb['overhead']:.2f} | {f['target_step']:.2f} | {f['draft_step']:.2f} | "
                     f"{cb['c_isolated']:.3f} | {cb['mean_accepted_gamma4']:.2f} | "
                     + (f"{cb['alpha_row']:.3f}" if "alpha_row" in cb else "-") + f" | {cb['alpha']:.3f} | "
                     f"{cb['batch_gamma_choice']} | "
                     + ", ".join(f"{g}: {v:.2f}" for g, v in cb["modelled_speedup"].items()) + " |")
    lines.append("")
    if res.get("chi2_t1"):
        c = res["chi2_t1"]
        lines += [f"χ² homogeneity at T = 1 (AR vs speculative γ={c['gamma']}, {c['rows_each']} rows each, prompt "
                  f"`{c['prompt']}`, joint of generated tokens {c['tokens']}, {c['cells']} cells): "
                  f"p = {c['p_value']:.3g}; distinct tuples: AR {c.get('distinct_ar_tuples')}, speculative "
                  f"{c.get('distinct_spec_tuples', '-')}" + (f"; `{c['command']}`" if c.get("command") else "") + ".",
                  ""]
    h = res.get("heads", {})
    if h:
        lines += ["Heads: " + "; ".join(f"{k}: {v}" for k, v in h.items()), ""]
    return "\n".join(lines)


def plot(res: dict, path: str, command: str) -> None:
    from jaxtok.metrics import save_plot

    rows = [r for r in res["rows"] if r["temperature"] == 0.0]
    batches = sorted({r["batch"] for r in rows})

    def draw(ax):
        labels = sorted({r["method"] for r in rows if r["policy"] == "fixed"}, key=lambda s: int(s.split("=")[1]))
        for lab in labels:
            pts = [(r["batch"], r["speed_ratio"]) for r in rows if r["method"] == lab]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        pts = [(r["batch"], r["speed_ratio"]) for r in rows if r["policy"] == "batch_gamma"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", color="k", lw=2, label="batch_gamma")
        for r in rows:
            if r["policy"] not in ("fixed", "batch_gamma"):
                ax.scatter([r["batch"]], [r["speed_ratio"]], marker="x")
                ax.annotate(r["method"], (r["batch"], r["speed_ratio"]), fontsize=6)
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.axhline(2.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s ÷ AR tokens/s (greedy)")
        ax.legend(fontsize=7)

    save_plot(path, draw, command=command)


if __name__ == "__main__":
    sys.exit(main())
