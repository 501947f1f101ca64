"""Cross-check jaxtok's on-policy distillation (``opd``, reverse KL) against TRL's ``DistillationTrainer`` on the
testbed (issue 14, item 3: the ``trl_opd`` arm).

TRL 1.16 has two on-policy distillation trainers: ``trl.experimental.gkd.GKDTrainer`` (GKD; on-policy with
probability ``lmbda``) and the stable ``trl.DistillationTrainer`` (always on-policy: the student samples every
completion). GKDTrainer itself logs, for ``lmbda=1, temperature=1``, that this configuration "is fully covered by
``DistillationTrainer``" and recommends it; this script uses ``DistillationTrainer`` with ``beta=1.0``, which its
source (``trl/kernels/chunked_divergence.py``: ``beta == 1.0`` -> mode 1, "reverse KL(p_s || p_t)") computes as
KL(student || teacher) over the full vocabulary, per completion token, reduced as ``sum / (valid completion tokens
of the batch)``: a token mean over the batch, as jaxtok's ``selected_loss(normalize_by=all)`` with rule ``all``.

Two Python environments (see ``scripts/trl_compare.py``, whose torch helpers are imported read-only here):

    # 1. jaxtok venv: HF exports of the student AND the teacher, jaxtok's OPD prompt stream (data.batch_size=64,
    #    num_generations=1 -> 64 prompts per step) and the 1200 eval prompts with jaxtok's token ids
    python scripts/trl_opd.py prepare --steps 200
    # the torch greedy eval of the exported teacher (must give the teacher's jaxtok eval, 0.995)
    /work/trl-venv/bin/python scripts/trl_opd.py eval-torch runs/trl_compare/teacher_hf
    # 2. one identical batch through both objectives: TRL samples and scores, jaxtok re-scores the same tokens
    /work/trl-venv/bin/python scripts/trl_opd.py batch-trl
    python scripts/trl_opd.py batch-jaxtok
    # 3. TRL venv: the run (writes runs/trl_compare/trl_opd_s0/trl_run.json, trl_compare's format)
    nice -n 10 /work/trl-venv/bin/python scripts/trl_opd.py train --seed 0 --steps 200
    # 4. either venv with matplotlib: json + markdown table + overlay plot against jaxtok's opd seeds
    python scripts/trl_opd.py report --jaxtok runs/testbed/pilot_opd_lr6e-4_w10 --jaxtok runs/testbed/opd_s1 \
        --jaxtok runs/testbed/opd_s2 --trl runs/trl_compare/trl_opd_s0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import trl_compare as tc  # noqa: E402  (read-only: _read_jsonl, _write_jsonl, _load_hf, torch_greedy_eval)

OPD_CONFIG = REPO / "configs/testbed/opd.yaml"
PROMPTS_PER_STEP = 64
MAX_NEW_TOKENS = 20
LR = 6e-4
WARMUP_STEPS = 10
DATA = "trl_opd_data"  # under --work: student_hf, train_prompts.jsonl, eval_prompts.jsonl, batch files


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# prepare (jaxtok venv)


def cmd_prepare(a) -> None:
    """HF exports of student and teacher, jaxtok's OPD train prompt stream and the held-out eval prompts."""
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.models.hf import convert
    from jaxtok.tasks import load_tokenizer

    work = Path(a.work)
    data = work / DATA
    cfg = load_config(OPD_CONFIG)
    for name, src, dst in (("student", a.student, data / "student_hf"), ("teacher", a.teacher, work / "teacher_hf")):
        if not (REPO / src / "summary.json").is_file():
            raise UsageError(f"--{name} {src}: no finished run directory (summary.json) there")
        if not (dst / "model.safetensors").is_file():
            convert("to-hf", str(REPO / src), str(dst))
    tok = load_tokenizer(REPO / a.student)
    task = make_task_from_config(cfg.data)
    per_step = cfg.data.batch_size // cfg.rollout.rows_per_prompt  # train/loop.py's rollout prompt batch
    assert per_step == PROMPTS_PER_STEP and cfg.rollout.num_generations == 1, (per_step, cfg.rollout)
    rows, dropped = tc.train_prompt_stream(cfg, task, tok, per_step, a.steps)
    tc._write_jsonl(data / "train_prompts.jsonl", rows)
    ev = tc.eval_prompt_rows(cfg, task, tok)
    tc._write_jsonl(data / "eval_prompts.jsonl", ev)
    print(f"prepare: {len(rows)} train prompts ({a.steps} steps x {per_step}), {len(ev)} eval prompts, "
          f"dropped overlong {dropped.count}; HF exports {data / 'student_hf'}, {work / 'teacher_hf'}")


# ----------------------------------------------------------------------------------------------------------------
# TRL side (TRL venv)


def cmd_eval_torch(a) -> None:
    """Torch greedy held-out exact match of an HF directory on the prepared eval prompts."""
    if not (Path(a.hf_dir) / "config.json").is_file():
        raise UsageError(f"{a.hf_dir}: not an HF model directory (no config.json)")
    _, _, model = tc._load_hf(a.hf_dir, a.threads)
    rows = tc._read_jsonl(Path(a.work) / DATA / "eval_prompts.jsonl")
    t0 = time.perf_counter()
    acc, texts = tc.torch_greedy_eval(model, rows)
    out = {"hf_dir": str(a.hf_dir), "eval/exact_match": acc, "num_examples": len(rows),
           "seconds": time.perf_counter() - t0, "first_completions": texts[:5]}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


def distillation_config(out_dir: str, steps: int, seed: int):
    """The ``DistillationConfig`` of the cross-check: jaxtok's configs/testbed/opd.yaml + base.yaml in TRL terms."""
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=out_dir, max_steps=steps, seed=seed, use_cpu=True, bf16=False, fp16=False,
        # optimizer: AdamW wd 0 (= Adam), lr 6e-4, linear warm-up 0 -> lr over 10 steps then constant (HF
        # constant_with_warmup gives optimizer step k the rate lr*(k-1)/10 for k <= 10, as jaxtok's optax
        # join_schedules(linear_schedule(0, lr, 10), constant)), betas 0.9/0.999, eps 1e-8, global-norm clip 1.0
        learning_rate=LR, lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP_STEPS, weight_decay=0.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        # batch: 64 prompts, one completion each, one optimizer step per generation batch, jaxtok's prompt order
        per_device_train_batch_size=PROMPTS_PER_STEP, gradient_accumulation_steps=1, shuffle_dataset=False,
        # sampling: T=1, no top-k/top-p/min-p, 20 new tokens; the divergence uses the same T=1
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        # loss: beta=1.0 -> reverse KL(p_student || p_teacher), full vocabulary, every completion token
        beta=1.0, disable_dropout=True, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, log_completions=False,
    )


def _trainer(work: Path, rows: list[dict], out_dir: str, steps: int, seed: int, threads: int, callbacks=None):
    """``(torch, tok, trainer)``: a DistillationTrainer on the exported student and teacher over ``rows``."""
    torch, tok, model = tc._load_hf(str(work / DATA / "student_hf"), threads)
    _, _, teacher = tc._load_hf(str(work / "teacher_hf"), threads)
    from datasets import Dataset
    from trl import DistillationTrainer

    # TRL tokenizes plain-text prompts with the tokenizer's own special tokens: it must give jaxtok's ids
    for r in rows[:64]:
        ids = tok(r["prompt"])["input_ids"]
        assert ids == r["prompt_ids"], (r, ids)
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1 and tok.pad_token_id == 0  # TRL left-pads prompts itself
    ds = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=distillation_config(out_dir, steps, seed),
                                  train_dataset=ds, processing_class=tok, callbacks=callbacks)
    return torch, tok, trainer


def cmd_train(a) -> None:
    """DistillationTrainer run; torch greedy held-out eval every ``--eval-every`` steps; ``trl_run.json`` in
    trl_compare's format."""
    import trl

    work = Path(a.work)
    run = work / f"trl_opd_s{a.seed}" if a.name is None else work / a.name
    rows = [r for r in tc._read_jsonl(work / DATA / "train_prompts.jsonl") if r["step"] <= a.steps]
    if len(rows) != a.steps * PROMPTS_PER_STEP:
        raise UsageError(f"--steps {a.steps}: the prepared stream has {len(rows) // PROMPTS_PER_STEP} steps; "
                         f"rerun prepare with --steps {a.steps}")
    eval_rows = tc._read_jsonl(work / DATA / "eval_prompts.jsonl")
    run.mkdir(parents=True, exist_ok=True)
    curve, step_times = [], []

    def _dump():
        hist = [h for h in trainer.state.log_history if "loss" in h]
        out = {"name": run.name, "lr": LR, "steps": a.steps, "seed": a.seed, "trl_version": trl.__version__,
               "torch_version": torch.__version__, "threads": a.threads, "curve": curve,
               "step_seconds": step_times, "log_history": hist, "config": trainer.args.to_dict(),
               "trainer": "trl.DistillationTrainer (beta=1.0: reverse KL)", "command": " ".join(sys.argv)}
        (run / "trl_run.json").write_text(json.dumps(out, indent=1, default=str))

    torch, tok, trainer = _trainer(work, rows, str(run / "trainer"), a.steps, a.seed, a.threads)
    model = trainer.model
    model._trl_cmp_decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    trainer.add_callback(tc.eval_timing_callback(model, eval_rows, steps=a.steps, eval_every=a.eval_every,
                                                 curve=curve, step_times=step_times, dump=_dump, tag="trl_opd",
                                                 dump_every=5))
    trainer.train()
    _dump()


def cmd_batch_trl(a) -> None:
    """(TRL venv) TRL samples one batch (the 64 prompts of jaxtok's step ``--step``) with its own
    ``_generate_and_score_completions`` and computes its loss and gradient with its own ``compute_loss``; saves
    tokens, loss, gradient (by HF parameter name) to ``trl_opd_data/batch_trl.npz``."""
    import numpy as np

    work = Path(a.work)
    rows = [r for r in tc._read_jsonl(work / DATA / "train_prompts.jsonl") if r["step"] == a.step]
    if not rows:
        raise UsageError(f"--step {a.step}: not in the prepared prompt stream")
    torch, tok, trainer = _trainer(work, rows, str(work / DATA / "batch_trainer"), 1, a.seed, a.threads)
    torch.manual_seed(a.seed)
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": r["prompt"]} for r in rows])
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in trainer.model.named_parameters() if p.grad is not None}
    gnorm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
    np.savez(work / DATA / "batch_trl.npz", prompt_ids=out["prompt_ids"].numpy(),
             prompt_mask=out["prompt_mask"].numpy(), completion_ids=out["completion_ids"].numpy(),
             completion_mask=out["completion_mask"].numpy(), num_items=np.float32(out["num_items_in_batch"].item()),
             loss=np.float32(loss.item()), grad_norm=np.float32(gnorm), **{"grad/" + k: v for k, v in grads.items()})
    print(json.dumps({"loss": loss.item(), "grad_norm": gnorm, "num_items_in_batch": out["num_items_in_batch"].item(),
                      "completions": tok.batch_decode(out["completion_ids"][:4], skip_special_tokens=True)}))


# ----------------------------------------------------------------------------------------------------------------
# jaxtok side of the identical-batch check (jaxtok venv)


def per_sequence_mean(per_token, valid):
    """Alternative reduction for comparison: mean over sequences of each sequence's token mean (numpy arrays
    ``per_token [B, T]``, ``valid [B, T]``; rows without a valid token are skipped)."""
    import numpy as np

    n = valid.sum(1)
    rows = n > 0
    return float(np.mean((np.where(valid, per_token, 0.0).sum(1)[rows] / n[rows])))


def cmd_batch_jaxtok(a) -> None:
    """(jaxtok venv) jaxtok's ``opd`` objective (configs/testbed/opd.yaml's arguments) on the tokens of
    ``batch_trl.npz`` with the jaxtok student and teacher; compares loss and gradient; writes ``batch_check.json``."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxtok.config import load_config
    from jaxtok.models.hf import hf_tensors, load_checkpoint
    from jaxtok.registry import OBJECTIVES
    from jaxtok.train.objectives.distill import opd_loss  # importing registers 'opd'
    from jaxtok.train.rollout import assemble

    work = Path(a.work)
    src = work / DATA / "batch_trl.npz"
    if not src.is_file():
        raise UsageError(f"{src}: missing; run batch-trl in the TRL venv first")
    z = np.load(src)
    cfg = load_config(OPD_CONFIG)
    args = OBJECTIVES.parse_args(cfg.objective.name, cfg.objective.args, "objective.args")
    model, mcfg = load_checkpoint(str(REPO / a.student))
    teacher, _ = load_checkpoint(str(REPO / a.teacher))
    B = z["prompt_ids"].shape[0]
    P, N = cfg.data.prompt_len, cfg.rollout.max_new_tokens
    prompt, pvalid = np.zeros((B, P), np.int32), np.zeros((B, P), bool)
    comp, cvalid = np.zeros((B, N), np.int32), np.zeros((B, N), bool)
    for b in range(B):  # jaxtok layout: prompt left-padded to data.prompt_len, completion right-padded to N
        ids = z["prompt_ids"][b][z["prompt_mask"][b].astype(bool)]
        prompt[b, P - len(ids):], pvalid[b, P - len(ids):] = ids, True
        c = z["completion_ids"][b][z["completion_mask"][b].astype(bool)]
        comp[b, :len(c)], cvalid[b, :len(c)] = c, True
    batch = assemble(prompt, pvalid, comp, cvalid)
    batch.update(temperature=np.ones((B,), np.float32), rewards=np.zeros((B,), np.float32))

    def loss_fn(m):
        ls, cnt, _ = opd_loss(m, batch, jax.random.key(0), args, teacher=teacher)
        return ls / cnt, (ls, cnt)

    (loss, (ls, cnt)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    gmodel = nnx.clone(model)
    nnx.update(gmodel, grads)
    g = hf_tensors(gmodel, mcfg, "float32")
    gnorm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values())))
    cos = float(sum(float((g[k].astype(np.float64) * z["grad/" + k]).sum()) for k in g) /
                (gnorm * float(z["grad_norm"]) + 1e-30))
    grad_rel = {k: float(np.linalg.norm(v - z["grad/" + k]) / max(np.linalg.norm(z["grad/" + k]), 1e-12))
                for k, v in g.items()}
    per_tok = np.asarray(_per_token_rkl(model, teacher, batch))  # [B, T-1], for the reduction comparison
    mask = np.asarray(batch["loss_mask"], bool)[:, 1:]
    res = {
        "rows": B, "completion_tokens": int(cvalid.sum()), "trl_num_items_in_batch": float(z["num_items"]),
        "eos_in_loss_rows": int(sum(1 for b in range(B) if cvalid[b].any() and comp[b, cvalid[b].sum() - 1] == 2)),
        "loss_mask_equals_completion_mask": bool((batch["loss_mask"][:, P:] == cvalid).all()
                                                 and not batch["loss_mask"][:, :P].any()),
        "loss_trl": float(z["loss"]), "loss_jaxtok": float(loss), "loss_abs_diff": abs(float(loss) - float(z["loss"])),
        "count_jaxtok": float(cnt),
        "loss_token_mean_recomputed": float(per_tok[mask].mean()),
        "loss_if_per_sequence_mean": per_sequence_mean(per_tok, mask),
        "grad_norm_trl": float(z["grad_norm"]), "grad_norm_jaxtok": gnorm, "grad_cosine": cos,
        "grad_rel_diff_max": max(grad_rel.values()),
        "grad_rel_diff_worst": sorted(grad_rel.items(), key=lambda kv: -kv[1])[:3],
    }
    print(json.dumps(res, indent=1))
    (work / DATA / "batch_check.json").write_text(json.dumps(res, indent=1))


def _per_token_rkl(model, teacher, batch):
    """Per-position reverse KL(p_S || p_T) ``[B, T-1]`` on full logits (independent of the objective's chunking)."""
    import jax
    import jax.numpy as jnp

    from jaxtok import stats

    kw = dict(positions=batch.get("positions"), valid=batch.get("valid"))
    s = model(batch["tokens"], **kw)
    t = teacher(batch["tokens"], **kw)
    s = getattr(s, "logits", s)[:, :-1].astype(jnp.float32)
    t = getattr(t, "logits", t)[:, :-1].astype(jnp.float32)
    return jax.lax.stop_gradient(stats.divergence("reverse_kl", s, t))


# ----------------------------------------------------------------------------------------------------------------
# report


def _jaxtok_curve(run: Path, start: float) -> list[dict]:
    """Held-out curve of a jaxtok run directory (``metrics.jsonl``), step 0 = the start model's accuracy."""
    recs = tc._read_jsonl(run / "metrics.jsonl")
    return [{"step": 0, "eval/exact_match": start}] + [
        {"step": r["step"], "eval/exact_match": r["eval/exact_match"]} for r in recs if "eval/exact_match" in r]


def _jaxtok_step_seconds(run: Path) -> float | None:
    """Median seconds per train step of a jaxtok run from its log records' wall clock, skipping intervals that
    hold an eval and the first (compile) interval."""
    recs = tc._read_jsonl(run / "metrics.jsonl")
    train = [r for r in recs if "loss" in r and "time" in r]
    evals = {r["step"] for r in recs if "eval/exact_match" in r}
    per = [(c["time"] - p["time"]) / (c["step"] - p["step"]) for p, c in zip(train, train[1:])
           if p["step"] not in evals and p["step"] != train[0]["step"]]
    return float(sorted(per)[len(per) // 2]) if per else None


def _median(xs):
    """The upper median of ``xs`` (None when empty)."""
    xs = sorted(xs)
    return float(xs[len(xs) // 2]) if xs else None


def cmd_report(a) -> None:
    """json + plot of jaxtok's opd seeds against the TRL runs."""
    start = json.loads((REPO / a.student / "summary.json").read_text())["eval/exact_match"]
    out = {"start_acc": start, "eval_prompts": 1200, "jaxtok": [], "trl": [], "timing": {}}
    for d in a.jaxtok:
        c = _jaxtok_curve(REPO / d, start)
        recs = tc._read_jsonl(REPO / d / "metrics.jsonl")
        out["jaxtok"].append({"run": d, "curve": c, "final_acc": c[-1]["eval/exact_match"],
                              "step_seconds_median": _jaxtok_step_seconds(REPO / d),
                              "loss": [{"step": r["step"], "loss": r["loss"]} for r in recs if "loss" in r]})
    for d in a.trl:
        t = json.loads((REPO / d / "trl_run.json").read_text())
        out["trl"].append({"run": d, "curve": t["curve"], "final_acc": t["curve"][-1]["eval/exact_match"],
                           "steps_done": len(t["step_seconds"]),
                           "step_seconds_median": _median(t["step_seconds"][1:]),
                           "loss": [{"step": h["step"], "loss": float(h["loss"])} for h in t["log_history"]]})
    out["per_step"] = per_step_table(out)
    for spec in a.timing or []:  # JAXTOK_RUN,TRL_RUN,FIRST:LAST (TRL steps that ran while the jaxtok run did)
        jd, td, window = spec.split(",")
        lo, hi = (int(x) for x in window.split(":"))
        js = _jaxtok_step_seconds(REPO / jd)
        ts = _median(json.loads((REPO / td / "trl_run.json").read_text())["step_seconds"][lo - 1:hi])
        out["timing"][f"{jd} vs {td}"] = {"jaxtok_step_s": js, "trl_step_s": ts, "trl_steps": [lo, hi],
                                          "ratio_trl_over_jaxtok": ts / js if js and ts else None}
    for name in ("batch_check", "eval_teacher", "eval_student"):
        p = REPO / a.work / DATA / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    dst = REPO / a.out
    dst.with_suffix(".json").write_text(json.dumps(out, indent=1))
    _plot(out, dst.with_suffix(".png"), " ".join(["python", *(shlex.quote(x) for x in sys.argv)]))
    print(json.dumps({side: [[round(p["eval/exact_match"], 4) for p in r["curve"]] for r in out[side]]
                      for side in ("jaxtok", "trl")}))
    print(json.dumps(out["timing"]))


def per_step_table(out: dict) -> list[dict]:
    """At each eval step of the TRL runs: jaxtok's mean / min / max over its seeds and each TRL run's accuracy."""
    rows = []
    for st in [p["step"] for p in out["trl"][0]["curve"]]:
        js = [p["eval/exact_match"] for r in out["jaxtok"] for p in r["curve"] if p["step"] == st]
        ts = [p["eval/exact_match"] for r in out["trl"] for p in r["curve"] if p["step"] == st]
        if js:
            rows.append({"step": st, "jaxtok_mean": sum(js) / len(js), "jaxtok_min": min(js), "jaxtok_max": max(js),
                         "jaxtok_seeds": len(js), "trl": ts})
    return rows


def _window_mean(loss: list[dict], st: int, width: int = 20) -> float:
    """Mean train loss over the records with step in ``(st - width, st]``."""
    xs = [r["loss"] for r in loss if st - width < r["step"] <= st]
    return sum(xs) / len(xs)


def _plot(out: dict, png: Path, command: str) -> None:
    """Left: held-out greedy exact match against the step, jaxtok's opd seeds (blue) and TRL's (red). Right: the
    train loss (reverse KL on each step's own samples), mean over the last 20 steps."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 6), dpi=100, layout="constrained")
    for side, style, colour, label in (("jaxtok", "-o", "tab:blue", "jaxtok opd"),
                                       ("trl", "--s", "tab:red", "TRL DistillationTrainer (beta=1)")):
        for n, r in enumerate(out[side]):
            ax.plot([p["step"] for p in r["curve"]], [p["eval/exact_match"] for p in r["curve"]], style,
                    color=colour, alpha=1.0 if n == 0 else 0.5, ms=5, label=f"{label}: {r['run'].split('/')[-1]}")
            xs = [q["step"] for q in r["loss"]]
            ax2.plot(xs, [_window_mean(r["loss"], x) for x in xs], style[:-1], color=colour,
                     alpha=1.0 if n == 0 else 0.5)
    ax.axhline(out["start_acc"], color="grey", lw=0.8, ls=":", label=f"start model {out['start_acc']:.3f}")
    ax.set_xlabel("optimizer step (64 prompts x 1 on-policy completion each)")
    ax.set_ylabel(f"held-out greedy exact match (fraction of {out['eval_prompts']} prompts)")
    ax.set_title("On-policy distillation (reverse KL, lr 6e-4, warm-up 10): jaxtok vs TRL, same prompts")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("train loss: reverse KL per completion token (mean of the last 20 steps)")
    ax2.set_title("training objective on each step's own on-policy samples")
    for a_ in (ax, ax2):
        a_.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.supxlabel("\n".join(textwrap.wrap(f"made by: {command}", 140, subsequent_indent="    ")), fontsize=7,
                  color="0.3", x=0.01, ha="left", family="monospace")
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs/trl_compare"), help="exchange / run folder")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="(jaxtok venv) HF exports of student + teacher, prompt files")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--teacher", default="runs/testbed/teacher")
    s.add_argument("--steps", type=int, default=200)
    s.set_defaults(fn=cmd_prepare)
    s = sub.add_parser("eval-torch", help="(TRL venv) torch greedy held-out exact match of an HF directory")
    s.add_argument("hf_dir")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_eval_torch)
    s = sub.add_parser("train", help="(TRL venv) DistillationTrainer run, held-out eval every --eval-every steps")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default=None, help="run folder under --work (default trl_opd_s<seed>)")
    s.add_argument("--eval-every", type=int, default=25, help="0: no evaluation (timing runs)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("batch-trl", help="(TRL venv) one TRL batch: tokens, loss, gradient")
    s.add_argument("--step", type=int, default=1, help="use the prompts of this jaxtok step")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=cmd_batch_trl)
    s = sub.add_parser("batch-jaxtok", help="(jaxtok venv) jaxtok's opd objective on batch_trl.npz, compared")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--teacher", default="runs/testbed/teacher")
    s.set_defaults(fn=cmd_batch_jaxtok)
    s = sub.add_parser("report", help="json + overlay plot of jaxtok opd vs TRL runs")
    s.add_argument("--jaxtok", action="append", required=True, help="jaxtok opd run dir (repeat per seed)")
    s.add_argument("--trl", action="append", required=True, help="TRL run dir with trl_run.json (repeat)")
    s.add_argument("--timing", action="append", help="JAXTOK_RUN,TRL_RUN,FIRST:LAST: TRL steps FIRST..LAST ran during the jaxtok run")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--out", default="docs/results/trl_opd")
    s.set_defaults(fn=cmd_report)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except UsageError as e:
        print(f"trl_opd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
