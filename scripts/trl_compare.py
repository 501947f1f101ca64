"""Cross-check jaxtok's GRPO against TRL's ``GRPOTrainer`` on the testbed (issue 14, item 3).

Two Python environments take part: jaxtok's own (``.venv``, no torch) and a separate one with TRL, torch and
transformers (``/work/trl-venv``; TRL/torch are an optional extra used only by this script). They exchange plain
files under ``--work`` (default ``runs/trl_compare``):

    # 1. jaxtok venv: the HF export of the student, the exact prompt stream jaxtok's GRPO loop draws (train split,
    #    shuffled; by default configs/testbed/grpo.yaml's data.batch_size / num_generations = 128 prompts per step,
    #    written to data/train_prompts_p128.jsonl; the first small setting: --prompts-per-step 8, data/train_prompts.jsonl)
    #    and the 1200 held-out eval prompts, with jaxtok's token ids
    python scripts/trl_compare.py prepare --steps 250
    # 2. TRL venv: GRPOTrainer on those prompts (same reward, group, lr, warm-up, Adam betas/eps, clip, no KL, one
    #    optimizer step per generation batch), a torch greedy held-out eval every 25 steps; lr, warm-up and prompts
    #    per step default to grpo.yaml's (6e-4, 10 steps linear from 0 then constant, 128)
    nice -n 10 /work/trl-venv/bin/python scripts/trl_compare.py train --steps 250 --seed 0 --name trl_b1024_s0
    # the first (small) setting: 8 prompts per step, constant lr without warm-up
    /work/trl-venv/bin/python scripts/trl_compare.py train --prompts-per-step 8 --warmup-steps 0 --lr 2e-4 \
        --steps 100 --name trl_lr2e-4
    # the torch greedy eval on the start model (must equal jaxtok eval's exact match on the same 1200 prompts)
    /work/trl-venv/bin/python scripts/trl_compare.py eval-torch runs/trl_compare/student_hf
    # 3. jaxtok venv: the matching jaxtok run, then the report (json, markdown, overlay plot)
    nice -n 10 jaxtok train configs/testbed/grpo.yaml optimizer.lr=2e-4 train.steps=100 \
        run.out_dir=runs/trl_compare run.name=jaxtok_lr2e-4
    python scripts/trl_compare.py report --pair 2e-4=runs/trl_compare/jaxtok_lr2e-4,runs/trl_compare/trl_lr2e-4 \
        --out docs/results/trl_compare

``batch-check`` (both environments in turn) compares the two objectives on one identical rollout batch: TRL's
sampled completions are scored by TRL (advantages, per-token log-probs, loss, gradient norm) and written to a
file; jaxtok's objective then runs on the same tokens and rewards and the two are compared number by number.

Only ``prepare`` and the jaxtok half of ``batch-check`` import jaxtok; the reward in the TRL environment is the
task's own ``MarkedAnswerTask.reward`` loaded from ``jaxtok/tasks/base.py`` by file path (it needs numpy only),
so both sides score completions with the same code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs/testbed/base.yaml"
GRPO_CONFIG = REPO / "configs/testbed/grpo.yaml"
PROMPTS_PER_STEP = 8  # the first (small) setting; the working setting reads the config (128), see _grpo_setting
NUM_GENERATIONS = 8
MAX_NEW_TOKENS = 20
BOS_TEXT = "<bos>"


# ----------------------------------------------------------------------------------------------------------------
# shared helpers (no jaxtok / torch imports)


def _task_base():
    """``jaxtok/tasks/base.py`` loaded by path (numpy only): the arith task's reward is ``MarkedAnswerTask.reward``."""
    spec = importlib.util.spec_from_file_location("_jaxtok_task_base", REPO / "jaxtok/tasks/base.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _grpo_setting() -> dict:
    """Prompts per step, learning rate and warm-up of ``configs/testbed/grpo.yaml`` (its sections laid over
    ``base.yaml``'s, read with plain yaml so the TRL venv needs no jaxtok): the defaults of ``prepare`` / ``train``."""
    import yaml

    base = yaml.safe_load(BASE_CONFIG.read_text())
    cfg = yaml.safe_load(GRPO_CONFIG.read_text())
    sec = {k: {**(base.get(k) or {}), **(cfg.get(k) or {})} for k in ("data", "rollout", "optimizer")}
    return {"prompts_per_step": int(sec["data"]["batch_size"]) // int(sec["rollout"]["num_generations"]),
            "lr": float(sec["optimizer"]["lr"]), "warmup_steps": int(sec["optimizer"].get("warmup_steps", 0))}


def train_prompts_path(work: Path, prompts_per_step: int) -> Path:
    """The prompt-stream file ``prepare`` writes for ``prompts_per_step`` prompts per step (the first 8-prompt
    setting keeps its original name)."""
    name = "train_prompts.jsonl" if prompts_per_step == PROMPTS_PER_STEP else f"train_prompts_p{prompts_per_step}.jsonl"
    return Path(work) / "data" / name


def _usage_exit(msg: str) -> None:
    """Bad input: the message on stderr, exit status 2."""
    print(msg, file=sys.stderr)
    sys.exit(2)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# prepare (jaxtok venv)


def train_prompt_stream(cfg, task, tok, per_step: int, steps: int) -> tuple[list[dict], object]:
    """The exact train prompt stream jaxtok's loop draws (``cfg.data``: shuffled with ``data.seed``, ``per_step``
    prompts per rollout batch) for ``steps`` steps, one row per prompt ``{step, index, prompt, answer, prompt_ids}``
    with jaxtok's token ids; and the dataset's dropped-overlong counter."""
    from jaxtok.data import prompt_dataset

    ds, dropped = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=per_step,
                                 num_examples=cfg.data.num_train, seed=cfg.data.seed, shuffle=True, num_epochs=None,
                                 drop_remainder=True, overlong=cfg.data.overlong)
    it, rows = iter(ds), []
    for step in range(1, steps + 1):
        batch = next(it)
        for r in range(per_step):
            idx = int(batch["index"][r])
            ex = task.example("train", idx)
            ids = [int(t) for t, v in zip(batch["prompt"][r], batch["prompt_valid"][r]) if v]
            rows.append({"step": step, "index": idx, "prompt": ex.prompt, "answer": ex.answer, "prompt_ids": ids})
    return rows, dropped


def eval_prompt_rows(cfg, task, tok) -> list[dict]:
    """The held-out prompts ``jaxtok eval`` scores (the first ``data.num_eval`` eval examples) with their ids."""
    from jaxtok.data import capped, prompt_ids

    rows = []
    for i in range(capped(task, "eval", cfg.data.num_eval)):
        ex = task.example("eval", i)
        rows.append({"index": i, "prompt": ex.prompt, "answer": ex.answer, "prompt_ids": prompt_ids(tok, ex)})
    return rows


def cmd_prepare(a) -> None:
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.tasks import load_tokenizer

    work = Path(a.work)
    cfg = load_config(GRPO_CONFIG)
    tok = load_tokenizer(REPO / a.student)
    task = make_task_from_config(cfg.data)
    hf_dir = work / "student_hf"
    if not (hf_dir / "model.safetensors").is_file():
        from jaxtok.models.hf import convert

        convert("to-hf", str(REPO / a.student), str(hf_dir))
    # the exact train prompt stream of jaxtok's loop at data.batch_size = per_step x rows_per_prompt: batch_size //
    # rows_per_prompt prompts per rollout batch (data.seed fixes it; train.seed does not change it)
    per_step = a.prompts_per_step or cfg.data.batch_size // cfg.rollout.rows_per_prompt
    assert cfg.rollout.num_generations == NUM_GENERATIONS, cfg.rollout
    rows, dropped = train_prompt_stream(cfg, task, tok, per_step, a.steps)
    _write_jsonl(train_prompts_path(work, per_step), rows)
    ev = eval_prompt_rows(cfg, task, tok)
    _write_jsonl(work / "data/eval_prompts.jsonl", ev)
    print(f"prepare: {len(rows)} train prompts ({a.steps} steps x {per_step}) -> {train_prompts_path(work, per_step)}, "
          f"{len(ev)} eval prompts, "
          f"dropped overlong {dropped.count}; HF export {hf_dir}")


# ----------------------------------------------------------------------------------------------------------------
# torch side (TRL venv)


def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def torch_greedy_eval(model, eval_rows: list[dict], *, batch_size: int = 400, eos_id: int = 2, pad_id: int = 0):
    """Held-out greedy exact match of a torch causal LM on jaxtok's eval prompts (their jaxtok token ids, left-padded
    as jaxtok pads them), ``MAX_NEW_TOKENS`` new tokens, stop at ``<eos>``, scored by the task's own reward.

    A plain no-cache greedy loop with explicit positions ``cumsum(valid) - 1`` (jaxtok's convention) so nothing
    depends on ``generate``'s handling of left padding. Returns ``(exact_match, completions)``."""
    import torch

    base = _task_base()
    task = base.MarkedAnswerTask()
    was_training = model.training
    model.eval()
    hits, texts = 0, []
    tok_decode = getattr(model, "_trl_cmp_decode")
    with torch.no_grad():
        for start in range(0, len(eval_rows), batch_size):
            rows = eval_rows[start:start + batch_size]
            P = max(len(r["prompt_ids"]) for r in rows)
            ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
            valid = torch.zeros((len(rows), P), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["prompt_ids"])
                ids[i, P - n:] = torch.tensor(r["prompt_ids"])
                valid[i, P - n:] = 1
            done = torch.zeros(len(rows), dtype=torch.bool)
            out = []
            for _ in range(MAX_NEW_TOKENS):
                pos = (valid.cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=valid, position_ids=pos).logits[:, -1].float()
                nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
                out.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                valid = torch.cat([valid, (~done).long()[:, None]], 1)
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
            gen = torch.stack(out, 1).tolist()
            for r, g in zip(rows, gen):
                g = g[:g.index(eos_id)] if eos_id in g else g
                text = tok_decode(g)
                texts.append(text)
                hits += task.reward(text, base.Example(prompt=r["prompt"], target="", answer=r["answer"])) >= 1.0
    if was_training:
        model.train()
    return hits / len(eval_rows), texts


def _load_hf(hf_dir: str, threads: int):
    torch = _torch_setup(threads)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model._trl_cmp_decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    return torch, tok, model


def cmd_eval_torch(a) -> None:
    work = Path(a.work)
    _, _, model = _load_hf(a.hf_dir, a.threads)
    rows = _read_jsonl(work / "data/eval_prompts.jsonl")
    t0 = time.perf_counter()
    acc, texts = torch_greedy_eval(model, rows)
    out = {"hf_dir": str(a.hf_dir), "eval/exact_match": acc, "num_examples": len(rows),
           "seconds": time.perf_counter() - t0, "first_completions": texts[:5]}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


def eval_timing_callback(model, eval_rows, *, steps: int, eval_every: int, curve: list, step_times: list, dump,
                         tag: str, dump_every: int = 0):
    """The one TRL-side bookkeeping of ``train`` runs (this script's GRPO and ``trl_opd.py``'s distillation): the
    torch greedy held-out exact match of ``model`` at step 0 (now) and every ``eval_every`` steps and the last into
    ``curve``, each optimizer step's wall seconds into ``step_times``, ``dump()`` after every eval (and every
    ``dump_every`` steps when > 0). ``eval_every=0``: no evaluation (timing runs). Returns a ``TrainerCallback``."""
    from transformers import TrainerCallback

    def evaluate(step: int) -> None:
        acc, _ = torch_greedy_eval(model, eval_rows)
        curve.append({"step": step, "eval/exact_match": acc})
        print(f"[{tag}] step {step} held-out greedy exact match {acc:.4f}", flush=True)

    class EvalTimer(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)
            step = state.global_step
            evaluated = bool(eval_every) and (step % eval_every == 0 or step == steps)
            if evaluated:
                evaluate(step)
            if evaluated or (dump_every and step % dump_every == 0):
                dump()

    if eval_every:
        evaluate(0)
    return EvalTimer()


def cmd_train(a) -> None:
    torch, tok, model = _load_hf(str(Path(a.work) / "student_hf"), a.threads)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    import trl

    work = Path(a.work)
    run = work / a.name
    run.mkdir(parents=True, exist_ok=True)
    per_step = a.prompts_per_step
    src = train_prompts_path(work, per_step)
    if not src.is_file():
        _usage_exit(f"train: {src} missing: run `python scripts/trl_compare.py prepare --prompts-per-step "
                    f"{per_step}` in the jaxtok venv first")
    train_rows = [r for r in _read_jsonl(src) if r["step"] <= a.steps]
    eval_rows = _read_jsonl(work / "data/eval_prompts.jsonl")
    if len(train_rows) != a.steps * per_step:
        _usage_exit(f"train: {src} holds {len(train_rows)} prompts for {a.steps} steps x {per_step}: prepare more --steps")
    # TRL tokenizes plain-text prompts with the tokenizer's own special tokens: it must give jaxtok's ids (<bos> first)
    for r in train_rows[:64] + eval_rows[:64]:
        ids = tok(r["prompt"])["input_ids"]
        assert ids == r["prompt_ids"], (r, ids)
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1 and tok.pad_token_id == 0
    base = _task_base()
    task = base.MarkedAnswerTask()
    rollout_log = []

    def exact_match(prompts, completions, answer, **kw):
        return [task.reward(c, base.Example(prompt=p, target="", answer=ans))
                for p, c, ans in zip(prompts, completions, answer)]

    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows])
    args = GRPOConfig(
        output_dir=str(run / "trainer"), max_steps=a.steps, seed=a.seed, use_cpu=True, bf16=False, fp16=False,
        # optimizer: Adam(W) without weight decay, constant lr after a linear warm-up from 0 (none: --warmup-steps 0),
        # global-norm clip 1.0 (jaxtok: optax.adamw, wd 0, schedule constant with optimizer.warmup_steps linear from
        # 0, grad_clip 1.0 from configs/testbed/base.yaml)
        learning_rate=a.lr, lr_scheduler_type="constant_with_warmup" if a.warmup_steps else "constant",
        warmup_steps=a.warmup_steps, weight_decay=0.0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        # batch: per_step prompts x 8 completions, one optimizer step per generation batch, on-policy
        per_device_train_batch_size=per_step * NUM_GENERATIONS, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=NUM_GENERATIONS, shuffle_dataset=False,
        # sampling: T=1, no top-k/top-p/min-p, 20 new tokens
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        # loss: group z-score advantages (torch.std: Bessel), PPO clip 0.2, seq-mean-token-mean, no KL
        loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=0.0, mask_truncated_completions=False,
        importance_sampling_level="token", disable_dropout=True, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, log_completions=False,
    )
    curve, step_times = [], []

    def _dump():
        hist = [h for h in trainer.state.log_history if "reward" in h or "loss" in h]
        out = {"name": a.name, "lr": a.lr, "steps": a.steps, "seed": a.seed, "prompts_per_step": per_step,
               "num_generations": NUM_GENERATIONS, "rows_per_step": per_step * NUM_GENERATIONS,
               "warmup_steps": a.warmup_steps, "trl_version": trl.__version__,
               "torch_version": torch.__version__, "threads": a.threads, "curve": curve,
               "step_seconds": step_times, "log_history": hist, "config": args.to_dict()}
        (run / "trl_run.json").write_text(json.dumps(out, indent=1, default=str))

    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match], args=args, train_dataset=ds,
                          processing_class=tok)
    trainer.add_callback(eval_timing_callback(trainer.model, eval_rows, steps=a.steps, eval_every=a.eval_every,
                                              curve=curve, step_times=step_times, dump=_dump, tag="trl_compare"))
    trainer.train()
    _dump()
    if a.save:
        trainer.model.save_pretrained(str(run / "final_hf"))
        tok.save_pretrained(str(run / "final_hf"))


# ----------------------------------------------------------------------------------------------------------------
# one identical rollout batch through both objectives


def cmd_batch_trl(a) -> None:
    """(TRL venv) TRL samples and scores one rollout batch (the prompts of jaxtok's step ``--step``) with its own
    ``_generate_and_score_completions`` and ``_compute_loss``; saves tokens, rewards, advantages, per-token
    log-probs, the loss and the gradient (by HF parameter name, before clipping) to ``batch_trl.npz``."""
    import numpy as np

    torch, tok, model = _load_hf(str(Path(a.work) / "student_hf"), a.threads)
    torch.manual_seed(a.seed)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    work = Path(a.work)
    rows = [r for r in _read_jsonl(work / "data/train_prompts.jsonl") if r["step"] == a.step]
    base = _task_base()
    task = base.MarkedAnswerTask()

    def exact_match(prompts, completions, answer, **kw):
        return [task.reward(c, base.Example(prompt=p, target="", answer=ans))
                for p, c, ans in zip(prompts, completions, answer)]

    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(output_dir=str(work / "batch_check_trainer"), max_steps=1, use_cpu=True, bf16=False,
                      fp16=False, learning_rate=2e-4, lr_scheduler_type="constant", weight_decay=0.0,
                      per_device_train_batch_size=64, gradient_accumulation_steps=1, steps_per_generation=1,
                      num_iterations=1, num_generations=8, shuffle_dataset=False, max_completion_length=20,
                      temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", scale_rewards="group", beta=0.0,
                      epsilon=0.2, disable_dropout=True, gradient_checkpointing=False, report_to=[],
                      save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match], args=args, train_dataset=ds, processing_class=tok)
    inputs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows for _ in range(NUM_GENERATIONS)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    completions = tok.batch_decode([c[m.bool()] for c, m in zip(out["completion_ids"], out["completion_mask"])],
                                   skip_special_tokens=True)
    rewards = exact_match([x["prompt"] for x in inputs], completions, [x["answer"] for x in inputs])
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                                  out["completion_ids"].size(1), compute_entropy=True)
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which is not running here
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in trainer.model.named_parameters() if p.grad is not None}
    gnorm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
    np.savez(work / "batch_trl.npz", prompt_ids=out["prompt_ids"].numpy(), prompt_mask=out["prompt_mask"].numpy(),
             completion_ids=out["completion_ids"].numpy(), completion_mask=out["completion_mask"].numpy(),
             advantages=out["advantages"].numpy(), rewards=np.asarray(rewards, np.float32),
             logps=logps.numpy(), entropy=ent.numpy(), loss=np.float32(loss.item()), grad_norm=np.float32(gnorm),
             **{"grad/" + k: v for k, v in grads.items()})
    print(json.dumps({"loss": loss.item(), "grad_norm": gnorm, "reward_mean": float(np.mean(rewards)),
                      "completions": completions[:8]}))


def cmd_batch_jaxtok(a) -> None:
    """(jaxtok venv) jaxtok's rollout assembly, behaviour scoring and ``policy_gradient`` objective (grpo mode, the
    testbed's arguments) on the tokens and rewards of ``batch_trl.npz``; prints the comparison and writes
    ``batch_check.json``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxtok.config import load_config
    from jaxtok.registry import OBJECTIVES
    from jaxtok.models.hf import hf_tensors, load_checkpoint
    from jaxtok.train.objectives.policy_gradient import policy_gradient_loss
    from jaxtok.train.rollout import assemble, score_rollout

    work = Path(a.work)
    z = np.load(work / "batch_trl.npz")
    cfg = load_config(GRPO_CONFIG)
    args = OBJECTIVES.parse_args(cfg.objective.name, cfg.objective.args, "objective.args")
    model, mcfg = load_checkpoint(str(REPO / a.student))
    B = z["prompt_ids"].shape[0]
    P, N = cfg.data.prompt_len, cfg.rollout.max_new_tokens
    prompt = np.zeros((B, P), np.int32)
    pvalid = np.zeros((B, P), bool)
    comp = np.zeros((B, N), np.int32)
    cvalid = np.zeros((B, N), bool)
    for b in range(B):  # jaxtok layout: prompt left-padded to data.prompt_len, completion right-padded to N
        ids = z["prompt_ids"][b][z["prompt_mask"][b].astype(bool)]
        prompt[b, P - len(ids):], pvalid[b, P - len(ids):] = ids, True
        c = z["completion_ids"][b][z["completion_mask"][b].astype(bool)]
        comp[b, :len(c)], cvalid[b, :len(c)] = c, True
    batch = assemble(prompt, pvalid, comp, cvalid)
    temperature = np.ones((B,), np.float32)
    batch.update(score_rollout(model, batch, temperature, chunk_size=args.chunk_size))
    batch.update(rewards=z["rewards"].astype(np.float32), accuracy=z["rewards"].astype(np.float32),
                 group_ids=(np.arange(B) // NUM_GENERATIONS).astype(np.int32), temperature=temperature,
                 max_new_tokens=np.full((B,), N, np.int32), on_policy=np.ones((B,), bool))

    def loss_fn(m):
        ls, cnt, aux = policy_gradient_loss(m, batch, jax.random.key(0), args)
        return ls / cnt, (cnt, aux)

    (loss, (cnt, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    from jaxtok.train.objectives.policy_gradient import sequence_advantages

    adv = np.asarray(sequence_advantages(batch["rewards"], batch["group_ids"], args.estimator, eps=args.adv_eps))
    gmodel = nnx.clone(model)
    nnx.update(gmodel, grads)
    g = hf_tensors(gmodel, mcfg, "float32")
    gnorm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values())))
    # per-token log-probs of the completion tokens, aligned: jaxtok column P + j scores completion token j
    lp_j = batch["old_logprobs"][:, P:]
    cm = z["completion_mask"].astype(bool)
    lp_t = np.zeros_like(lp_j)
    for b in range(B):
        lp_t[b, :cm[b].sum()] = z["logps"][b][cm[b]]
    diff_lp = np.abs(lp_j - lp_t)[cvalid]
    grad_rel = {}
    for k, v in g.items():
        t = z["grad/" + k]
        grad_rel[k] = float(np.linalg.norm(v - t) / max(np.linalg.norm(t), 1e-12))
    cos = float(sum(float((g[k] * z["grad/" + k]).sum()) for k in g) /
                (gnorm * float(z["grad_norm"]) + 1e-30))
    res = {
        "rows": B, "prompt_len": P, "completion_tokens": int(cvalid.sum()),
        "eos_in_loss_rows": int(sum(1 for b in range(B) if cvalid[b].any() and comp[b, cvalid[b].sum() - 1] == 2)),
        "loss_mask_equals_completion_mask": bool((batch["loss_mask"][:, P:] == cvalid).all()
                                                 and not batch["loss_mask"][:, :P].any()),
        "reward_mean": float(z["rewards"].mean()),
        "advantages_max_abs_diff": float(np.max(np.abs(adv - z["advantages"]))),
        "advantages_trl_first_group": [round(float(x), 4) for x in z["advantages"][:8]],
        "advantages_jaxtok_first_group": [round(float(x), 4) for x in adv[:8]],
        "logp_max_abs_diff": float(diff_lp.max()), "logp_mean_abs_diff": float(diff_lp.mean()),
        "loss_trl": float(z["loss"]), "loss_jaxtok": float(loss), "count_jaxtok": float(cnt),
        "grad_norm_trl": float(z["grad_norm"]), "grad_norm_jaxtok": gnorm, "grad_cosine": cos,
        "grad_rel_diff_max": max(grad_rel.values()),
        "grad_rel_diff_worst": sorted(grad_rel.items(), key=lambda kv: -kv[1])[:3],
    }
    print(json.dumps(res, indent=1))
    (work / "batch_check.json").write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# gradient signal-to-noise of the GRPO step at the start model (jaxtok venv)


def cmd_grad_snr(a) -> None:
    """Draw ``--batches`` independent GRPO rollout batches (8 prompts x 8 completions, the testbed settings) from the
    start model with jaxtok's own collector and objective, and measure how much of one step's gradient is signal:
    ``|E g|^2`` (unbiased: ``|mean g|^2 - tr(Cov)/K``) against the per-batch noise ``E|g - E g|^2``, and the share
    of coordinates whose per-batch gradient sign agrees with the mean gradient's (Adam's early steps are close to
    sign steps). Writes ``grad_snr.json``."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.models.hf import load_checkpoint
    from jaxtok.registry import OBJECTIVES
    from jaxtok.tasks import load_tokenizer
    from jaxtok.train.objectives.policy_gradient import policy_gradient_loss
    from jaxtok.train.rollout import collect

    cfg = load_config(GRPO_CONFIG)
    args = OBJECTIVES.parse_args(cfg.objective.name, cfg.objective.args, "objective.args")
    tok = load_tokenizer(REPO / a.student)
    task = make_task_from_config(cfg.data)
    model, _ = load_checkpoint(str(REPO / a.student))
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=a.prompts,
                           num_examples=cfg.data.num_train, seed=a.seed, shuffle=True, num_epochs=None,
                           drop_remainder=True)
    it = iter(ds)
    settings = cfg.rollout

    def loss_fn(m, batch):
        ls, cnt, _ = policy_gradient_loss(m, batch, jax.random.key(0), args)
        return ls / cnt

    grad_fn = nnx.jit(nnx.grad(loss_fn))
    gs, rewards, mixed = [], [], []
    for k in range(a.batches):
        ro = collect(model, next(it), task=task, tokenizer=tok, settings=settings, rng=jax.random.key(1000 + k))
        batch = {key: v for key, v in ro.batch.items()}
        g = grad_fn(model, batch)
        gs.append(np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(g)]).astype(np.float64))
        r = ro.batch["rewards"].reshape(-1, settings.num_generations)
        rewards.append(float(r.mean()))
        mixed.append(float(np.mean(r.max(1) > r.min(1))))
    G = np.stack(gs)  # [K, D]
    K = G.shape[0]
    mean = G.mean(0)
    noise = float(((G - mean) ** 2).sum(1).mean() * K / (K - 1))  # E|g - Eg|^2 (unbiased)
    signal = float(max((mean ** 2).sum() - noise / K, 0.0))  # |E g|^2 (unbiased)
    agree = []  # leave-one-out: batch k's gradient sign against the mean of the other K - 1 batches
    for k in range(K):
        rest = (mean * K - G[k]) / (K - 1)
        nz = (np.abs(rest) > 0) & (np.abs(G[k]) > 0)
        agree.append(float((np.sign(G[k][nz]) == np.sign(rest[nz])).mean()))
    sign_agree = float(np.mean(agree))
    res = {"batches": K, "prompts_per_batch": a.prompts, "rows_per_batch": a.prompts * settings.num_generations,
           "sampled_acc_mean": float(np.mean(rewards)), "mixed_group_share": float(np.mean(mixed)),
           "per_batch_grad_norm_mean": float(np.linalg.norm(G, axis=1).mean()),
           "signal_norm_sq": signal, "noise_norm_sq_per_batch": noise,
           "snr_per_batch": signal / noise if noise else None,
           "batches_for_snr_1": noise / signal if signal else None,
           "sign_agreement_leave_one_out": sign_agree}
    print(json.dumps(res, indent=1))
    (Path(a.work) / "grad_snr.json").write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# report (either venv: json + matplotlib)


def _jaxtok_run(run: Path, start_acc: float) -> dict:
    """Curve, sampled-accuracy trace and median step time of a jaxtok run directory (``metrics.jsonl``)."""
    recs = _read_jsonl(run / "metrics.jsonl")
    curve = [{"step": 0, "eval/exact_match": start_acc}]
    curve += [{"step": r["step"], "eval/exact_match": r["eval/exact_match"]} for r in recs if "eval/exact_match" in r]
    train = [r for r in recs if "loss" in r]
    evals = {r["step"] for r in recs if "eval/exact_match" in r}
    per_step = []  # seconds per step from the log records' wall clock, skipping intervals that hold an eval or
    for prev, cur in zip(train, train[1:]):  # the first (compile) interval
        if prev["step"] in evals or prev["step"] == train[0]["step"]:
            continue
        per_step.append((cur["time"] - prev["time"]) / (cur["step"] - prev["step"]))
    sampled = [{"step": r["step"], "rollout/exact_match": r["rollout/exact_match"], "grad_norm": r["grad_norm"]}
               for r in train]
    return {"run": str(run), "curve": curve, "sampled": sampled,
            "step_seconds_median": float(sorted(per_step)[len(per_step) // 2]) if per_step else None,
            "step_seconds_samples": len(per_step)}


def _trl_run(run: Path) -> dict:
    d = json.loads((run / "trl_run.json").read_text())
    st = sorted(d["step_seconds"][1:])  # the first step pays start-up costs
    hist = [h for h in d["log_history"] if "reward" in h]
    sampled = [{"step": i + 1, "rollout/exact_match": float(h["reward"]), "grad_norm": float(h["grad_norm"])}
               for i, h in enumerate(hist)]
    return {"run": str(run), "curve": d["curve"], "sampled": sampled, "trl_version": d["trl_version"],
            "torch_version": d["torch_version"], "threads": d["threads"],
            "step_seconds_median": float(st[len(st) // 2]) if st else None, "step_seconds_samples": len(st)}


def cmd_reward_windows(a) -> None:
    """Mean sampled (T=1) rollout accuracy per ``--every``-step window up to ``--upto`` of jaxtok runs
    (``metrics.jsonl``, logged every ``log_every`` steps) and TRL runs (``trl_run.json``, every step)."""
    for d in a.runs:
        run = REPO / d
        sampled = (_trl_run(run) if (run / "trl_run.json").is_file() else _jaxtok_run(run, float("nan")))["sampled"]
        means = [_window_mean(sampled, lo, lo + a.every - 1) for lo in range(1, a.upto + 1, a.every)]
        print(d, " ".join("-" if m is None else f"{m:.3f}" for m in means))


def _window_mean(sampled: list[dict], lo: int, hi: int) -> float | None:
    xs = [s["rollout/exact_match"] for s in sampled if lo <= s["step"] <= hi]
    return sum(xs) / len(xs) if xs else None


def _side(runs: list[dict], start: float) -> dict:
    """Seeds of one side of a pair: each run with its final accuracy and windows of sampled accuracy, plus the
    mean curve over seeds (same eval steps)."""
    for r in runs:
        last = r["curve"][-1]["step"]
        r["final_acc"] = r["curve"][-1]["eval/exact_match"]
        r["gain_pp"] = 100 * (r["final_acc"] - start)
        r["sampled_acc_steps_1_20"] = _window_mean(r["sampled"], 1, 20)
        r["sampled_acc_last_20"] = _window_mean(r["sampled"], last - 19, last)
    steps = [p["step"] for p in runs[0]["curve"]]
    mean_curve = [{"step": st, "eval/exact_match": sum(
        next(p["eval/exact_match"] for p in r["curve"] if p["step"] == st) for r in runs) / len(runs)}
        for st in steps if all(any(p["step"] == st for p in r["curve"]) for r in runs)]
    finals = [r["final_acc"] for r in runs]
    return {"seeds": runs, "mean_curve": mean_curve, "final_acc_mean": sum(finals) / len(finals),
            "gain_pp_mean": 100 * (sum(finals) / len(finals) - start)}


def cmd_report(a) -> None:
    start = json.loads((REPO / a.student / "summary.json").read_text())["eval/exact_match"]
    out = {"start_acc": start, "eval_prompts": 1200, "pairs": {}, "timing": {}, "notes": a.note or []}
    for key, path in (("batch_check", a.batch_check), ("torch_eval_check", a.torch_eval_check),
                      ("grad_snr", a.grad_snr)):
        if path and Path(path).is_file():
            out[key] = json.loads(Path(path).read_text())
    for spec in a.pair:
        lr, runs = spec.split("=", 1)
        jax_dirs, trl_dirs = runs.split(",")
        j = _side([_jaxtok_run(REPO / d, start) for d in jax_dirs.split("+")], start)
        t = _side([_trl_run(REPO / d) for d in trl_dirs.split("+")], start)
        out["pairs"][lr] = {"lr": float(lr), "jaxtok": j, "trl": t}
    for spec in a.timing or []:  # JAXTOK_RUN,TRL_RUN[,FIRST:LAST] that ran at the same time on the same machine
        jd, td, *window = spec.split(",")
        js = _jaxtok_run(REPO / jd, start)["step_seconds_median"]
        st = json.loads((REPO / td / "trl_run.json").read_text())["step_seconds"]
        lo, hi = (int(x) for x in window[0].split(":")) if window else (2, len(st))  # TRL steps, 1-based
        sel = sorted(st[lo - 1:hi])
        ts = sel[len(sel) // 2]
        out["timing"][f"{jd} vs {td}"] = {"jaxtok_step_s": js, "trl_step_s": ts, "trl_steps": [lo, hi],
                                          "ratio_trl_over_jaxtok": ts / js}
    dst = REPO / a.out
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot_report(out, dst.with_suffix(".png"), " ".join(["python", *(shlex.quote(x) for x in sys.argv)]))
    print(json.dumps({lr: {side: [[p["eval/exact_match"] for p in r["curve"]] for r in pr[side]["seeds"]]
                           for side in ("jaxtok", "trl")} for lr, pr in out["pairs"].items()}))
    print(json.dumps(out["timing"]))


def plot_report(out: dict, png: Path, command: str) -> None:
    """The overlay plot of a report (``out``: the dict written to ``<out>.json``): held-out greedy exact match and
    rollout accuracy against the step, jaxtok and TRL at each lr, one legend above both panels; 1500 x 650 px,
    ``made by: <command>`` under it."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = out["start_acc"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), dpi=100, layout="constrained")
    colours = {"jaxtok": ["tab:blue", "tab:cyan"], "trl": ["tab:red", "tab:orange"]}
    for i, (lr, pr) in enumerate(out["pairs"].items()):
        for side, style, label in (("jaxtok", "-o", "jaxtok"), ("trl", "--s", "TRL GRPOTrainer")):
            c = colours[side][i % 2]
            for n, r in enumerate(pr[side]["seeds"]):
                xs = [p["step"] for p in r["curve"]]
                ys = [p["eval/exact_match"] for p in r["curve"]]
                axes[0].plot(xs, ys, style, color=c, alpha=1.0 if n == 0 else 0.45, ms=5,
                             label=f"{label}, lr {lr}" + (f" (seed {n})" if len(pr[side]["seeds"]) > 1 else ""))
                sm = r["sampled"]
                xs2 = [q["step"] for q in sm]  # mean sampled accuracy over the last 20 steps (both sides)
                ys2 = [_window_mean(sm, st - 19, st) for st in xs2]
                axes[1].plot(xs2, ys2, style[:2] if style.startswith("--") else "-", color=c,
                             alpha=1.0 if n == 0 else 0.45,
                             label=f"{label}, lr {lr}" + (f" (seed {n})" if len(pr[side]["seeds"]) > 1 else ""))
    axes[0].axhline(start, color="grey", lw=0.8, ls=":", label=f"start model {start:.3f}")
    axes[0].set_xlabel("optimizer step (8 prompts x 8 completions each)")
    axes[0].set_ylabel(f"held-out greedy exact match (fraction of {out.get('eval_prompts', 1200)} prompts)")
    axes[0].set_title("GRPO on the testbed student: jaxtok vs TRL (same prompts, reward, settings)")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("sampled (T=1) rollout accuracy (fraction; mean of the last 20 steps)")
    axes[1].set_title("rollout reward")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # both panels draw the same series (+ the start line)
    fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=10, frameon=False)
    fig.supxlabel("\n".join(textwrap.wrap(f"made by: {command}", 200, subsequent_indent="    ")), fontsize=8,
                  color="0.3", x=0.01, ha="left", family="monospace")
    fig.savefig(png)
    plt.close(fig)


def cmd_replot(a) -> None:
    """Redraw ``<json>``'s plot (next to it, ``.png``) from the written report JSON; no runs are read."""
    src = REPO / a.json
    plot_report(json.loads(src.read_text()), src.with_suffix(".png"), a.command)


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(REPO / "runs/trl_compare"), help="exchange / run folder")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="(jaxtok venv) HF export + prompt files")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--prompts-per-step", type=int, default=None,
                   help="prompts per step (default: configs/testbed/grpo.yaml's data.batch_size / num_generations)")
    s.set_defaults(fn=cmd_prepare)
    s = sub.add_parser("train", help="(TRL venv) GRPOTrainer run with a held-out eval every --eval-every steps")
    s.add_argument("--lr", type=float, default=None, help="default: configs/testbed/grpo.yaml's optimizer.lr")
    s.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps, then constant (default: grpo.yaml's optimizer.warmup_steps)")
    s.add_argument("--prompts-per-step", type=int, default=None,
                   help="prompts per step (default: grpo.yaml's data.batch_size / num_generations; the first "
                        "cross-check used 8)")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--name", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=int, default=25, help="0: no evaluation (timing runs)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--save", action="store_true", help="save the final model (HF format) in the run folder")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("eval-torch", help="(TRL venv) torch greedy held-out exact match of an HF directory")
    s.add_argument("hf_dir")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_eval_torch)
    s = sub.add_parser("batch-trl", help="(TRL venv) one TRL rollout batch: tokens, advantages, log-probs, grads")
    s.add_argument("--step", type=int, default=1, help="use the prompts of this jaxtok step")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=cmd_batch_trl)
    s = sub.add_parser("batch-jaxtok", help="(jaxtok venv) jaxtok's objective on batch_trl.npz, compared")
    s.add_argument("--student", default="runs/testbed/student")
    s.set_defaults(fn=cmd_batch_jaxtok)
    s = sub.add_parser("grad-snr", help="(jaxtok venv) gradient signal-to-noise of one GRPO step at the start model")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--batches", type=int, default=32)
    s.add_argument("--prompts", type=int, default=PROMPTS_PER_STEP)
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(fn=cmd_grad_snr)
    s = sub.add_parser("report", help="json + overlay plot of jaxtok/TRL pairs")
    s.add_argument("--pair", action="append", required=True, help="LR=JAXTOK_RUN_DIR,TRL_RUN_DIR")
    s.add_argument("--student", default="runs/testbed/student")
    s.add_argument("--batch-check", default=str(REPO / "runs/trl_compare/batch_check.json"))
    s.add_argument("--torch-eval-check", default=str(REPO / "runs/trl_compare/eval_torch_student.json"))
    s.add_argument("--grad-snr", default=str(REPO / "runs/trl_compare/grad_snr.json"))
    s.add_argument("--timing", action="append", help="JAXTOK_RUN,TRL_RUN that ran concurrently (step-time ratio)")
    s.add_argument("--note", action="append")
    s.add_argument("--out", default="docs/results/trl_compare")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("reward-windows", help="mean sampled rollout accuracy per step window of jaxtok/TRL runs")
    s.add_argument("runs", nargs="+", help="run directories (metrics.jsonl or trl_run.json)")
    s.add_argument("--every", type=int, default=25)
    s.add_argument("--upto", type=int, default=250)
    s.set_defaults(fn=cmd_reward_windows)
    s = sub.add_parser("replot", help="(jaxtok venv) redraw a report's plot from its JSON (no run directories)")
    s.add_argument("--json", default="docs/results/trl_compare.json")
    s.add_argument("--command", required=True, help="the report command that wrote the JSON (the plot's caption)")
    s.set_defaults(fn=cmd_replot)
    a = p.parse_args(argv)
    if a.cmd == "train":  # defaults from the committed GRPO config
        setting = _grpo_setting()
        for key in ("prompts_per_step", "lr", "warmup_steps"):
            if getattr(a, key) is None:
                setattr(a, key, setting[key])
        if a.prompts_per_step < 1 or a.warmup_steps < 0 or a.steps < 1 or a.lr <= 0:
            p.error(f"train: need --prompts-per-step >= 1, --warmup-steps >= 0, --steps >= 1, --lr > 0 "
                    f"(got {a.prompts_per_step}, {a.warmup_steps}, {a.steps}, {a.lr})")
    a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
