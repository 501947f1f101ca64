"""Why GRPO does not lift the testbed student while OPD and SFT do: batch-to-batch agreement of the gradients.

For each objective, the gradient of its loss at the start model on several independent batches (fresh prompts and
fresh samples); reports the mean pairwise cosine between batch gradients (how much of one batch's direction is
signal rather than noise), the mean cosine with the ground-truth SFT gradient on a large held-in batch (is it the
direction that teaches the task?), and gradient norms. Also the same after Adam-style per-coordinate normalisation
(sign of the gradient), which is close to the first steps of a freshly started Adam.

    python scripts/gradient_snr.py --student runs/testbed/student --teacher runs/testbed/teacher \
        --out docs/results/proving_ground_gradients.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _flat(g) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--arms", default="grpo_32x8,opd_64x1,sft_gt_64")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from jaxtok.config import load_config
    from jaxtok.data import from_config
    from jaxtok.tasks import load_tokenizer
    from jaxtok.train import rollout as R
    from jaxtok.train.loop import load_model
    from jaxtok.train.objectives.distill import OPDArgs, opd_loss
    from jaxtok.train.objectives.policy_gradient import PolicyGradientArgs, policy_gradient_loss
    from jaxtok.train.objectives.sft import SFTArgs, sft_loss

    model, _ = load_model(a.student)
    teacher, _ = load_model(a.teacher)
    tok = load_tokenizer(Path(a.student) / "tokenizer.json")

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    compiled = {}

    def grad_of(loss_fn, batch, key):
        if key not in compiled:
            def f(p, b):
                s, c, _ = loss_fn(nnx.merge(graphdef, p, rest), b)
                return s / c
            compiled[key] = jax.jit(jax.grad(f))
        return _flat(compiled[key](params, batch))

    def jb(d):
        return {k: jnp.asarray(v) for k, v in d.items() if isinstance(v, np.ndarray)}

    # ground truth: SFT gradient on 1024 train examples
    cfg_s = load_config("configs/testbed/student.yaml", ["data.batch_size=1024", "data.seed=0"])
    _, ds, _ = from_config(cfg_s.data, tok, "train", kind="sft")
    truth = grad_of(lambda m, b: sft_loss(m, b, jax.random.key(0), SFTArgs()), jb(next(iter(ds))), "truth")

    arms = {}
    specs = {
        "grpo_32x8": ("configs/testbed/grpo.yaml", []),
        "opd_64x1": ("configs/testbed/opd.yaml", []),
        "sft_gt_64": ("configs/testbed/student.yaml", ["data.batch_size=64"]),
    }
    for name, (path, ov) in specs.items():
        if name not in a.arms.split(","):
            continue
        cfg = load_config(path, ov + ["model.init_from=" + a.student])
        kind = "prompt" if cfg.objective.name != "sft" else "sft"
        _, ds, _ = from_config(cfg.data, tok, "train", kind=kind)
        it = iter(ds)
        grads, extra = [], []
        for i in range(a.batches):
            if kind == "sft":
                batch = jb(next(it))
                grads.append(grad_of(lambda m, b: sft_loss(m, b, jax.random.key(0), SFTArgs()), batch, name))
                continue
            ro = R.collect(model, {k: v[: cfg.data.batch_size // cfg.rollout.num_generations] for k, v in next(it).items()},
                           task=_task(cfg), tokenizer=tok, settings=cfg.rollout, rng=jax.random.key(100 + i),
                           teacher=teacher if cfg.objective.name == "opd" else None)
            batch = jb(ro.batch)
            if cfg.objective.name == "opd":
                args = OPDArgs(**{k: v for k, v in dict(cfg.objective.args).items() if k != "selection"})
                grads.append(grad_of(lambda m, b: opd_loss(m, b, jax.random.key(0), args, teacher=teacher), batch, name))
            else:
                args = PolicyGradientArgs(**dict(cfg.objective.args))
                grads.append(grad_of(lambda m, b: policy_gradient_loss(m, b, jax.random.key(0), args), batch, name))
                r = np.asarray(ro.batch["rewards"]).reshape(-1, cfg.rollout.num_generations)
                extra.append(float(np.mean((r.min(1) < r.max(1)))))
        pair = [_cos(x, y) for x, y in itertools.combinations(grads, 2)]
        pair_sign = [_cos(np.sign(x), np.sign(y)) for x, y in itertools.combinations(grads, 2)]
        # descent direction is -g for every loss; truth is the SFT loss gradient, so cos(g, truth) > 0 = aligned
        arms[name] = {"batch_rows": int(cfg.data.batch_size), "pairwise_cos_mean": float(np.mean(pair)),
                      "pairwise_cos_sign_mean": float(np.mean(pair_sign)),
                      "cos_with_sft_truth_mean": float(np.mean([_cos(g, truth) for g in grads])),
                      "cos_sign_with_sft_truth_mean": float(np.mean([_cos(np.sign(g), np.sign(truth)) for g in grads])),
                      "grad_norm_mean": float(np.mean([np.linalg.norm(g) for g in grads]))}
        if extra:
            arms[name]["mixed_group_share"] = float(np.mean(extra))
        print(name, json.dumps(arms[name]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"student": a.student, "teacher": a.teacher, "batches": a.batches,
                                           "arms": arms}, indent=2))


def _task(cfg):
    from jaxtok.data import make_task_from_config

    return make_task_from_config(cfg.data)


if __name__ == "__main__":
    main()
