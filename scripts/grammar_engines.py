"""Measure token-level grammar engines on the real Qwen3 vocabulary (151,936 logits) and write
``docs/results/grammar_engines.json``.

Engines: xgrammar, llguidance, outlines-core (each skipped if not installed). Workloads:

- ``json``: any JSON value (xgrammar's built-in JSON grammar; llguidance's JSON schema ``{}``; outlines-core has no
  grammar for unbounded nested JSON — it compiles regular expressions only — so it is not measured there);
- ``schema``: a JSON schema (object with a string, an integer, a string array and a nested object).

For each (engine, workload): ``tokenizer_s`` (vocabulary preprocessing, once per tokenizer), ``compile_s`` (grammar
to a ready matcher, caches off), and over the canonical Qwen3 tokens of a matching document, ``R`` passes: per-token
``mask_us`` (fill the ``[V/32]`` int32 bitmask for the next token: mean / p50 / p95 / max) and ``advance_us`` (feed
the accepted token). Exactness probes: the document is accepted token by token; the eos ids are allowed only at its
end; ``special_in_string``: whether ``<|im_start|>`` (a special token) is allowed inside a JSON string (it must not
be: it is not text). ``unpack_us``: the shared host cost of turning a bitmask into a ``[V]`` bool mask (numpy).

Run from the repo root (after ``pip install xgrammar llguidance outlines-core``)::

    python scripts/grammar_engines.py [--repeats 3] [--out docs/results/grammar_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
V = 151_936  # Qwen3 config.json vocab_size (logit rows)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCS = {
    "json": json.dumps({"id": 7, "title": "Grammar masks on real vocabularies", "ok": True, "ratio": -0.25,
                        "items": [1, 2, 3, {"deep": [None, False, "x"]}], "meta": {"by": "jaxtok", "n": 12345}}),
    "schema": json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"],
                          "address": {"city": "London", "zip": "W1"}}),
}


def unpack(bitmask: np.ndarray) -> np.ndarray:
    """``[W] int32`` bitmask (bit j of word w = token 32 w + j) -> ``[V]`` bool."""
    return np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), bitorder="little")[:V].astype(bool)


class Engine:
    """The four calls the benchmark needs: ``matcher()`` (a fresh one), ``fill(m, bitmask [1, W])``, ``advance(m, t)``
    (-> accepted), ``accepting(m)``."""


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tok):
        import llguidance as llg
        from llguidance.numpy import fill_next_token_bitmask

        self.llg, self._fill = llg, fill_next_token_bitmask
        t = time.perf_counter()
        self.lltok = llg.LLTokenizer(tok.hf.to_str(), n_vocab=V, eos_token=list(tok.eos_ids))
        self.tokenizer_s = time.perf_counter() - t

    def compile(self, workload):
        g = self.llg.LLMatcher.grammar_from_json_schema({} if workload == "json" else SCHEMA)
        self.grammar = g
        m = self.llg.LLMatcher(self.lltok, g)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def matcher(self):
        return self.llg.LLMatcher(self.lltok, self.grammar)

    def fill(self, m, bm):
        self._fill(m, bm)

    def advance(self, m, t):
        return m.consume_token(t)

    def accepting(self, m):
        return m.is_accepting()


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tok):
        import transformers
        import xgrammar as xgr

        self.xgr = xgr
        t = time.perf_counter()
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=list(tok.eos_ids))
        self.tokenizer_s = time.perf_counter() - t

    def compile(self, workload):
        comp = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.compiled = (comp.compile_builtin_json_grammar() if workload == "json"
                         else comp.compile_json_schema(SCHEMA))
        return self.matcher()

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def fill(self, m, bm):
        import torch

        m.fill_next_token_bitmask(torch.from_numpy(bm))  # shares memory with bm

    def advance(self, m, t):
        return m.accept_token(t)

    def accepting(self, m):
        return m.is_completed() if hasattr(m, "is_completed") else m.is_terminated()


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core as oc
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = oc
        t = time.perf_counter()
        u2b = {c: b for b, c in bytes_to_unicode().items()}
        special = {i for i, a in tok.hf.get_added_tokens_decoder().items() if a.special}
        table: dict = {}
        for i in range(tok.hf.get_vocab_size()):
            if i in special:
                continue
            s = tok.hf.id_to_token(i)
            b = bytes(u2b[c] for c in s) if all(c in u2b for c in s) else s.encode()
            table.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(int(tok.eos_ids[0]), table)  # one eos id only
        self.tokenizer_s = time.perf_counter() - t

    def compile(self, workload):
        if workload == "json":
            raise NotImplementedError("regular expressions only: no grammar for unbounded nested JSON")
        rx = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
        self.index = self.oc.Index(rx, self.vocab)
        return self.matcher()

    def matcher(self):
        return self.oc.Guide(self.index)

    def fill(self, m, bm):
        m.write_mask_into(bm.ctypes.data, bm.size, 4)

    def advance(self, m, t):
        try:
            m.advance(t, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001  (outlines-core raises on a forbidden token)
            return False

    def accepting(self, m):
        return m.is_finished()


def measure(engine, workload: str, ids: list[int], eos: tuple, im_start: int, repeats: int) -> dict:
    """Compile time, per-token mask / advance times and exactness probes of one engine on one workload."""
    t = time.perf_counter()
    m = engine.compile(workload)
    compile_s = time.perf_counter() - t
    bm = np.full((1, (V + 31) // 32), -1, np.int32)
    mask_t, adv_t, ok, eos_early, special_in_string = [], [], True, False, False
    for r in range(repeats):
        m = engine.matcher() if r else m
        for k, tid in enumerate(ids):
            t = time.perf_counter()
            engine.fill(m, bm)
            mask_t.append(time.perf_counter() - t)
            allowed = unpack(bm[0])
            ok &= bool(allowed[tid])
            eos_early |= bool(allowed[list(eos)].any())
            if r == 0 and allowed.sum() > 10_000:  # inside a string: every text token is allowed
                special_in_string |= bool(allowed[im_start])
            t = time.perf_counter()
            ok &= bool(engine.advance(m, tid))
            adv_t.append(time.perf_counter() - t)
        engine.fill(m, bm)
        end = unpack(bm[0])
    us = np.asarray(mask_t) * 1e6
    return {
        "compile_s": round(compile_s, 4),
        "tokens": len(ids),
        "mask_us": {"mean": round(float(us.mean()), 1), "p50": round(float(np.percentile(us, 50)), 1),
                    "p95": round(float(np.percentile(us, 95)), 1), "max": round(float(us.max()), 1)},
        "advance_us": round(float(np.mean(adv_t) * 1e6), 1),
        "document_accepted": bool(ok and engine.accepting(m)),
        "eos_only_at_end": bool(not eos_early and end[list(eos)].any() and end.sum() <= len(eos) + 64),
        "eos_allowed_at_end": [int(e) for e in eos if end[e]],
        "special_in_string": special_in_string,
    }


def end_to_end(tok, batch: int = 4, steps: int = 32, repeats: int = 3) -> dict:
    """Per-step wall time of jitted AR decoding of a random tiny decoder over the 151,936 logits, with and without
    the llguidance JSON mask (:func:`jaxtok.decode.constrained.grammar_generate`: one ordered io_callback per step),
    compiled calls only (the best of ``repeats``)."""
    import jax
    from flax import nnx

    from jaxtok.decode import constrained as C
    from jaxtok.decode import generate
    from jaxtok.sampling import SamplingParams
    from jaxtok.models import Decoder, presets

    model = Decoder(presets.get("tiny_draft", vocab_size=V, hidden_size=16, intermediate_size=32, head_dim=8),
                    rngs=nnx.Rngs(0))
    grammar = C.TokenGrammar.json(tok, vocab_size=V)
    prompt = np.random.default_rng(0).integers(0, 151_000, (batch, 6)).astype(np.int32)
    valid = np.ones_like(prompt, bool)
    eos = tuple(tok.eos_ids)
    runs = {
        "unconstrained": lambda: generate(model, prompt, valid, max_new_tokens=steps,
                                          sampling=SamplingParams(temperature=1.0),
                                          stop_tokens=(), rng=jax.random.key(0)),  # no stop token: all steps
        "llguidance_json": lambda: C.grammar_generate(model, prompt, valid, grammar, max_new_tokens=steps,
                                                      sampling=SamplingParams(temperature=1.0), rng=jax.random.key(0),
                                                      stop_tokens=eos),
    }
    out = {"batch": batch, "max_new_tokens": steps, "model": "tiny_draft, hidden 16, 1 layer, 151,936 logits"}
    for name, fn in runs.items():
        jax.block_until_ready(fn())  # compile
        best, n = float("inf"), steps
        for _ in range(repeats):
            t = time.perf_counter()
            res = jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t)
            n = int(np.asarray(res.valid).sum(1).max())
        out[name] = {"steps": n, "ms_per_step": round(best / n * 1e3, 3)}
    # the host half alone: one session call per step (advance B matchers, fill B bitmasks, terminator bits)
    tokens, done = np.asarray(res.tokens), np.zeros(batch, bool)
    session, times = C._MaskSession(grammar, batch), []
    for t in range(steps):
        t0 = time.perf_counter()
        session(t, tokens[:, t - 1] if t else tokens[:, 0], done)
        times.append(time.perf_counter() - t0)
        done |= np.isin(tokens[:, t], eos)
    out["host_session_us_per_step"] = {"p50": round(float(np.median(times)) * 1e6, 1),
                                       "mean": round(float(np.mean(times)) * 1e6, 1)}
    return out


def markdown_table(out: dict) -> str:
    """The results as a markdown table (one row per engine and workload)."""
    lines = ["| engine | workload | tokenizer set-up s | compile s | mask µs p50 / mean / p95 / max | advance µs | "
             "document accepted | eos only at end | special token inside a string |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in out["engines"].items():
        if "error" in row:
            lines.append(f"| {name} | — | {row['error']} | | | | | | |")
            continue
        for workload in DOCS:
            r = row[workload]
            if "error" in r:
                lines.append(f"| {name} {row['version']} | {workload} | {row['tokenizer_s']} | {r['error']} "
                             "| | | | | |")
                continue
            m = r["mask_us"]
            lines.append(f"| {name} {row['version']} | {workload} | {row['tokenizer_s']} | {r['compile_s']} | "
                         f"{m['p50']} / {m['mean']} / {m['p95']} / {m['max']} | {r['advance_us']} | "
                         f"{r['document_accepted']} | {r['eos_only_at_end']} | {r['special_in_string']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end decode timing")
    ap.add_argument("--tokenizer", default=None, help="a Qwen3 tokenizer directory (default: build it offline)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "grammar_engines.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from jaxtok.tasks.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer is None:
            import real_tokenizers as rt

            args.tokenizer = str(rt.build_qwen3(os.path.join(tmp, "qwen3")))
        tok = load_tokenizer(args.tokenizer)
    eos, im_start = tuple(tok.eos_ids), tok.token_to_id("<|im_start|>")
    # unpacking cost shared by all engines (bitmask -> [V] bool on the host)
    bm = np.random.default_rng(0).integers(-2**31, 2**31 - 1, (V + 31) // 32, dtype=np.int64).astype(np.int32)
    t = time.perf_counter()
    for _ in range(200):
        unpack(bm)
    unpack_us = (time.perf_counter() - t) / 200 * 1e6
    results = {}
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        dist = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}[cls.name]
        try:
            version = metadata.version(dist)
            engine = cls(tok)
        except Exception as e:  # noqa: BLE001  (not installed, or its set-up failed)
            results[cls.name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        row = {"version": version, "tokenizer_s": round(engine.tokenizer_s, 3)}
        for workload, doc in DOCS.items():
            try:
                row[workload] = measure(engine, workload, tok.encode(doc), eos, im_start, args.repeats)
            except NotImplementedError as e:
                row[workload] = {"error": str(e)}
            print(cls.name, workload, json.dumps(row[workload]), flush=True)
        results[cls.name] = row
    out = {
        "command": "python scripts/grammar_engines.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
        "vocabulary": f"Qwen3 (tests/real_tokenizers.py), {tok.hf.get_vocab_size()} tokens, {V} logits",
        "eos_ids": list(eos),
        "documents": {k: {"text": d, "tokens": len(tok.encode(d))} for k, d in DOCS.items()},
        "schema": SCHEMA,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "platform": platform.platform(), "python": platform.python_version()},
        "unpack_us": round(unpack_us, 1),
        "engines": results,
        "end_to_end": end_to_end(tok) if args.e2e else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(markdown_table(out))
    print("end to end:", json.dumps(out["end_to_end"]))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
