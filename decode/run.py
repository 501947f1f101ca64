"""``jaxtok decode``: decode held-out prompts of the configured task with a trained model.

Writes ``results.json`` (exact match, generated tokens, tokens/s — wall time includes the one-time jit
compilation), ``results.md`` (sample completions) into the
run directory. Methods: ``greedy`` and ``sample`` (autoregressive, :func:`jaxtok.decode.generate`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxtok import mesh as mesh_lib
from jaxtok.data import make_task_from_config, prompt_dataset
from jaxtok.metrics import write_results
from jaxtok.registry import ConfigError
from jaxtok.tasks import build_tokenizer, load_tokenizer
from jaxtok.tasks.tokenizer import SpecialTokens, decode

from .generate import generate

AVAILABLE_METHODS = ("greedy", "sample")


def _model_and_tokenizer(cfg, mesh):
    """Weights from ``model.init_from`` (a jaxtok run/checkpoint) or ``model.hf_path``, and their tokenizer."""
    from jaxtok.models.hf import load_checkpoint, load_hf

    if cfg.model.init_from:
        model, _ = load_checkpoint(cfg.model.init_from, mesh=mesh)
        src = Path(cfg.model.init_from)
    elif cfg.model.hf_path:
        model, _ = load_hf(cfg.model.hf_path, cfg.model.dtype, mesh=mesh)
        src = Path(cfg.model.hf_path)
    else:
        raise ConfigError("decode needs trained weights: set model.init_from=<run dir> or model.hf_path=<HF dir>")
    tok = load_tokenizer(src) if (src / "tokenizer.json").is_file() else build_tokenizer()
    return model, tok


def run_decode(cfg, run_dir: str | Path) -> dict:
    """Decode ``data.num_eval`` held-out prompts; returns exact match and throughput."""
    if cfg.decode.method not in AVAILABLE_METHODS:
        raise ConfigError(f"decode.method={cfg.decode.method!r}: available so far {list(AVAILABLE_METHODS)}")
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    model, tok = _model_and_tokenizer(cfg, mesh)
    task = make_task_from_config(cfg.data)
    sp = SpecialTokens.of(tok)
    temperature = 0.0 if cfg.decode.method == "greedy" else cfg.decode.temperature
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                           num_examples=cfg.data.num_eval, overlong=cfg.data.overlong)
    rows, hits, total, n_tok, wall = [], 0.0, 0, 0, 0.0
    key = jax.random.key(cfg.train.seed)
    for batch in ds:
        B = batch["prompt"].shape[0]
        prompt, valid = batch["prompt"], batch["prompt_valid"]
        if B < cfg.decode.batch_size:  # one static shape: pad the last batch with copies of its first row
            extra = cfg.decode.batch_size - B
            prompt = np.concatenate([prompt, np.repeat(prompt[:1], extra, 0)])
            valid = np.concatenate([valid, np.repeat(valid[:1], extra, 0)])
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        out = generate(model, prompt, valid, max_new_tokens=cfg.decode.max_new_tokens, temperature=temperature,
                       top_k=cfg.decode.top_k, top_p=cfg.decode.top_p, min_p=cfg.decode.min_p, rng=sub,
                       stop_tokens=(sp.eos,), pad_id=sp.pad, mesh=mesh)
        tokens = np.asarray(jax.device_get(out.tokens))
        wall += time.perf_counter() - t0
        n_tok += int(np.asarray(jax.device_get(out.valid))[:B].sum())
        for r in range(B):
            ex = task.example("eval", int(batch["index"][r]))
            text = decode(tok, tokens[r])
            ok = task.reward(text, ex) >= 1.0
            hits += ok
            total += 1
            if len(rows) < 16:
                rows.append({"prompt": ex.prompt, "completion": text, "answer": ex.answer, "correct": bool(ok)})
    results = {"method": cfg.decode.method, "exact_match": hits / max(total, 1), "num_examples": total,
               "generated_tokens": n_tok, "tokens_per_s": n_tok / max(wall, 1e-9), "wall_s": wall}
    write_results(run_dir, results, rows, title=f"decode samples (exact match {results['exact_match']:.3f})")
    print(json.dumps(results, indent=2))
    return results
