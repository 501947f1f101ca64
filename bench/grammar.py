"""Grammar-constrained AR decoding against unconstrained decoding of the same run (decode_methods.md, LAVE's
AR baseline): an experiment over :func:`jaxtok.decode.constrained.constrained_generate`, scored by the one
decode-and-score loop (:func:`jaxtok.decode.evaluate.evaluate`)."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from jaxtok.decode.constrained import constrained_generate, grammar_for
from jaxtok.decode.diffusion import stop_ids_of
from jaxtok.decode.evaluate import evaluate


def compare_ar(run_dir: str, *, temperature: float = 0.0, num_examples: Optional[int] = None, seed: int = 0) -> dict:
    """Held-out exact match / ``format_ok`` / ``grammar_ok`` of an AR run (its own ``config.yaml`` task and decode
    length) with :func:`constrained_generate` under the task grammar and without it (the same host loop).
    Example: ``python -c "from jaxtok.bench.grammar import compare_ar as c; print(c('runs/zoo/student'))"``."""
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config
    from jaxtok.models.hf import load_any
    from jaxtok.tasks import load_tokenizer
    from jaxtok.tasks.tokenizer import SpecialTokens

    
    cfg = load_config(f"{run_dir}/config.yaml")
    model, _ = load_any(run_dir, key="run_dir")
    tok = load_tokenizer(run_dir)
    task = make_task_from_config(cfg.data)
    sp = SpecialTokens.of(tok)
    grammar = grammar_for("task", task, tok, stop_ids_of(tok))

    def step_of(g):  # a host loop: unpadded batches; stats: the rows whose text parses (Earley)
        def step(prompt, valid, key):
            res = constrained_generate(model, prompt, valid, g, max_new_tokens=cfg.decode.max_new_tokens,
                                       temperature=temperature, rng=key, pad_id=sp.pad, stop_tokens=grammar.stop_ids)
            tokens = np.asarray(res.tokens)
            parses = np.array([grammar.parses(grammar.text_of(t)) for t in tokens], np.int64)
            return tokens, res.valid, {"grammar_ok": parses}

        return step

    out = {}
    for label, g in (("unconstrained", None), ("constrained", grammar)):  # the first run compiles
        m, _ = evaluate(step_of(g), task, tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                        num_examples=num_examples or cfg.data.num_eval, overlong=cfg.data.overlong,
                        key=jax.random.key(seed), warmup=False, pad=False, num_samples=0)
        out[label] = {k: m[k] for k in ("exact_match", "format_ok", "grammar_ok", "num_examples", "wall_s")}
    return {"run": run_dir, "temperature": temperature, **out}
