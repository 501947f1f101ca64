"""Measurements behind docs/results/trace_shred_testbed.md (issue 14 item 6) that the training runs do not log.

- ``annotate``: TRACE's inputs on the testbed student: one rollout batch of configs/testbed/trace.yaml (the loop's
  own ``collect`` with the objective's ``prepare`` hook, the rule-based annotator), a few annotated rows printed,
  the diagnostic-label histogram, span coverage, and how the privileged self-teacher (the same parameters reading
  ``privileged_template``) differs from the student on the same completion tokens: mean log-prob gap of the
  sampled token and unclipped forward / reverse KL, on key spans, error spans and all completion tokens, for the
  true labels, for the labels shuffled across rows (does the teacher read the label or only the prefix?) and for
  the reference template ``reference:{target}``; and the roles (restated operands, step result, answer) of the
  span tokens left after the coverage cap.
- ``shred-eval``: the SHRED forget / retain metrics of one model (configs/testbed/shred.yaml): greedy exact match
  and mean reference-token log-likelihood (teacher-forced target + EOS) on the forget instances (train split,
  subtraction, indices < num_train), held-out subtraction, held-out addition and the testbed's mixed held-out set.
- ``shred-positions``: which answer tokens (restated operands, step result, ``>``, answer, EOS) SHRED's stage 1
  selects as forget positions on the forget set.
- ``report``: the table, json and plot of docs/results/trace_shred_testbed from the run directories and the
  two json files above.

    python scripts/trace_shred_testbed.py annotate OUT.json
    python scripts/trace_shred_testbed.py shred-eval RUN_DIR[@STEP] OUT.json
    python scripts/trace_shred_testbed.py shred-positions OUT.json [P]
    python scripts/trace_shred_testbed.py report
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

TRACE_CFG, SHRED_CFG = "configs/testbed/trace.yaml", "configs/testbed/shred.yaml"
STUDENT = "runs/testbed/student"
OUT = Path("docs/results/trace_shred_testbed")


def _model(path: str):
    """``(model, tokenizer)`` of a run directory, ``DIR@STEP`` for one checkpoint step."""
    from jaxtok.models.hf import load_any
    from jaxtok.tasks import load_tokenizer

    run, _, step = path.partition("@")
    model, _ = load_any(run, key="model", step=int(step) if step else None)
    return model, load_tokenizer(Path(run) / "tokenizer.json")


def _span_stats(model, batch: dict, spans: np.ndarray, args) -> dict:
    """Teacher (``model`` reading ``batch['teacher_*']``) minus student (``model`` on its own prompt): mean
    log-prob gap of the sampled token and unclipped forward / reverse KL per token, on key spans, error spans and
    every completion token."""
    from jaxtok.train.objectives import distill
    from jaxtok.train.rollout import score_rollout

    mask = np.asarray(batch["loss_mask"], bool)
    B, T = mask.shape
    P2 = batch["teacher_tokens"].shape[1] - T
    t_mask = np.concatenate([np.zeros((B, P2), bool), mask], axis=1)
    temp = np.ones(B, np.float32)
    lp_s = score_rollout(model, batch, temp)["old_logprobs"]
    lp_t = score_rollout(model, {"tokens": batch["teacher_tokens"], "positions": batch["teacher_positions"],
                                 "valid": batch["teacher_valid"], "loss_mask": t_mask}, temp)["old_logprobs"][:, P2:]
    kl = distill._span_kl(model, model, {k: jnp.asarray(v) for k, v in batch.items()},
                          dataclasses.replace(args, token_clip=None))
    fkl, rkl = np.asarray(kl["fkl"]), np.asarray(kl["rkl"])
    out = {}
    for name, sel in (("key", mask & (spans == distill.SPAN_KEY)), ("error", mask & (spans == distill.SPAN_ERROR)),
                      ("all", mask)):
        n = int(sel.sum())
        out[name] = {"tokens": n, "logp_gap": float((lp_t - lp_s)[sel].mean()) if n else None,
                     "logp_student": float(lp_s[sel].mean()) if n else None,
                     "forward_kl": float(fkl[sel].mean()) if n else None,
                     "reverse_kl": float(rkl[sel].mean()) if n else None}
    return out


def _capped_span_roles(batch: dict, texts: list, args) -> dict:
    """``{"key|error/role": tokens}`` of the span tokens the loss keeps after the coverage cap
    (:func:`jaxtok.select.cap_spans`), by role in the completion (:func:`_char_roles`; ``answer`` includes EOS;
    ``other``: a completion without ``=``/``>``).
    The synthetic tokenizer has one character per token."""
    from jaxtok.select import cap_spans
    from jaxtok.train.objectives import distill

    spans, mask = np.asarray(batch["spans"]), np.asarray(batch["loss_mask"], bool)
    capped = np.asarray(cap_spans(jnp.asarray(spans != 0), jnp.asarray(mask), args.coverage_cap)) > 0
    out = {}
    for r, text in enumerate(texts):
        roles = _char_roles(text) if "=" in text and ">" in text else ["other"] * len(text)
        for j, c in enumerate(np.nonzero(mask[r])[0]):
            if capped[r, c]:
                kind = "key" if spans[r, c] == distill.SPAN_KEY else "error"
                name = f"{kind}/{roles[j] if j < len(roles) else 'answer'}"
                out[name] = out.get(name, 0) + 1
    return out


def annotate(out_path: str, prompts: int = 128, seed: int = 0) -> dict:
    """TRACE's annotator and privileged-teacher checks on one rollout batch of the testbed student (module doc)."""
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.train.objectives import distill
    from jaxtok.train.rollout import collect

    cfg = load_config(TRACE_CFG)
    args = distill.TraceArgs(**dict(cfg.objective.args))
    model, tok = _model(STUDENT)
    task = make_task_from_config(cfg.data)
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=prompts,
                           num_examples=prompts)
    b = next(iter(ds))
    prompts_ = {"prompt": np.asarray(b["prompt"]), "prompt_valid": np.asarray(b["prompt_valid"]),
                "index": np.asarray(b["index"])}
    ro = collect(model, prompts_, task=task, tokenizer=tok, settings=cfg.rollout, rng=jax.random.key(seed),
                 prepare=lambda bt, tx, ex, tk, tz: distill.trace_annotate(bt, tx, ex, tk, tz, args))
    batch, texts, exs = ro.batch, ro.completions, ro.examples
    correct = [task.reward(t, e) >= 1.0 for t, e in zip(texts, exs)]
    labels = [distill.diagnose_completion(t, e.target, c) for t, e, c in zip(texts, exs, correct)]
    spans = np.asarray(batch["spans"])
    hist = {}
    for lab in labels:
        hist[lab] = hist.get(lab, 0) + 1
    rows = []
    for i in range(len(texts)):
        marked = [(texts[i][s:e], "key" if c == distill.SPAN_KEY else "error")
                  for s, e, c in distill.annotate_completion(texts[i], exs[i].target, correct[i])]
        rows.append({"prompt": exs[i].prompt, "completion": texts[i], "target": exs[i].target, "correct": correct[i],
                     "label": labels[i], "spans": marked})
    base = {k: batch[k] for k in ("tokens", "positions", "valid", "loss_mask", "temperature")}
    perm = np.random.default_rng(seed).permutation(len(labels))
    ref_args = dataclasses.replace(args, privileged_template="reference:{target}\n{prompt}")
    variants = {"true_label": batch,
                "shuffled_label": base | distill.trace_privileged_inputs(base, exs, [labels[j] for j in perm], tok,
                                                                        args),
                "reference": base | distill.trace_privileged_inputs(base, exs, labels, tok, ref_args)}
    gaps = {name: _span_stats(model, v, spans, args) for name, v in variants.items()}
    mask = np.asarray(batch["loss_mask"], bool)
    res = {"config": TRACE_CFG, "model": STUDENT, "prompts": prompts, "rows": len(texts), "seed": seed,
           "rollout_exact_match": float(np.mean(correct)), "label_histogram": hist,
           "span_coverage": {"key": float(((spans == distill.SPAN_KEY) & mask).sum() / mask.sum()),
                             "error": float(((spans == distill.SPAN_ERROR) & mask).sum() / mask.sum())},
           "capped_span_roles": _capped_span_roles(batch, texts, args),
           "gaps": gaps, "examples": [rows[i] for i in range(0, len(rows), max(1, len(rows) // 24))][:24]}
    Path(out_path).write_text(json.dumps(res, indent=1))
    return res


def _sets(cfg, n_eval: int) -> dict:
    """``{name: (task, split, indices)}`` of the SHRED measurement sets (module doc)."""
    from jaxtok.data import make_task_from_config

    def task(ops):
        return make_task_from_config(dataclasses.replace(cfg.data, task_args={**dict(cfg.data.task_args), "ops": ops}))

    return {"forget": (task("-"), "train", range(cfg.data.num_train)),
            "heldout_sub": (task("-"), "eval", range(n_eval)),
            "heldout_add": (task("+"), "eval", range(n_eval)),
            "testbed_mixed": (task("+-"), "eval", range(n_eval))}


def _greedy_and_ll(model, tok, task, split, indices, cfg, batch_size: int = 400) -> dict:
    """Greedy exact match and the mean per-token log-likelihood of ``target + EOS`` of the examples."""
    from jaxtok.data import encode_prompt, encode_sft, stack
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.tasks.tokenizer import SpecialTokens, decode
    from jaxtok.train.rollout import fetch, score_rollout

    sp = SpecialTokens.of(tok)
    exs = [task.example(split, i) for i in indices]
    right, ll_tok, ll_seq = [], [], []
    for s in range(0, len(exs), batch_size):
        chunk = exs[s:s + batch_size]
        pr = stack([encode_prompt(tok, e, cfg.data.prompt_len, "error") for e in chunk])
        res = generate(model, jnp.asarray(pr["prompt"]), jnp.asarray(pr["prompt_valid"]),
                       max_new_tokens=cfg.decode.max_new_tokens, sampling=SamplingParams(temperature=0.0),
                       rng=jax.random.key(0), stop_tokens=(sp.eos,), pad_id=sp.pad)
        toks = fetch(res.tokens)
        right += [task.reward(decode(tok, toks[r]), e) >= 1.0 for r, e in enumerate(chunk)]
        sb = stack([encode_sft(tok, e, cfg.data.seq_len, "error") for e in chunk])
        lp = score_rollout(model, sb, np.ones(len(chunk), np.float32))["old_logprobs"]
        m = np.asarray(sb["loss_mask"], bool)
        ll_tok += list(lp.sum(1) / m.sum(1))
        ll_seq += list(lp.sum(1))
    return {"n": len(exs), "distinct": len({e.prompt for e in exs}), "exact_match": float(np.mean(right)),
            "loglik_per_token": float(np.mean(ll_tok)), "loglik_per_answer": float(np.mean(ll_seq))}


def shred_eval(run: str, out_path: str, n_eval: int = 1200) -> dict:
    """SHRED forget / retain metrics of ``run`` (``DIR`` or ``DIR@STEP``) on the sets of :func:`_sets`."""
    from jaxtok.config import load_config

    cfg = load_config(SHRED_CFG)
    model, tok = _model(run)
    res = {"run": run, "config": SHRED_CFG}
    for name, (task, split, idx) in _sets(cfg, n_eval).items():
        res[name] = _greedy_and_ll(model, tok, task, split, idx, cfg)
    Path(out_path).write_text(json.dumps(res, indent=1))
    return res


def _char_roles(target: str) -> list[str]:
    """Role of each character of a worked answer ``a∘b=r>ans``: ``copy`` (the restated ``a∘b=``), ``result`` (the
    step result ``r``), ``mark`` (``>``), ``answer``."""
    cut, eq = target.rindex(">"), target.index("=")
    return ["copy" if i <= eq else "result" if i < cut else "mark" if i == cut else "answer"
            for i in range(len(target))]


def shred_positions(out_path: str, fraction: Optional[float] = None) -> dict:
    """Which answer tokens SHRED's stage 1 picks as forget positions on the forget set (configs/testbed/shred.yaml,
    θ0 = the testbed teacher): per role (:func:`_char_roles`, plus ``eos``) the token count, the share of that role
    selected (lowest-``forget_fraction`` θ0 probability per instance, :func:`jaxtok.select.lowest_prob`, as the
    loss does) and θ0's mean probability of the token. ``fraction``: P (default: the config's ``forget_fraction``)."""
    from jaxtok.config import load_config
    from jaxtok.data import encode_sft, stack
    from jaxtok.select import lowest_prob
    from jaxtok.train.objectives.distill import _piece_lengths
    from jaxtok.train.rollout import score_rollout

    cfg = load_config(SHRED_CFG)
    model, tok = _model(cfg.model.init_from)
    task, split, idx = _sets(cfg, 0)["forget"]
    exs = [task.example(split, i) for i in idx]
    b = stack([encode_sft(tok, e, cfg.data.seq_len, "error") for e in exs])
    lp = score_rollout(model, b, np.ones(len(exs), np.float32))["old_logprobs"]
    mask = np.asarray(b["loss_mask"], bool)
    frac = cfg.objective.args["forget_fraction"] if fraction is None else fraction
    forget = np.asarray(lowest_prob(jnp.asarray(lp), jnp.asarray(mask), frac)) > 0
    stats = {}
    for r, e in enumerate(exs):
        roles, cols, pos = _char_roles(e.target), np.nonzero(mask[r])[0], 0
        for c, n in zip(cols, _piece_lengths(tok, b["tokens"][r, cols])):
            role = roles[pos] if n and pos < len(roles) else "eos"
            pos += n
            st = stats.setdefault(role, {"tokens": 0, "selected": 0, "p_theta0": 0.0})
            st["tokens"] += 1
            st["selected"] += int(forget[r, c])
            st["p_theta0"] += float(np.exp(lp[r, c]))
    total_sel = sum(v["selected"] for v in stats.values())
    res = {role: {"tokens": v["tokens"], "share_selected": v["selected"] / v["tokens"],
                  "share_of_forget_positions": v["selected"] / total_sel, "mean_p_theta0": v["p_theta0"] / v["tokens"]}
           for role, v in stats.items()}
    Path(out_path).write_text(json.dumps(res, indent=1))
    return res


GRPO_RUNS = ("runs/testbed/pilot_grpo_b1024_lr6e-4_w10", "runs/testbed/grpo_b1024_s1", "runs/testbed/grpo_b1024_s2")
TRACE_RUNS = {"trace (self, diagnosis label)": "runs/testbed/trace_s0",
              "trace_external (frozen teacher)": "runs/testbed/trace_external_s0",
              "trace (self), error spans fixed (18ef8f5)": "runs/testbed/trace_fixspan_s0",
              "trace_external seed 1": "runs/testbed/trace_external_s1",
              "trace (self), error spans fixed, seed 1": "runs/testbed/trace_fixspan_s1",
              "trace (self), error spans fixed, seed 2": "runs/testbed/trace_fixspan_s2"}
TRACE_COLORS = ("tab:red", "tab:blue", "tab:purple", "tab:cyan")
SHRED_RUNS = {"P=0.5": "runs/testbed/shred_s0", "P=0.2": "runs/testbed/shred_p20_s0"}
# shred-eval json tags per arm and step (step 0: θ0, the testbed teacher)
SHRED_EVALS = {"P=0.5": {0: "before", 25: "step25", 50: "step50", 100: "step100", 200: "after"},
               "P=0.2": {0: "before", 50: "p20_step50", 200: "p20_after"}}
SHRED_SETS = ("forget", "heldout_sub", "heldout_add", "testbed_mixed")
TRAIN_KEYS = ("step_time_s", "rollout/entropy_mean", "rollout/length_mean", "rollout/exact_match", "span_kl", "kl_lambda",
              "key_frac", "error_frac")


def _metrics(run: str) -> tuple[dict, dict]:
    """``({step: held-out exact match}, {key: {step: value}})`` of a run's metrics.jsonl (empty if absent)."""
    evals, train = {}, {k: {} for k in TRAIN_KEYS}
    path = Path(run) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        d = json.loads(line)
        if "eval/exact_match" in d:
            evals[d["step"]] = d["eval/exact_match"]
        for k in TRAIN_KEYS:
            if k in d:
                train[k][d["step"]] = d[k]
    return evals, train


def _window_mean(series: dict, lo: int, hi: int):
    """Mean of ``series`` over steps ``lo <= step <= hi`` (None when empty)."""
    vals = [v for s, v in series.items() if lo <= s <= hi]
    return float(np.mean(vals)) if vals else None


def report() -> dict:
    """docs/results/trace_shred_testbed.{json,png} from the runs and the annotate / shred-eval json files; prints
    the markdown tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grpo = [_metrics(r) for r in GRPO_RUNS]
    steps = sorted(set.intersection(*(set(e) for e, _ in grpo)))
    grpo_mean = {s: float(np.mean([e[s] for e, _ in grpo])) for s in steps}
    arms = {"grpo (3 seeds, mean)": {"runs": list(GRPO_RUNS), "eval": grpo_mean,
                                     "per_seed": [e for e, _ in grpo]}}
    for name, run in TRACE_RUNS.items():
        e, t = _metrics(run)
        arms[name] = {"runs": [run], "eval": e, "train": t}
    windows = ((1, 10), (11, 40), (41, 100), (101, 150), (151, 250))
    diag = {}
    for name, (run, (_, t)) in {**{f"grpo s{i}": (r, m) for i, (r, m) in enumerate(zip(GRPO_RUNS, grpo))},
                                **{n: (r, _metrics(r)) for n, r in TRACE_RUNS.items()}}.items():
        diag[name] = {k: {f"{lo}-{hi}": _window_mean(t[k], lo, hi) for lo, hi in windows}
                      for k in ("rollout/entropy_mean", "rollout/length_mean", "step_time_s")}
    ann = json.loads(Path(f"{OUT}.annotate.json").read_text()) if Path(f"{OUT}.annotate.json").exists() else None
    shred = {arm: {step: json.loads(Path(f"{OUT}.shred_{tag}.json").read_text()) for step, tag in tags.items()
                   if Path(f"{OUT}.shred_{tag}.json").exists()} for arm, tags in SHRED_EVALS.items()}
    shred_curve = {arm: _metrics(run)[0] for arm, run in SHRED_RUNS.items()}
    res = {"date": "2026-12-04", "start_acc": 0.29833333333333334, "arms": arms, "rollout_diagnostics": diag,
           "annotate": ann and {k: ann.get(k) for k in ("rollout_exact_match", "label_histogram", "span_coverage",
                                                         "capped_span_roles", "gaps")},
           "shred": {a: {str(t): v for t, v in p.items()} for a, p in shred.items()},
           "shred_positions": {arm: json.loads(Path(f"{OUT}.shred_positions{tag}.json").read_text())
                               for arm, tag in (("P=0.5", ""), ("P=0.2", "_p20"))},
           "shred_heldout_sub_in_run_eval": shred_curve}
    Path(f"{OUT}.json").write_text(json.dumps(res, indent=1))

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for e, _ in grpo:
        ax[0].plot(sorted(e), [e[s] for s in sorted(e)], color="0.7", lw=1)
    ax[0].plot([0] + steps, [res["start_acc"]] + [grpo_mean[s] for s in steps], color="k", lw=2,
               label="GRPO 128x8 (3 seeds; mean bold)")
    for (name, run), c in zip(TRACE_RUNS.items(), TRACE_COLORS):
        e = arms[name]["eval"]
        ax[0].plot([0] + sorted(e), [res["start_acc"]] + [e[s] for s in sorted(e)], color=c, marker="o", label=name)
    ax[0].axvspan(0, 40, color="tab:red", alpha=0.07, label="TRACE KL on (lambda > 0)")
    ax[0].set(xlabel="step", ylabel="held-out greedy exact match (1200)", title="TRACE vs GRPO, testbed student")
    ax[0].legend(fontsize=7)
    for (r, (_, t)), i in zip(zip(GRPO_RUNS, grpo), range(3)):
        en = t["rollout/entropy_mean"]
        ax[1].plot(sorted(en), [en[s] for s in sorted(en)], color="0.6", lw=1, label="GRPO seeds" if i == 0 else None)
    for (name, run), c in zip(TRACE_RUNS.items(), TRACE_COLORS):
        en = arms[name]["train"]["rollout/entropy_mean"]
        ax[1].plot(sorted(en), [en[s] for s in sorted(en)], color=c, label=name)
    ax[1].axvspan(0, 40, color="tab:red", alpha=0.07)
    ax[1].set(xlabel="step", ylabel="rollout token entropy (nats, T=1)", title="entropy (TRACE's leakage symptom)")
    ax[1].legend(fontsize=7)
    for (arm, pts), ls in zip(shred.items(), ("-", "--")):
        for k, c in (("forget", "tab:red"), ("heldout_sub", "tab:orange"), ("heldout_add", "tab:green")):
            if len(pts) > 1:
                ax[2].plot(sorted(pts), [pts[t][k]["exact_match"] for t in sorted(pts)], ls=ls, marker="o", color=c,
                           label=f"{arm} {k}")
    ax[2].set(xlabel="SHRED step", ylabel="greedy exact match", title="SHRED on the testbed teacher (forget '-')")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{OUT}.png", dpi=110)

    print("| step | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms))
    for s in sorted(set().union(*(a["eval"] for a in arms.values()))):
        print(f"| {s} | " + " | ".join(f"{a['eval'][s]:.3f}" if s in a["eval"] else "–" for a in arms.values())
              + " |")
    print("\n| run | " + " | ".join(f"entropy {w[0]}-{w[1]}" for w in windows)
          + " | " + " | ".join(f"length {w[0]}-{w[1]}" for w in windows) + " |\n|---|" + "---|" * (2 * len(windows)))
    for name, d in diag.items():
        cells = [d[k][f"{lo}-{hi}"] for k in ("rollout/entropy_mean", "rollout/length_mean") for lo, hi in windows]
        print(f"| {name} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    print("\n| SHRED arm | step | " + " | ".join(f"{k} EM | {k} log-lik/tok" for k in SHRED_SETS)
          + " |\n|---|---|" + "---|---|" * len(SHRED_SETS))
    for arm, pts in shred.items():
        for t in sorted(pts):
            cells = [f"{pts[t][k]['exact_match']:.3f} | {pts[t][k]['loglik_per_token']:.3f}" for k in SHRED_SETS]
            print(f"| {arm} | {t} | " + " | ".join(cells) + " |")
    return res


def main(argv=None) -> int:
    """Command line (module doc); bad usage exits 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["annotate"] and len(argv) == 2:
        res = annotate(argv[1])
        print(json.dumps({k: res[k] for k in ("rollout_exact_match", "label_histogram", "span_coverage",
                                              "capped_span_roles", "gaps")},
                         indent=1))
        for r in res["examples"][:10]:
            print(f"{r['prompt']!r:>10} -> {r['completion']!r:24} target {r['target']!r:20} {r['label']:18} "
                  f"{r['spans']}")
        return 0
    if argv[:1] == ["shred-eval"] and len(argv) == 3:
        print(json.dumps(shred_eval(argv[1], argv[2]), indent=1))
        return 0
    if argv[:1] == ["shred-positions"] and len(argv) in (2, 3):
        try:
            frac = float(argv[2]) if len(argv) == 3 else None
        except ValueError:
            print(f"P={argv[2]!r}: a number in [0, 1]", file=sys.stderr)
            return 2
        print(json.dumps(shred_positions(argv[1], frac), indent=1))
        return 0
    if argv[:1] == ["report"] and len(argv) == 1:
        report()
        return 0
    print("usage: trace_shred_testbed.py annotate OUT.json | shred-eval RUN_DIR[@STEP] OUT.json | "
          "shred-positions OUT.json [P] | report",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
