"""Speculative RL rollouts against AR rollouts in ONE process, interleaved (issue 20 item 6 -> spec_rollout_speedup).

For each rollout batch size, the same GRPO setup (configs/rl/grpo_spec.yaml: policy = the testbed teacher, drafter
= the testbed student) takes RL steps alternately with AR rollouts (``rollout.sampler: ar``) and speculative
rollouts (``rollout.sampler: speculative``), the order flipped every repeat; compiles are warmed up first and left
out. Per RL step: the sampling time (the rollout sampler alone: ``rollout._sample``), the whole step (rollout
collection with scoring and rewards + the jitted train step), completion tokens, acceptance and tokens per target
forward. Reported: rollout tokens/s and step time per mode, and their ratios per repeat (speculative / AR; median
over repeats), ``spec_rollout_speedup`` = the median sampling-throughput ratio at the largest batch (the key
docs/results/decode_peers.json copies), and the sampler/trainer log-prob mismatch of both modes (0 up to float
error: the invariant).

    python scripts/spec_rollouts.py                       # -> docs/results/spec_rollouts.{json,md}
    python scripts/spec_rollouts.py --rows 16,64 --repeats 3 --draft-len 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/rl/grpo_spec.yaml"))
    ap.add_argument("--rows", default="16,64,256", help="rollout batch sizes (prompts x num_generations)")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/results/spec_rollouts"))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    return ap.parse_args(argv)


class _SampleTimer:
    """Wraps ``jaxtok.train.rollout._sample`` (the rollout sampler, AR or speculative) to time each call; the call
    ends with host copies of its outputs, so the wall time is the sampler's."""

    def __init__(self, rollout_mod):
        self.mod, self.orig, self.seconds = rollout_mod, rollout_mod._sample, 0.0

    def __enter__(self):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = self.orig(*a, **k)
            self.seconds += time.perf_counter() - t0
            return out

        self.mod._sample = timed
        return self

    def __exit__(self, *exc):
        self.mod._sample = self.orig


def _setup(cfg_path, overrides, rows, generations, draft_len):
    from jaxtok.config import build_optimizer, load_config, validate_names
    from jaxtok.data import prompt_dataset
    from jaxtok.train import rollout as rollout_lib
    from jaxtok.train.loop import build_objective, build_train_model, load_tokenizer_for
    from jaxtok.train.step import init_train_state, make_train_step

    cfg = load_config(cfg_path, [*overrides, f"data.batch_size={rows}", f"rollout.num_generations={generations}",
                                 f"rollout.draft_len={draft_len}", "rollout.sampler=speculative"])
    plan = validate_names(cfg)
    tok = load_tokenizer_for(cfg)
    task = plan.make_task()
    model, _ = build_train_model(plan, tok.get_vocab_size())
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state = init_train_state(model, optimizer, seed=cfg.train.seed)
    step_fn = make_train_step(model, optimizer, build_objective(plan))
    sampler = rollout_lib.SpeculativeSampler.from_config(plan, model.cfg)
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=rows // generations,
                           num_examples=cfg.data.num_train, seed=cfg.data.seed, shuffle=True, num_epochs=None,
                           drop_remainder=True, overlong=cfg.data.overlong)
    return dict(cfg=cfg, tok=tok, task=task, graphdef=graphdef, state=state, step_fn=step_fn, sampler=sampler,
                it=iter(ds), policy_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model))),
                draft_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(sampler.drafter))))


def _rl_step(env, mode: str, key) -> dict:
    """One RL step: collect a rollout batch with ``mode``'s sampler, then one train step; times both."""
    from jaxtok.train import rollout as rollout_lib

    prompts = next(env["it"])
    policy = nnx.merge(env["graphdef"], env["state"].params, env["state"].rest)
    t0 = time.perf_counter()
    with _SampleTimer(rollout_lib) as timer:
        ro = rollout_lib.collect(policy, prompts, task=env["task"], tokenizer=env["tok"],
                                 settings=env["cfg"].rollout, rng=key,
                                 sampler=env["sampler"] if mode == "speculative" else None)
    t1 = time.perf_counter()
    env["state"], metrics = env["step_fn"](env["state"], {k: jax.numpy.asarray(v) for k, v in ro.batch.items()})
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    tokens = int(ro.batch["loss_mask"].sum())
    out = {"mode": mode, "sample_s": timer.seconds, "collect_s": t1 - t0, "train_s": t2 - t1, "step_s": t2 - t0,
           "completion_tokens": tokens, "rollout_tokens_per_s": tokens / timer.seconds,
           "reward_mean": ro.info["rollout/reward_mean"], "length_mean": ro.info["rollout/length_mean"],
           "sampler_abs_logp_diff": ro.info["rollout/sampler_abs_logp_diff"]}
    for k in ("spec_acceptance_rate", "spec_tokens_per_target_forward", "spec_target_forwards",
              "spec_draft_forwards"):
        if f"rollout/{k}" in ro.info:
            out[k] = ro.info[f"rollout/{k}"]
    return out


def _drafter_ar(env, key) -> dict:
    """AR sampling with the DRAFTER as the policy on the same prompts' shape: its tokens/s against the target's
    gives the forward-cost ratio c_draft / c_target of the cost model."""
    from jaxtok.tasks.tokenizer import SpecialTokens
    from jaxtok.train import rollout as rollout_lib

    prompts = rollout_lib.expand_groups(next(env["it"]), env["cfg"].rollout.num_generations)
    t0 = time.perf_counter()
    tok, valid, _ = rollout_lib._sample(env["sampler"].drafter, prompts["prompt"], prompts["prompt_valid"],
                                         env["cfg"].rollout, key, SpecialTokens.of(env["tok"]), None)
    dt = time.perf_counter() - t0
    return {"mode": "drafter_ar", "sample_s": dt, "completion_tokens": int(valid.sum()),
            "rollout_tokens_per_s": int(valid.sum()) / dt}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None) -> dict:
    a = _args(argv)
    rows_list = [int(x) for x in a.rows.split(",")]
    results = []
    t_all = time.perf_counter()
    for rows in rows_list:
        env = _setup(a.config, a.overrides, rows, a.generations, a.draft_len)
        t_warm = time.perf_counter()
        for mode in ("ar", "speculative"):  # compile the sampler, the scorer and the train step: left out
            _rl_step(env, mode, jax.random.key(10_000 + rows))
        _drafter_ar(env, jax.random.key(20_000 + rows))
        warm_s = time.perf_counter() - t_warm
        runs = []
        for r in range(a.repeats):
            order = ("ar", "speculative") if r % 2 == 0 else ("speculative", "ar")
            for mode in order:
                rec = _rl_step(env, mode, jax.random.key(r))
                rec.update(repeat=r, load=_load())
                runs.append(rec)
                print(json.dumps({"rows": rows, **rec}), flush=True)
            rec = _drafter_ar(env, jax.random.key(100 + r))
            rec.update(repeat=r, load=_load())
            runs.append(rec)
            print(json.dumps({"rows": rows, **rec}), flush=True)

        def per(mode, key):
            return [x[key] for x in runs if x["mode"] == mode]

        ratio = lambda key: [s / b for s, b in zip(per("speculative", key), per("ar", key))]  # noqa: E731
        results.append({
            "rows": rows, "prompts": rows // a.generations, "warmup_s": warm_s, "runs": runs,
            "ar_rollout_tokens_per_s": statistics.median(per("ar", "rollout_tokens_per_s")),
            "spec_rollout_tokens_per_s": statistics.median(per("speculative", "rollout_tokens_per_s")),
            "ar_step_s": statistics.median(per("ar", "step_s")),
            "spec_step_s": statistics.median(per("speculative", "step_s")),
            "rollout_speedup": statistics.median(ratio("rollout_tokens_per_s")),
            "rollout_speedup_per_repeat": ratio("rollout_tokens_per_s"),
            "step_time_ratio": statistics.median(ratio("step_s")),
            "acceptance_rate": statistics.median(per("speculative", "spec_acceptance_rate")),
            "tokens_per_target_forward": statistics.median(per("speculative", "spec_tokens_per_target_forward")),
            "draft_forwards_per_round": statistics.median(
                [x["spec_draft_forwards"] / max(x["spec_target_forwards"] - 1, 1) for x in runs
                 if x["mode"] == "speculative"]),
            "drafter_ar_tokens_per_s": statistics.median(per("drafter_ar", "rollout_tokens_per_s")),
            "cost_ratio_draft_over_target": statistics.median(
                [a / d for a, d in zip(per("ar", "rollout_tokens_per_s"), per("drafter_ar", "rollout_tokens_per_s"))]),
            "max_sampler_abs_logp_diff": {m: max(per(m, "sampler_abs_logp_diff")) for m in ("ar", "speculative")},
            "policy_params": env["policy_params"], "draft_params": env["draft_params"],
        })
    cfg = env["cfg"]
    largest = max(results, key=lambda x: x["rows"])
    cmd = "python scripts/spec_rollouts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "spec_rollout_speedup": {
            "value": largest["rollout_speedup"],
            "settings": (f"GRPO rollouts, policy {cfg.model.init_from} ({largest['policy_params']} params), drafter "
                         f"{cfg.rollout.draft_init_from} ({largest['draft_params']} params), {largest['rows']} rows "
                         f"({largest['prompts']} prompts x {a.generations}), max_new_tokens "
                         f"{cfg.rollout.max_new_tokens}, temperature {cfg.rollout.temperature}, draft_len "
                         f"{a.draft_len}, draft policy {cfg.rollout.draft_policy}, CPU float32, median of "
                         f"{a.repeats} interleaved repeats; speculative / AR rollout tokens/s"),
            "command": cmd.strip(),
        },
        "by_rows": results,
        "config": str(Path(a.config).relative_to(ROOT)) if Path(a.config).is_relative_to(ROOT) else a.config,
        "overrides": a.overrides, "draft_len": a.draft_len, "generations": a.generations, "repeats": a.repeats,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()]},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "total_s": time.perf_counter() - t_all,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["| rows | AR rollout tok/s | spec rollout tok/s | rollout speedup (per repeat) | AR step s | "
             "spec step s | step time ratio | acceptance | tokens / target forward | drafter forwards / round | "
             "c_draft / c_target | max abs logp diff AR / spec |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in results:
        lines.append(f"| {x['rows']} | {x['ar_rollout_tokens_per_s']:.0f} | {x['spec_rollout_tokens_per_s']:.0f} | "
                     f"{x['rollout_speedup']:.2f} ({', '.join(f'{v:.2f}' for v in x['rollout_speedup_per_repeat'])})"
                     f" | {x['ar_step_s']:.3f} | {x['spec_step_s']:.3f} | {x['step_time_ratio']:.2f} | "
                     f"{x['acceptance_rate']:.3f} | {x['tokens_per_target_forward']:.2f} | "
                     f"{x['draft_forwards_per_round']:.2f} | {x['cost_ratio_draft_over_target']:.2f} | "
                     f"{x['max_sampler_abs_logp_diff']['ar']:.1e} / {x['max_sampler_abs_logp_diff']['speculative']:.1e} |")
    out.with_suffix(".table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
