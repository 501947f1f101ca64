"""DiffRetriever on the arithmetic-equivalence retrieval set (issue 18 item 6; decode/retrieval.py).

    python scripts/diffretriever.py configs/scripts/diffretriever.yaml [key=value ...]

Reads a trained diffusion LM (``init_from``, e.g. ``jaxtok train configs/zoo/diffusion.yaml``), encodes the queries
(subtractions) and passages (additions) of :func:`jaxtok.tasks.retrieval.arith_equivalence` with

- ``one-pass``: ``K + tail`` masks, ONE forward (DiffRetriever);
- ``sequential``: the same model unmasking the K positions left to right, K forwards (the AR-style multi-token read);

for every K of ``ks``, and reports recall@1/5/10 and MRR of the dense (MaxSim), dense-mean, sparse and hybrid scores,
next to a lexical baseline (cosine of the raw texts' character counts). Latency: wall time of encoding one batch
(``latency_batches`` sizes) with each reader, plus the PromptReps AR read with a KV cache (prefill + K-1 steps) on a
causal model of the same shape with random weights (latency only: no AR model is trained on this task here). Repeats
are interleaved (every repeat runs every reader once, rotating the order); medians and per-repeat ratios reported.

Writes ``out_json`` / ``out_md`` and ``out_png`` (MRR and latency against K). Config errors exit with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class DiffRetrieverConfig:
    """``init_from``: diffusion run directory (``step``: its checkpoint, default the last); ``ks``: numbers of representative positions; ``tail``: extra masks
    after the K read ones; ``template``: restate | plain (jaxtok/tasks/retrieval.py); ``digits``,
    ``queries_per_value``, ``seed``: the retrieval set; ``prompt_len``: left-padded text length; ``batch_size``:
    encode batch; ``latency_batches``: batch sizes timed; ``repeats``: interleaved timing repeats."""

    init_from: Optional[str] = None
    step: Optional[int] = None
    ks: tuple[int, ...] = (1, 2, 4, 8)
    tail: int = 3
    template: str = "restate"
    digits: int = 2
    queries_per_value: int = 2
    seed: int = 0
    prompt_len: int = 16
    batch_size: int = 128
    latency_batches: tuple[int, ...] = (1, 128)
    repeats: int = 7
    out_json: str = "docs/results/diffretriever.json"
    out_md: str = "docs/results/diffretriever.table.md"
    out_png: str = "docs/results/diffretriever.png"

    def __post_init__(self):
        from jaxtok.tasks.retrieval import TEMPLATES

        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks={list(self.ks)}: allowed a non-empty list of positive integers")
        if self.tail < 0:
            raise ValueError(f"tail={self.tail}: allowed >= 0")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: allowed {list(TEMPLATES)}")
        if self.repeats < 1 or self.batch_size < 1 or any(b < 1 for b in self.latency_batches):
            raise ValueError("repeats, batch_size and latency_batches must be >= 1")


def load_config(argv) -> DiffRetrieverConfig:
    """The ``diffretriever:`` section of the YAML file ``argv[0]`` with ``key=value`` overrides (exit 2 on errors)."""
    import yaml

    from jaxtok.config import read_yaml_file
    from jaxtok.registry import ConfigError, build_dataclass

    if not argv:
        raise ConfigError("usage: python scripts/diffretriever.py CONFIG [key=value ...]")
    raw = read_yaml_file(argv[0]) or {}
    if set(raw) - {"diffretriever"}:
        raise ConfigError(f"{argv[0]}: top-level keys {sorted(set(raw) - {'diffretriever'})}; allowed: "
                          f"['diffretriever']")
    data = dict(raw.get("diffretriever") or {})
    for item in argv[1:]:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        data[k.removeprefix("diffretriever.")] = yaml.safe_load(v) if v else v
    cfg = build_dataclass(DiffRetrieverConfig, data, "diffretriever")
    if not cfg.init_from or not Path(cfg.init_from).exists():
        raise ConfigError(f"diffretriever.init_from={cfg.init_from!r}: no such run directory (train one: jaxtok train "
                          f"configs/zoo/diffusion.yaml)")
    return cfg


def lexical_scores(queries, passages) -> np.ndarray:
    """Cosine ``[Q, P]`` of character-count vectors of the raw texts (a bag-of-characters BM25 stand-in)."""
    chars = sorted(set("".join(queries) + "".join(passages)))

    def vec(t):
        c = Counter(t)
        v = np.array([c[ch] for ch in chars], np.float64)
        return v / max(np.linalg.norm(v), 1e-12)

    return np.stack([vec(q) for q in queries]) @ np.stack([vec(p) for p in passages]).T


def encode_all(fn, ids, valid, batch: int):
    """Concatenate the :class:`Reps` of ``fn(ids[i:i+batch], valid[i:i+batch])`` (last batch padded)."""
    import jax

    from jaxtok.decode.retrieval import Reps

    parts = []
    for i in range(0, ids.shape[0], batch):
        a, v = ids[i:i + batch], valid[i:i + batch]
        n = a.shape[0]
        if n < batch:
            a = np.concatenate([a, np.repeat(a[:1], batch - n, 0)])
            v = np.concatenate([v, np.repeat(v[:1], batch - n, 0)])
        r = jax.device_get(fn(a, v))
        parts.append(jax.tree.map(lambda x: np.asarray(x)[:n], r))
    return Reps(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("dense", "sparse", "tokens")))


def timed(fn, *args) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from jaxtok.registry import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"diffretriever: config error: {e}", file=sys.stderr)
        return 2

    import functools

    import jax
    from flax import nnx

    from jaxtok.decode import retrieval as R
    from jaxtok.metrics import markdown_table, save_plot
    from jaxtok.models import Decoder
    from jaxtok.models.hf import load_any
    from jaxtok.tasks.retrieval import arith_equivalence, encode_texts, retrieval_prompt
    from jaxtok.tasks.tokenizer import SpecialTokens, decode, load_tokenizer

    t_start = time.perf_counter()
    model, _ = load_any(cfg.init_from, key="diffretriever.init_from", diffusion=True, step=cfg.step)
    tok = load_tokenizer(cfg.init_from)
    sp = SpecialTokens.of(tok)
    exclude = tuple(sorted({sp.pad, sp.eos, sp.mask, *(x for x in [sp.bos] if x is not None), *sp.rainbow_pads,
                            *sp.eos_ids}))
    data = arith_equivalence(cfg.digits, cfg.queries_per_value, cfg.seed)
    q_ids, q_valid = encode_texts(tok, [retrieval_prompt(t, cfg.template) for t in data.queries], cfg.prompt_len)
    p_ids, p_valid = encode_texts(tok, [retrieval_prompt(t, cfg.template) for t in data.passages], cfg.prompt_len)
    lex = R.recall_at(lexical_scores(data.queries, data.passages), data.relevant)
    readers = {
        "one-pass": lambda k: functools.partial(R.encode_parallel, model, k=k, tail=cfg.tail, exclude_ids=exclude),
        "sequential": lambda k: functools.partial(R.encode_sequential, model, k=k, tail=cfg.tail,
                                                  exclude_ids=exclude),
    }
    rows, examples = [], {}
    for k in cfg.ks:
        for name, make in readers.items():
            fn = make(k)
            qr = encode_all(fn, q_ids, q_valid, cfg.batch_size)
            pr = encode_all(fn, p_ids, p_valid, cfg.batch_size)
            scores = R.score_all(qr, pr, data.relevant)
            for scorer, m in scores.items():
                rows.append({"reader": name, "K": k, "scorer": scorer, **m})
            examples[f"{name} K={k}"] = [
                {"text": data.queries[i], "representatives": decode(tok, qr.tokens[i], stop_at_eos=False)}
                for i in range(3)] + [
                {"text": data.passages[data.relevant[i]],
                 "representatives": decode(tok, pr.tokens[data.relevant[i]], stop_at_eos=False)} for i in range(3)]

    # latency: interleaved repeats, every reader once per repeat (order rotated)
    cfg_ar = dataclasses.replace(model.cfg, mask_token_id=None, shift_logits=False)
    ar_model = Decoder(cfg_ar, rngs=nnx.Rngs(0))  # random causal LM of the same shape: latency only
    lat_rows = []
    for bsz in cfg.latency_batches:
        a, v = q_ids[:bsz], q_valid[:bsz]
        if a.shape[0] < bsz:
            a, v = np.resize(a, (bsz, a.shape[1])), np.resize(v, (bsz, v.shape[1]))
        for k in cfg.ks:
            fns = {"one-pass": readers["one-pass"](k), "sequential": readers["sequential"](k),
                   "ar-kv-cache": functools.partial(R.encode_autoregressive, ar_model, k=k, exclude_ids=exclude)}
            for fn in fns.values():  # compile
                timed(fn, a, v)
            times = {n: [] for n in fns}
            names = list(fns)
            for r in range(cfg.repeats):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    times[n].append(timed(fns[n], a, v))
            base = times["one-pass"]
            for n in names:
                lat_rows.append({"batch": bsz, "K": k, "reader": n, "median_ms": 1e3 * statistics.median(times[n]),
                                 "ratio_to_one_pass": statistics.median(t / b for t, b in zip(times[n], base)),
                                 "forwards": 1 if n == "one-pass" else k})

    res = {"config": dataclasses.asdict(cfg), "num_queries": len(data.queries), "num_passages": len(data.passages),
           "lexical_baseline": lex, "rows": rows, "latency": lat_rows, "examples": examples,
           "device": jax.devices()[0].device_kind, "wall_s": time.perf_counter() - t_start,
           "command": "python scripts/diffretriever.py " + " ".join(argv)}
    Path(cfg.out_json).write_text(json.dumps(res, indent=1, default=str))

    def draw(ax):
        gs = ax.get_subplotspec().subgridspec(1, 2, wspace=0.3)
        fig = ax.figure
        ax.remove()
        a1, a2 = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
        for name in readers:
            for scorer, ls in (("dense", "-"), ("sparse", "--"), ("sparse_cos", "-."), ("hybrid", ":")):
                pts = [(r["K"], r["mrr"]) for r in rows if r["reader"] == name and r["scorer"] == scorer]
                a1.plot(*zip(*pts), ls, marker="o", label=f"{name} {scorer}")
        a1.axhline(lex["mrr"], color="0.5", lw=0.8, label="lexical (chars)")
        a1.set_xscale("log", base=2)
        a1.set_xlabel("K representative positions")
        a1.set_ylabel("MRR (one relevant passage per query)")
        a1.set_title(f"{len(data.queries)} queries, {len(data.passages)} passages")
        a1.legend(fontsize=7)
        bmax = max(cfg.latency_batches)
        for name in ("one-pass", "sequential", "ar-kv-cache"):
            pts = [(r["K"], r["median_ms"]) for r in lat_rows if r["reader"] == name and r["batch"] == bmax]
            a2.plot(*zip(*pts), marker="o", label=name)
        a2.set_xscale("log", base=2)
        a2.set_xlabel("K")
        a2.set_ylabel(f"median ms per batch of {bmax}")
        a2.set_title("encode latency (CPU)")
        a2.legend(fontsize=7)

    save_plot(cfg.out_png, draw, command=res["command"])
    md = [f"<!-- written by: {res['command']} -->", "", "## recall", "",
          markdown_table(rows, ["reader", "K", "scorer", "recall@1", "recall@5", "recall@10", "mrr"]),
          f"lexical baseline (character counts): {lex}", "", "## latency", "",
          markdown_table(lat_rows, ["batch", "K", "reader", "forwards", "median_ms", "ratio_to_one_pass"])]
    Path(cfg.out_md).write_text("\n".join(md))
    print(json.dumps({"lexical": lex, "rows": rows, "latency": lat_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
