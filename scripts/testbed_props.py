"""Measure the testbed properties that make an RL / distillation effect visible (issue 14).

For each run directory: held-out greedy exact match (the same prompts ``jaxtok eval`` scores), pass@k at a sampling
temperature (unbiased estimator of Chen et al. 2021 from n samples per prompt), the mean per-sample success at that
temperature, the binomial standard error of the greedy accuracy, and the share of prompts whose n samples are all
right / all wrong / mixed (a GRPO group of that size carries a signal only when mixed). Writes one json.

    python scripts/testbed_props.py --config configs/testbed/base.yaml \
        --model teacher=runs/testbed/teacher --model student=runs/testbed/student \
        --n 16 --temperature 1.0 --out docs/results/testbed.json

The task, its arguments, ``num_eval``, ``prompt_len`` and ``max_new_tokens`` come from ``--config`` (plus
``key=value`` overrides after ``--``), so the numbers are about exactly the prompts the training runs evaluate on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.data import pad_prompt_batch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _eval_prompts(task, tok, cfg, num_eval):
    from jaxtok.data import prompt_dataset

    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=num_eval,
                           num_examples=num_eval, overlong=cfg.data.overlong)
    batch = next(iter(ds))
    return np.asarray(batch["prompt"]), np.asarray(batch["prompt_valid"]), np.asarray(batch["index"])


def correct_rows(decode_fn, task, tok, prompt, valid, index, *, seed, batch_size):
    """[N] bool: is the completion of each prompt row right (reward == 1). ``decode_fn(prompt, valid, key) ->
    (tokens [b, n], valid [b, n] or None)`` decodes one fixed-shape batch (the last one padded with copies of its
    first row); ``index [N]`` the rows' eval example ids."""
    from jaxtok.tasks.tokenizer import decode
    from jaxtok.train.rollout import fetch

    out = np.zeros(prompt.shape[0], bool)
    for s in range(0, prompt.shape[0], batch_size):
        rows = min(batch_size, prompt.shape[0] - s)
        p, v = pad_prompt_batch({"prompt": prompt[s:s + rows], "prompt_valid": valid[s:s + rows]}, batch_size)
        toks, ok = decode_fn(jnp.asarray(p), jnp.asarray(v), jax.random.fold_in(jax.random.key(seed), s))
        toks = fetch(toks)
        ok = np.ones(toks.shape, bool) if ok is None else fetch(ok)
        for r in range(rows):
            ex = task.example("eval", int(index[s + r]))
            out[s + r] = task.reward(decode(tok, toks[r][ok[r]]), ex) >= 1.0
    return out


def _correct(model, task, tok, prompt, valid, index, *, temperature, seed, max_new_tokens, batch_size):
    """[N] bool: is the AR completion (``generate`` at ``temperature``) of each prompt row right."""
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.tasks.tokenizer import SpecialTokens

    sp = SpecialTokens.of(tok)

    def decode_fn(p, v, key):
        res = generate(model, p, v, max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature),
                       rng=key, stop_tokens=(sp.eos,), pad_id=sp.pad)
        return res.tokens, None

    return correct_rows(decode_fn, task, tok, prompt, valid, index, seed=seed, batch_size=batch_size)


def measure(run_dir, cfg, *, n: int, ks, temperature: float, seed: int, batch_size: int) -> dict:
    from jaxtok.data import make_task_from_config
    from jaxtok.tasks import load_tokenizer
    from jaxtok.train.loop import load_model

    t0 = time.time()
    model, _ = load_model(run_dir)
    tok = load_tokenizer(Path(run_dir) / "tokenizer.json")
    task = make_task_from_config(cfg.data)
    N = cfg.data.num_eval
    prompt, valid, index = _eval_prompts(task, tok, cfg, N)
    kw = dict(max_new_tokens=cfg.decode.max_new_tokens, batch_size=batch_size)
    greedy = _correct(model, task, tok, prompt, valid, index, temperature=0.0, seed=seed, **kw)
    # n samples per prompt: repeat every prompt n times (row-major), one rng per batch
    rep_p, rep_v, rep_i = (np.repeat(a, n, 0) for a in (prompt, valid, index))
    samp = _correct(model, task, tok, rep_p, rep_v, rep_i, temperature=temperature, seed=seed + 1, **kw).reshape(N, n)
    c = samp.sum(1)
    p = float(greedy.mean())
    out = {
        "run_dir": str(run_dir),
        "num_prompts": int(N),
        "unique_prompts": len({task.example("eval", int(i)).prompt for i in index}),
        "greedy_exact_match": p,
        "greedy_se": math.sqrt(p * (1 - p) / N),
        "greedy_ci95": [p - 1.96 * math.sqrt(p * (1 - p) / N), p + 1.96 * math.sqrt(p * (1 - p) / N)],
        "temperature": temperature,
        "samples_per_prompt": n,
        "sample_success": float(samp.mean()),
        "pass_at_k": {str(k): float(np.mean([pass_at_k(n, int(ci), k) for ci in c])) for k in ks},
        "group_all_wrong": float(np.mean(c == 0)),
        "group_all_right": float(np.mean(c == n)),
        "group_mixed": float(np.mean((c > 0) & (c < n))),
        "greedy_right_but_sample_success_lt_half": float(np.mean(greedy & (c < n / 2))),
        "seconds": time.time() - t0,
    }
    # share of mixed groups for the GRPO group sizes 4/8/16 (expected under the measured per-prompt success rate)
    q = c / n
    out["expected_mixed_group_share"] = {str(g): float(np.mean(1 - q**g - (1 - q) ** g)) for g in (4, 8, 16)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--k", default="1,2,4,8")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1200)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    from jaxtok.config import load_config

    cfg = load_config(a.config, a.overrides)
    ks = [int(k) for k in a.k.split(",")]
    res = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "config": a.config,
           "task": cfg.data.task, "task_args": dict(cfg.data.task_args), "models": {}}
    for spec in a.model:
        name, path = spec.split("=", 1)
        res["models"][name] = measure(path, cfg, n=a.n, ks=ks, temperature=a.temperature, seed=a.seed,
                                      batch_size=a.batch_size)
        print(name, json.dumps(res["models"][name]), flush=True)
    m = res["models"]
    checks = {}
    if "teacher" in m:
        checks["teacher_greedy_ge_0.90"] = m["teacher"]["greedy_exact_match"] >= 0.90
    if "student" in m:
        s = m["student"]
        checks["student_greedy_in_0.20_0.50"] = 0.20 <= s["greedy_exact_match"] <= 0.50
        if "8" in s["pass_at_k"]:
            checks["student_pass8_ge_2x_greedy"] = s["pass_at_k"]["8"] >= 2 * s["greedy_exact_match"]
        checks["student_se_le_1.5pp"] = s["greedy_se"] <= 0.015
    checks["num_prompts_ge_1100"] = cfg.data.num_eval >= 1100
    res["checks"] = checks
    print("checks", json.dumps(checks))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
