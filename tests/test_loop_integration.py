"""The training loop drives every registered objective kind end to end (train/loop.py): TRACE's step field, LenVM's
wrapped model through checkpoints, diffusion evaluation, whole-group advantages under micro-batching, CPPO's
top-K rollout statistics, and a clear refusal of objectives whose data kind the loop cannot produce."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict, validate_names
from jaxtok.models import Decoder, presets
from jaxtok.registry import ConfigError
from jaxtok.tasks import build_tokenizer, save_tokenizer

TINY = {"num_layers": 1}  # one-layer tiny models: compiles dominate these tests


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok):
    """A run-directory-shaped checkpoint of a random one-layer tiny_student (teacher / data policy)."""
    from jaxtok.models.hf import save_checkpoint

    path = tmp_path_factory.mktemp("teacher")
    model = Decoder(presets.get("tiny_student", vocab_size=tok.get_vocab_size(), **TINY), rngs=nnx.Rngs(3))
    save_checkpoint(model, str(path))
    save_tokenizer(tok, path / "tokenizer.json")
    return path


def _cfg(objective, args=None, *, steps=4, rollout=None, train=None, model=None, decode=None, data=None):
    return from_dict({
        "model": {"preset": "tiny_student", "overrides": TINY, **(model or {})},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 24, "batch_size": 8,
                 "num_eval": 8, **(data or {})},
        "objective": {"name": objective, "args": args or {}},
        "optimizer": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": steps, "log_every": 1, "eval_batches": 1, **(train or {})},
        "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
        "decode": {"max_new_tokens": 6, "batch_size": 8, **(decode or {})},
        "run": {"progress": False},
    })


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# ----------------------------------------------------------------------------------------------------------------
# 1. TRACE: the λ schedule follows the optimizer step


def test_trace_lambda_decays_over_loop_steps(tmp_path, teacher_dir):
    """λ_k = 0.5 for k < hold=1, then linear to 0 over decay=2 steps: the logged λ of steps k = 0..3 is
    0.5, 0.5, 0.25, 0 (without the step field every step would log args.step's λ = 0.5)."""
    from jaxtok.train.loop import train

    cfg = _cfg("trace", {"kl_weight": 0.5, "hold_steps": 1, "decay_steps": 2, "chunk_size": 64},
               rollout={"teacher_init_from": str(teacher_dir)})
    validate_names(cfg)
    train(cfg, tmp_path / "run", final_eval=False)
    lams = [r["kl_lambda"] for r in _records(tmp_path / "run")]
    np.testing.assert_allclose(lams, [0.5, 0.5, 0.25, 0.0], atol=1e-7)
