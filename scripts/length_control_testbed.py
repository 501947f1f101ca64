"""Analyses behind docs/results/length_control_testbed.md that the length_control bench does not print (issue 14
item 6). On the testbed's 1200 held-out prompts (configs/testbed/base.yaml) and the testbed student:

- ``lengths``: reference completion lengths (task target + EOS) and the lengths of the student's T=1 samples, right
  vs wrong, 4 samples per prompt, plus greedy exact match;
- ``oracle``: 8 T=1 samples per prompt; for each budget B (EOS counted inside B) truncation accuracy
  E[right & len <= B] and the ceiling of any length-only reweighting of the policy ("rejection oracle": per prompt
  P(right | len <= B), i.e. resample until a completion fits);
- ``paired``: truncation (top-K=16 sampling cut at B) vs LenVM budget guidance aimed at B (the bench's arm: EOS
  inside B) and at B+1 (answer text inside B; truncation's rows cut just before EOS are scored too), same keys
  per arm, per-row paired differences with their SE.

    python scripts/length_control_testbed.py lengths|oracle|paired OUT.json
    python scripts/length_control_testbed.py plot   # after the bench and length_control_testbed.json
"""
import collections
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.config import load_config
from jaxtok.data import make_task_from_config, prompt_dataset
from jaxtok.decode.generate import generate
from jaxtok.decode.length_control import LengthGuide
from jaxtok.models.hf import load_any
from jaxtok.sampling import SamplingParams
from jaxtok.tasks import load_tokenizer
from jaxtok.tasks.tokenizer import SpecialTokens, decode, encode
from jaxtok.train.rollout import fetch

N, BS, K = 1200, 400, 16
POLICY, LENVM = "runs/testbed/student", "runs/testbed/lenvm"
cfg = load_config("configs/testbed/base.yaml")
task = make_task_from_config(cfg.data)
policy, _ = load_any(POLICY, key="policy")
tok = load_tokenizer(Path(POLICY) / "tokenizer.json")
sp = SpecialTokens.of(tok)
ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=N, num_examples=N,
                       overlong=cfg.data.overlong)
_b = next(iter(ds))
P, V, I = map(np.asarray, (_b["prompt"], _b["prompt_valid"], _b["index"]))
exs = [task.example("eval", int(i)) for i in I]
ref = np.array([len(encode(tok, e.target)) + 1 for e in exs])  # + EOS


def sample(max_new, key, fold, *, temperature=1.0, top_k=0, guide=None):
    """[N] right flags and lengths of one decode of every prompt; batch o uses fold_in(key, fold + o)."""
    ok, ln = np.zeros(N, bool), np.zeros(N, int)
    for o in range(0, N, BS):
        out = generate(policy, jnp.asarray(P[o:o + BS]), jnp.asarray(V[o:o + BS]), max_new_tokens=max_new,
                       sampling=SamplingParams(temperature=temperature, top_k=top_k),
                       rng=jax.random.fold_in(key, fold + o), stop_tokens=sp.eos_ids, pad_id=sp.pad, guide=guide)
        toks = fetch(out.tokens)
        ln[o:o + BS] = np.asarray(out.lengths)
        for r in range(toks.shape[0]):
            ok[o + r] = task.reward(decode(tok, toks[r]), exs[o + r]) >= 1.0
    return ok, ln


def hist(a):
    return {int(k): int(v) for k, v in sorted(collections.Counter(np.asarray(a).tolist()).items())}


def q(a):
    a = np.asarray(a)
    return {"n": int(a.size), "mean": float(a.mean()), "p10": float(np.percentile(a, 10)),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "hist": hist(a)}


def lengths(S=4):
    key = jax.random.key(123)
    right, wrong, right_is_ref, wrong_is_ref = [], [], [], []
    for s in range(S):
        ok, ln = sample(20, key, s * 10000)
        right += ln[ok].tolist(); wrong += ln[~ok].tolist()
        right_is_ref += (ln[ok] == ref[ok]).tolist(); wrong_is_ref += (ln[~ok] == ref[~ok]).tolist()
    g_ok, _ = sample(20, key, S * 10000, temperature=0.0)
    return {"samples_per_prompt": S, "prompts": N, "ref_len": q(ref), "right_sample_len": q(right),
            "wrong_sample_len": q(wrong), "right_len_equals_ref_share": float(np.mean(right_is_ref)),
            "wrong_len_equals_ref_share": float(np.mean(wrong_is_ref)),
            "sample_success": len(right) / (len(right) + len(wrong)), "greedy_exact": float(g_ok.mean()),
            "right_within_budget_share": {B: float(np.mean(np.asarray(right) <= B)) for B in range(6, 21)},
            "ref_within_budget_share": {B: float(np.mean(ref <= B)) for B in range(6, 21)}}


def oracle(S=8):
    key = jax.random.key(7)
    OK, L = np.zeros((N, S), bool), np.zeros((N, S), int)
    for s in range(S):
        OK[:, s], L[:, s] = sample(20, key, s * 10000)
    res = {"samples_per_prompt": S, "prompts": N, "sample_success": float(OK.mean()), "by_budget": {}}
    for B in (10, 11, 12, 13, 14, 20):
        fit = L <= B
        cond = np.where(fit.any(1), (OK & fit).sum(1) / np.maximum(fit.sum(1), 1), 0.0)
        res["by_budget"][B] = {"truncation_acc": float((OK & fit).mean()), "rejection_oracle_acc": float(cond.mean()),
                               "prompts_ref_le_B": float((ref <= B).mean()),
                               "acc_if_ref_le_B_else_0": float((OK.mean(1) * (ref <= B)).mean())}
    return res


def paired():
    vm, _ = load_any(LENVM, key="lenvm")
    key, res = jax.random.key(0), {}
    for B in (11, 12):
        base, _ = sample(B, key, 0, top_k=K)
        res[f"truncate @ {B}"] = {"acc": float(base.mean()), "acc_on_ref_le_B1": float(base[ref <= B + 1].mean())}
        for tgt in (B, B + 1):
            for s in (1.0, 2.0, 8.0):
                ok, ln = sample(B, key, 0, guide=LengthGuide.of(vm, mode="budget", scale=s, target=tgt, candidates=K))
                d = ok.astype(float) - base
                res[f"budget B={B} aim {tgt} s={s:g}"] = {
                    "acc": float(ok.mean()), "diff_vs_trunc": float(d.mean()),
                    "diff_se": float(d.std(ddof=1) / np.sqrt(N)), "acc_on_ref_le_B1": float(ok[ref <= B + 1].mean()),
                    "mean_len": float(ln.mean())}
    return res


def plot(bench_json="runs/testbed/bench_length_control/results.json", lengths_json="docs/results/length_control_testbed.json",
         png="docs/results/length_control_testbed_budget.png"):
    """Two panels: completion-length histograms (reference, right and wrong samples) and accuracy under a token budget
    (bench truncation / guided arms, the rejection-oracle ceiling)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = json.loads(Path(bench_json).read_text())
    extra = json.loads(Path(lengths_json).read_text())
    lens, orc = extra["lengths"], extra["oracle"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6), dpi=100)
    xs = np.arange(6, 21)
    for name, d, w in (("reference answer (task target + EOS)", lens["ref_len"], -0.27),
                       ("student T=1 samples, right", lens["right_sample_len"], 0.0),
                       ("student T=1 samples, wrong", lens["wrong_sample_len"], 0.27)):
        h = {int(k): v for k, v in d["hist"].items()}
        tot = sum(h.values())
        a.bar(xs + w, [h.get(int(x), 0) / tot for x in xs], width=0.27, label=f"{name} (n={tot})")
    a.set_xlabel("completion length (tokens, EOS included)")
    a.set_ylabel("share of completions")
    a.set_title("testbed completion lengths (1200 held-out prompts)")
    a.legend(fontsize=8, loc="upper left")
    a.grid(alpha=0.3)
    rows = {r["arm"]: r for r in bench["rows"]}
    Bs = bench["args"]["budgets"]
    b.plot(Bs, [rows[f"truncate @ {B}"]["exact_match"] for B in Bs], "o-", label="truncation (top-K sampling cut at B)")
    for s in bench["args"]["budget_scales"]:
        b.plot(Bs, [rows[f"budget {B} s={s:g}"]["exact_match"] for B in Bs], "s--", label=f"LenVM budget guide, s={s:g}")
    ob = sorted(int(k) for k in orc["by_budget"] if int(k) <= 15)
    # the oracle counts EOS inside B; the bench scores rows cut just before EOS, so its budget B matches oracle B+1
    b.plot([B - 1 for B in ob], [orc["by_budget"][str(B)]["truncation_acc"] for B in ob], ":", color="grey",
           marker="v", label="8 other samples/prompt: truncation")
    b.plot([B - 1 for B in ob], [orc["by_budget"][str(B)]["rejection_oracle_acc"] for B in ob], "k:", marker="^",
           label="same samples: ceiling of any length-only reweighting")
    b.axhline(rows["policy"]["exact_match"], color="grey", lw=0.8, ls="--", label="no budget (plain sampling)")
    b.set_xlabel("token budget B (max new tokens)")
    b.set_ylabel("held-out exact match (fraction of prompts)")
    b.set_title("accuracy under a token budget")
    b.legend(fontsize=8, loc="upper left")
    b.grid(alpha=0.3)
    fig.text(0.01, 0.01, "made by: jaxtok bench configs/testbed/length_control.yaml; "
             "python scripts/length_control_testbed.py lengths|oracle|plot", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png)
    return png


if __name__ == "__main__":
    if sys.argv[1] == "plot":
        print(plot())
        sys.exit(0)
    out = {"lengths": lengths, "oracle": oracle, "paired": paired}[sys.argv[1]]()
    print(json.dumps(out, indent=1))
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
