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

Flags (defaults = the testbed run above): ``--config`` (task/data settings), ``--policy``, ``--lenvm``,
``--max-new`` (the no-budget decode length), ``--budgets`` (oracle budgets), ``--paired-budgets``,
``--paired-aims`` (``B``, ``B+1`` or both, comma-separated), ``--scales`` (paired guide scales). The variable-length
variant (docs/results/length_control_testbed.md, "Variable-length variant") runs them with
``--config configs/testbed/lenvm_var_student.yaml --policy runs/testbed_var/student --lenvm runs/testbed_var/lenvm``.
Every subcommand also splits samples by form: ``direct`` (the completion starts with ``>``: answer only) or
scratchpad. ``paired`` scores every arm two ways: ``acc`` (the decoded text of the B tokens, rows cut before EOS
included: the bench's old accounting) and ``acc_finished`` (right AND EOS within B: the bench's accounting since
the fix, the same for both arms).
"""
import argparse
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
POLICY, LENVM, CONFIG = "runs/testbed/student", "runs/testbed/lenvm", "configs/testbed/base.yaml"
MAX_NEW = 20
ORACLE_BUDGETS, PAIRED_BUDGETS, PAIRED_AIMS, SCALES = (10, 11, 12, 13, 14, 20), (11, 12), ("B", "B+1"), (1.0, 2.0, 8.0)


def setup(config=CONFIG, policy_dir=POLICY):
    """Load the task, policy, tokenizer and the N held-out prompts (module globals used by the subcommands)."""
    global cfg, task, policy, tok, sp, P, V, I, exs, ref
    cfg = load_config(config)
    task = make_task_from_config(cfg.data)
    policy, _ = load_any(policy_dir, key="policy")
    tok = load_tokenizer(Path(policy_dir) / "tokenizer.json")
    sp = SpecialTokens.of(tok)
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=N, num_examples=N,
                           overlong=cfg.data.overlong)
    _b = next(iter(ds))
    P, V, I = map(np.asarray, (_b["prompt"], _b["prompt_valid"], _b["index"]))
    exs = [task.example("eval", int(i)) for i in I]
    ref = np.array([len(encode(tok, e.target)) + 1 for e in exs])  # + EOS


def is_direct_form(text: str) -> bool:
    """A completion in the answer-only form (``>16``): it starts with the answer mark, no scratchpad."""
    return text.startswith(">")


def sample(max_new, key, fold, *, temperature=1.0, top_k=0, guide=None, full=False):
    """[N] right flags and lengths of one decode of every prompt; batch o uses fold_in(key, fold + o). With
    ``full`` also [N] finished (EOS within max_new) and direct-form flags."""
    ok, ln = np.zeros(N, bool), np.zeros(N, int)
    done, direct = np.zeros(N, bool), np.zeros(N, bool)
    for o in range(0, N, BS):
        out = generate(policy, jnp.asarray(P[o:o + BS]), jnp.asarray(V[o:o + BS]), max_new_tokens=max_new,
                       sampling=SamplingParams(temperature=temperature, top_k=top_k),
                       rng=jax.random.fold_in(key, fold + o), stop_tokens=sp.eos_ids, pad_id=sp.pad, guide=guide)
        toks = fetch(out.tokens)
        ln[o:o + BS] = np.asarray(out.lengths)
        done[o:o + BS] = np.asarray(out.done)
        for r in range(toks.shape[0]):
            text = decode(tok, toks[r])
            ok[o + r] = task.reward(text, exs[o + r]) >= 1.0
            direct[o + r] = is_direct_form(text)
    return (ok, ln, done, direct) if full else (ok, ln)


def hist(a):
    return {int(k): int(v) for k, v in sorted(collections.Counter(np.asarray(a).tolist()).items())}


def q(a):
    a = np.asarray(a)
    return {"n": int(a.size), "mean": float(a.mean()), "p10": float(np.percentile(a, 10)),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "hist": hist(a)}


def mean_or_none(a):
    """Mean of a possibly empty array (None when empty, e.g. no prompt's reference fits a small budget)."""
    return float(np.mean(a)) if np.size(a) else None


def form_stats(ok, ln, direct) -> dict:
    """Per answer form (direct ``>16`` vs scratchpad): share of samples, accuracy, length distribution."""
    out = {"direct_share": float(direct.mean())}
    for name, m in (("direct", direct), ("scratchpad", ~direct)):
        out[name] = {"n": int(m.sum()), "acc": float(ok[m].mean()) if m.any() else None,
                     "acc_se": float(ok[m].std(ddof=1) / np.sqrt(m.sum())) if m.sum() > 1 else None,
                     "len": q(ln[m]) if m.any() else None}
    return out


def lengths(S=4):
    key = jax.random.key(123)
    right, wrong, right_is_ref, wrong_is_ref = [], [], [], []
    OK, LN, DI = [], [], []
    for s in range(S):
        ok, ln, done, direct = sample(MAX_NEW, key, s * 10000, full=True)
        right += ln[ok].tolist(); wrong += ln[~ok].tolist()
        right_is_ref += (ln[ok] == ref[ok]).tolist(); wrong_is_ref += (ln[~ok] == ref[~ok]).tolist()
        OK.append(ok); LN.append(ln); DI.append(direct)
    g_ok, _ = sample(MAX_NEW, key, S * 10000, temperature=0.0)
    OK, LN, DI = map(np.concatenate, (OK, LN, DI))
    return {"samples_per_prompt": S, "prompts": N, "ref_len": q(ref), "right_sample_len": q(right),
            "wrong_sample_len": q(wrong), "right_len_equals_ref_share": float(np.mean(right_is_ref)),
            "wrong_len_equals_ref_share": float(np.mean(wrong_is_ref)),
            "sample_success": len(right) / (len(right) + len(wrong)), "greedy_exact": float(g_ok.mean()),
            "right_within_budget_share": {B: float(np.mean(np.asarray(right) <= B)) for B in range(2, MAX_NEW + 1)},
            "ref_within_budget_share": {B: float(np.mean(ref <= B)) for B in range(2, MAX_NEW + 1)},
            "by_form": form_stats(OK, LN, DI)}


def oracle_by_budget(OK, L, done, B) -> dict:
    """[N, S] right flags, lengths (EOS included) and finished flags of S samples per prompt, budget B (EOS within
    B): truncation accuracy E[right & fits], the length-only ceiling E_prompt[P(right | fits)] and their per-prompt
    difference (the possible gain) with its SE over prompts."""
    fit = done & (L <= B)
    trunc = (OK & fit).mean(1)  # [N]
    cond = np.where(fit.any(1), (OK & fit).sum(1) / np.maximum(fit.sum(1), 1), 0.0)  # [N]
    gap = cond - trunc
    return {"truncation_acc": float(trunc.mean()), "rejection_oracle_acc": float(cond.mean()),
            "gap": float(gap.mean()), "gap_se": float(gap.std(ddof=1) / np.sqrt(len(gap))),
            "prompts_with_a_fit": float(fit.any(1).mean()), "prompts_ref_le_B": float((ref <= B).mean()),
            "acc_if_ref_le_B_else_0": float((OK.mean(1) * (ref <= B)).mean())}


def oracle(S=8):
    key = jax.random.key(7)
    OK, L = np.zeros((N, S), bool), np.zeros((N, S), int)
    D, DI = np.zeros((N, S), bool), np.zeros((N, S), bool)
    for s in range(S):
        OK[:, s], L[:, s], D[:, s], DI[:, s] = sample(MAX_NEW, key, s * 10000, full=True)
    res = {"samples_per_prompt": S, "prompts": N, "sample_success": float(OK.mean()),
           "finished_share": float(D.mean()), "by_form": form_stats(OK.ravel(), L.ravel(), DI.ravel()),
           "by_budget": {B: oracle_by_budget(OK, L, D, B) for B in ORACLE_BUDGETS}}
    return res


def paired():
    vm, _ = load_any(LENVM, key="lenvm")
    key, res = jax.random.key(0), {}
    for B in PAIRED_BUDGETS:
        base, _, bdone, bdir = sample(B, key, 0, top_k=K, full=True)
        bfin = base & bdone
        res[f"truncate @ {B}"] = {"acc": float(base.mean()), "acc_finished": float(bfin.mean()),
                                  "acc_on_ref_le_B1": mean_or_none(base[ref <= B + 1]),
                                  "direct_share": float(bdir.mean()), "finished_share": float(bdone.mean())}
        for tgt in [B + (aim == "B+1") for aim in PAIRED_AIMS]:
            for s in SCALES:
                ok, ln, done, direct = sample(B, key, 0, guide=LengthGuide.of(vm, mode="budget", scale=s, target=tgt,
                                                                              candidates=K), full=True)
                d = ok.astype(float) - base
                df = (ok & done).astype(float) - bfin
                res[f"budget B={B} aim {tgt} s={s:g}"] = {
                    "acc": float(ok.mean()), "diff_vs_trunc": float(d.mean()),
                    "diff_se": float(d.std(ddof=1) / np.sqrt(N)), "acc_on_ref_le_B1": mean_or_none(ok[ref <= B + 1]),
                    "mean_len": float(ln.mean()), "acc_finished": float((ok & done).mean()),
                    "diff_finished_vs_trunc": float(df.mean()), "diff_finished_se": float(df.std(ddof=1) / np.sqrt(N)),
                    "direct_share": float(direct.mean()), "finished_share": float(done.mean())}
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


def parse(argv):
    """Subcommand, output path and the flags of the module docstring (defaults: the testbed run)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("lengths", "oracle", "paired", "plot"))
    ap.add_argument("out", nargs="?")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--policy", default=POLICY)
    ap.add_argument("--lenvm", default=LENVM)
    ap.add_argument("--max-new", type=int, default=MAX_NEW)
    ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
    ap.add_argument("--budgets", type=ints, default=ORACLE_BUDGETS)
    ap.add_argument("--paired-budgets", type=ints, default=PAIRED_BUDGETS)
    ap.add_argument("--paired-aims", type=lambda v: tuple(v.split(",")), default=PAIRED_AIMS)
    ap.add_argument("--scales", type=lambda v: tuple(float(x) for x in v.split(",")), default=SCALES)
    a = ap.parse_args(argv)
    if a.cmd != "plot" and not a.out:
        ap.error(f"{a.cmd} needs OUT.json")
    if set(a.paired_aims) - {"B", "B+1"}:
        ap.error(f"--paired-aims={','.join(a.paired_aims)}: allowed B, B+1")
    return a


if __name__ == "__main__":
    a = parse(sys.argv[1:])
    if a.cmd == "plot":
        print(plot())
        sys.exit(0)
    LENVM, MAX_NEW, ORACLE_BUDGETS, PAIRED_BUDGETS = a.lenvm, a.max_new, a.budgets, a.paired_budgets
    PAIRED_AIMS, SCALES = a.paired_aims, a.scales
    setup(a.config, a.policy)
    out = {"lengths": lengths, "oracle": oracle, "paired": paired}[a.cmd]()
    out["command"] = "python scripts/length_control_testbed.py " + " ".join(sys.argv[1:])
    print(json.dumps(out, indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1))
