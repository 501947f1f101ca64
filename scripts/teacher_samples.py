"""Sample completions of a model (the teacher) on the train prompts of a config's task and write them as JSONL
records ``{index, prompt, target, answer, correct}`` for the ``arith_samples`` task (SFT on teacher samples).

    python scripts/teacher_samples.py --config configs/testbed/base.yaml --model runs/testbed/teacher \
        --num 12800 --temperature 1.0 --out runs/testbed/teacher_samples.jsonl

Deterministic in ``--seed``; an existing output with the same number of records is reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num", type=int, default=12800)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.is_file() and sum(1 for _ in out.open()) == a.num:
        print(f"reusing {out}")
        return
    from jaxtok.config import load_config
    from jaxtok.data import make_task_from_config, pad_prompt_batch, prompt_dataset
    from jaxtok.decode.generate import generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.tasks import load_tokenizer
    from jaxtok.tasks.tokenizer import SpecialTokens, decode
    from jaxtok.train.loop import load_model
    from jaxtok.train.rollout import fetch

    cfg = load_config(a.config, a.overrides)
    model, _ = load_model(a.model)
    tok = load_tokenizer(Path(a.model) / "tokenizer.json")
    sp = SpecialTokens.of(tok)
    task = make_task_from_config(cfg.data)
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=cfg.data.prompt_len, batch_size=a.batch_size,
                           num_examples=a.num, overlong=cfg.data.overlong)
    recs, right = [], 0
    for b, batch in enumerate(ds):
        rows = batch["prompt"].shape[0]
        prompt, valid = pad_prompt_batch(batch, a.batch_size)
        res = generate(model, jnp.asarray(prompt), jnp.asarray(valid), max_new_tokens=cfg.decode.max_new_tokens,
                       sampling=SamplingParams(temperature=a.temperature),
                       rng=jax.random.fold_in(jax.random.key(a.seed), b), stop_tokens=(sp.eos,), pad_id=sp.pad)
        toks = fetch(res.tokens)
        for r in range(rows):
            i = int(batch["index"][r])
            ex = task.example("train", i)
            text = decode(tok, toks[r])
            ok = task.reward(text, ex) >= 1.0
            right += ok
            recs.append({"index": i, "prompt": ex.prompt, "target": text, "answer": ex.answer, "correct": bool(ok)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} records to {out}; teacher sample exact match {right / len(recs):.4f}")


if __name__ == "__main__":
    main()
