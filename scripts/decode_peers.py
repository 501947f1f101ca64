"""Side-by-side greedy AR decoding: jaxtok ``generate`` vs Tunix's ``Sampler`` vs HF transformers ``generate``.

One random Qwen3-shaped model (hidden 256, 4 layers, 4 query / 2 KV heads of 64, MLP 768, tied embeddings, Qwen3's
151,936-entry vocabulary unless ``--vocab`` says otherwise) is built by jaxtok, written as HF safetensors
(``jaxtok.models.hf.save_hf``) and loaded from that file by HF (torch, ``--torch-threads`` threads, eager attention)
and by Tunix (``tunix.models.qwen3.params.create_model_from_safe_tensors``), so all three run the same weights.
Each framework generates ``--new-tokens`` greedy tokens after a ``--prompt-len``-token random prompt (same ids in
all three; token 1 is the stop token everywhere, token 0 the pad; the run checks that no row stops early and how
many generated tokens agree across frameworks). Every call is timed end to end (prefill, decode loop, result on the
host), after a warm-up call that compiles.

Tunix is optional: it runs in a worker subprocess of ``--tunix-python`` (a separate venv, e.g.
``python3 -m venv /work/tunix-venv && /work/tunix-venv/bin/pip install google-tunix``), driven over stdin/stdout,
so its dependencies never touch the main environment; HF is optional too (``--no-hf``).

Timing is interleaved: for each repeat, each batch size, the frameworks run one call each, in an order rotated
per repeat; the ratio ``jaxtok tokens/s / peer tokens/s`` is taken per repeat and the median over repeats is
reported (robust to a shared, busy machine).

    python scripts/decode_peers.py --tunix-python /work/tunix-venv/bin/python \\
        --json docs/results/decode_peers.json --md docs/results/decode_peers.md

Optionally ``--spec`` adds ``spec_copy_vs_ar_b1``: jaxtok's speculative loop with the draft = a copy of the target
(greedy, γ = ``--draft-len``) against jaxtok's AR on the same prompts. ``spec_vs_ar_b1`` / ``spec_vs_ar_b64`` (a
trained memory-bound target/draft pair) are written by ``scripts/spec_membound.py``; rewriting ``--json`` keeps
the keys of the existing file that this run does not produce.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

STOP_ID, PAD_ID = 1, 0
SHAPE = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)


# ----------------------------------------------------------------------------------------------------------------
# Tunix worker (runs inside the Tunix venv; imports nothing from jaxtok)
# ----------------------------------------------------------------------------------------------------------------


class _IdTokenizer:
    """A tokenizer for Tunix's Sampler over space-separated ids: the prompt ids go in unchanged."""

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return 0  # falsy: Tunix prepends no BOS

    def eos_id(self):
        return STOP_ID

    def pad_id(self):
        return PAD_ID


def tunix_worker(model_dir: str, cache_size: int, dtype: str) -> None:
    """Line protocol: ``{"prompt": [[ids]], "new": n}`` -> ``{"seconds": s, "tokens": [[ids]]}``."""
    import jax
    import jax.numpy as jnp
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as qwen3_model
    from tunix.models.qwen3 import params as qwen3_params
    import tunix

    cfg_hf = json.load(open(os.path.join(model_dir, "config.json")))
    cfg = qwen3_model.ModelConfig(
        num_layers=cfg_hf["num_hidden_layers"], vocab_size=cfg_hf["vocab_size"], embed_dim=cfg_hf["hidden_size"],
        hidden_dim=cfg_hf["intermediate_size"], num_heads=cfg_hf["num_attention_heads"], head_dim=cfg_hf["head_dim"],
        num_kv_heads=cfg_hf["num_key_value_heads"], rope_theta=int(cfg_hf.get("rope_theta", 1_000_000)),
        norm_eps=cfg_hf["rms_norm_eps"], use_tied_embedding=cfg_hf.get("tie_word_embeddings", False),
        dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    model = qwen3_params.create_model_from_safe_tensors(model_dir, cfg, mesh=None, dtype=jnp.dtype(dtype))
    cache = sampler_lib.CacheConfig(cache_size=cache_size, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, _IdTokenizer(), cache)
    version = getattr(tunix, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("google-tunix")
    print(json.dumps({"ready": True, "tunix": version, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        texts = [" ".join(str(t) for t in row) for row in req["prompt"]]
        t0 = time.perf_counter()
        out = sampler(texts, max_generation_steps=req["new"], max_prompt_length=len(req["prompt"][0]),
                      temperature=0.0, eos_tokens=[STOP_ID], echo=False)
        toks = [np.asarray(t).tolist() for t in out.tokens]
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "tokens": toks}), flush=True)


class TunixPeer:
    def __init__(self, python: str, model_dir: str, cache_size: int, dtype: str, path: str | None = None):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the worker's venv, not this one's (``path``: packages carried beside it)
        if path:
            env["PYTHONPATH"] = path
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", "tunix", "--model-dir", model_dir,
             "--cache-size", str(cache_size), "--dtype", dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tunix worker exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def __call__(self, prompt: np.ndarray, new: int):
        self.proc.stdin.write(json.dumps({"prompt": prompt.tolist(), "new": new}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], r["tokens"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------------------------------
# jaxtok and HF sides (main venv)
# ----------------------------------------------------------------------------------------------------------------


def build_model(vocab: int, seed: int, dtype: str = "float32"):
    from flax import nnx

    from jaxtok.models import Decoder
    from jaxtok.models.transformer import ModelConfig

    cfg = ModelConfig(vocab_size=vocab, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                      qk_norm=True, architecture="qwen3", max_position_embeddings=4096, dtype=dtype,
                      param_dtype=dtype, **SHAPE)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def jaxtok_runner(model, new: int, generate_file: str | None = None, logprobs: bool | None = False):
    import jax
    import jax.numpy as jnp

    from jaxtok.decode.generate import generate
    from jaxtok.sampling import GREEDY

    if generate_file:  # another version of decode/generate.py (e.g. `git show <rev>:decode/generate.py`)
        import importlib.util

        spec = importlib.util.spec_from_file_location("_baseline_generate", generate_file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # (dataclasses look their module up there)
        spec.loader.exec_module(mod)
        generate = mod.generate

    key = jax.random.key(0)
    extra = {} if logprobs is None else {"return_logprobs": logprobs}

    def run(prompt: np.ndarray):
        t0 = time.perf_counter()
        res = generate(model, jnp.asarray(prompt), jnp.ones(prompt.shape, bool), max_new_tokens=new,
                       sampling=GREEDY, stop_tokens=(STOP_ID,), pad_id=PAD_ID, rng=key, **extra)
        toks, lengths = jax.device_get((res.tokens, res.lengths))
        dt = time.perf_counter() - t0
        return dt, [row[:n].tolist() for row, n in zip(toks, lengths)]

    return run


def spec_runner(model, new: int, draft_len: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtok.decode.speculative import ModelDrafter, speculative_generate
    from jaxtok.sampling import GREEDY

    draft = nnx.clone(model)
    drafter = ModelDrafter.of(draft)
    key = jax.random.key(0)

    def run(prompt: np.ndarray):
        t0 = time.perf_counter()
        res = speculative_generate(model, drafter, jnp.asarray(prompt), jnp.ones(prompt.shape, bool),
                                   max_new_tokens=new, draft_len=draft_len, sampling=GREEDY,
                                   stop_tokens=(STOP_ID,), pad_id=PAD_ID, rng=key)
        toks, lengths = jax.device_get((res.tokens, res.lengths))
        dt = time.perf_counter() - t0
        return dt, [row[:n].tolist() for row, n in zip(toks, lengths)]

    return run


def hf_runner(model_dir: str, new: int, threads: int, dtype: str = "float32", device: str = "cpu",
              attn: str = "eager"):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                              attn_implementation=attn).eval().to(device)

    def run(prompt: np.ndarray):
        ids = torch.from_numpy(np.asarray(prompt, np.int64)).to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 eos_token_id=STOP_ID, pad_token_id=PAD_ID)
        gen = out[:, ids.shape[1]:].cpu().numpy()  # the copy waits for the device
        dt = time.perf_counter() - t0
        rows = []
        for row in gen:
            stop = np.nonzero(row == STOP_ID)[0]
            rows.append(row[: stop[0] + 1 if len(stop) else len(row)].tolist())
        return dt, rows

    return run, transformers.__version__, torch.__version__


def profile(model, batch: int, prompt_len: int, new: int, generate_file, trace_dir: str, top: int = 14) -> None:
    """Per-op time of one greedy call (``jax.profiler`` trace, XLA:CPU thunk events), summed over the call and
    divided by the decode steps: where one AR step's time goes."""
    import collections
    import glob
    import gzip

    import jax

    run = jaxtok_runner(model, new, generate_file, logprobs=None if generate_file else False)
    prompt = np.random.RandomState(0).randint(3, model.cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    run(prompt)
    with jax.profiler.trace(trace_dir):
        wall, _ = run(prompt)
    events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]))
    ops = collections.Counter()
    for e in events["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("$", "end:")) and "Thunk" not in name and "Slinky" not in name \
                and "PjRt" not in name and "Pjit" not in name and not name.startswith(("np.", "while")):
            ops[name] += e["dur"]
    steps = new - 1
    print(f"batch {batch} ({generate_file or 'decode/generate.py, return_logprobs=False'}): call {wall * 1e3:.0f} ms "
          f"= {wall * 1e3 / new:.2f} ms/token; XLA ops {sum(ops.values()) / 1e3 / steps:.2f} ms per decode step")
    for name, us in ops.most_common(top):
        print(f"  {us / 1e3 / steps:8.2f} ms/step  {name}")


def peers_of(names: list) -> list:
    return [n for n in names if n not in ("jaxtok", "before", "jaxtok_lp")]


def agreement(a: list, b: list) -> float:
    """Fraction of positions (over the longer of each pair of rows) where the two token lists agree."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    return same / max(total, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["tunix"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tunix-python", default=None, help="python of a venv with google-tunix (omit: no Tunix)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and compute of all three (stored so in the HF export)")
    ap.add_argument("--hf-device", default="cpu", help="torch device of HF generate (cuda on a GPU machine)")
    ap.add_argument("--hf-attn", default="eager", help="HF attn_implementation (eager, sdpa)")
    ap.add_argument("--tunix-path", default=None,
                    help="PYTHONPATH of the Tunix worker (packages carried beside --tunix-python's own)")
    ap.add_argument("--spec", action="store_true", help="also time speculative (draft = target copy) at batch 1")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--baseline-generate", default=None,
                    help="a decode/generate.py file of another revision, timed as 'before' in the same run")
    ap.add_argument("--with-logprobs", action="store_true",
                    help="also time jaxtok with per-token log-probs (generate's default), rows jaxtok_lp_b*")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH",
                    help="only print where one jaxtok AR step's time goes at this batch (jax.profiler)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.worker == "tunix":
        tunix_worker(args.model_dir, args.cache_size, args.dtype)
        return 0

    import jax

    from jaxtok.models.hf import save_hf

    t_start = time.time()
    model = build_model(args.vocab, args.seed, args.dtype)
    if args.profile is not None:
        for f in ([args.baseline_generate] if args.baseline_generate else []) + [None]:
            trace_dir = tempfile.mkdtemp(prefix="trace_")
            profile(model, args.profile, args.prompt_len, args.new_tokens, f, trace_dir)
            shutil.rmtree(trace_dir, ignore_errors=True)
        return 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    tmp = tempfile.mkdtemp(prefix="decode_peers_")
    save_hf(model, tmp)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rng = np.random.RandomState(args.seed)
    prompts = {b: rng.randint(3, args.vocab, (b, args.prompt_len)).astype(np.int32) for b in batches}

    # "jaxtok": tokens only, the work the peers do (Tunix's and HF's greedy defaults return no log-probs);
    # "jaxtok_lp": generate's default, with per-token log-probs
    runners = {"jaxtok": jaxtok_runner(model, args.new_tokens)}
    if args.with_logprobs:
        runners["jaxtok_lp"] = jaxtok_runner(model, args.new_tokens, logprobs=True)
    if args.baseline_generate:
        runners["before"] = jaxtok_runner(model, args.new_tokens, args.baseline_generate, logprobs=None)
    versions = {"jax": jax.__version__}
    tunix = None
    if args.tunix_python:
        tunix = TunixPeer(args.tunix_python, tmp, args.prompt_len + args.new_tokens, args.dtype, args.tunix_path)
        versions["tunix"] = tunix.info.get("tunix")
        versions["tunix_jax"] = tunix.info.get("jax")
        runners["tunix"] = lambda p: tunix(p, args.new_tokens)
    if not args.no_hf:
        hf, versions["transformers"], versions["torch"] = hf_runner(tmp, args.new_tokens, args.torch_threads,
                                                                      args.dtype, args.hf_device, args.hf_attn)
        runners["hf"] = hf
    spec = spec_runner(model, args.new_tokens, args.draft_len) if args.spec else None

    names = list(runners)
    times = {(n, b): [] for n in names for b in batches}
    tokens = {}
    spec_times, ar_b1_times, spec_tokens = [], [], None
    for b in batches:  # warm-up (compiles) and the outputs compared
        for n in names:
            _, tokens[(n, b)] = runners[n](prompts[b])
            print(f"warm {n} b={b}", flush=True)
    if spec is not None:
        _, spec_tokens = spec(prompts[1])
    for r in range(args.repeats):
        for b in batches:
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                dt, _ = runners[n](prompts[b])
                times[(n, b)].append(dt)
            print(f"repeat {r} b={b} " + " ".join(f"{n}={times[(n, b)][-1]:.2f}s" for n in names), flush=True)
        if spec is not None:
            pair = [("ar", runners["jaxtok"]), ("spec", spec)]
            for name, fn in (pair if r % 2 == 0 else pair[::-1]):
                dt, _ = fn(prompts[1])
                (ar_b1_times if name == "ar" else spec_times).append(dt)
            print(f"repeat {r} spec={spec_times[-1]:.2f}s ar={ar_b1_times[-1]:.2f}s", flush=True)
    if tunix is not None:
        tunix.close()
    shutil.rmtree(tmp, ignore_errors=True)

    command = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:]))
    settings = {"model": {**SHAPE, "vocab_size": args.vocab, "qwen3": True, "tie_embeddings": True,
                          "params": n_params, "dtype": args.dtype, "weights": f"random, seed {args.seed}"},
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "greedy": True,
                "stop_token": STOP_ID, "repeats": args.repeats, "torch_threads": args.torch_threads,
                "timing": "end to end per call (prefill + loop + host copy), compiled/warmed first; interleaved "
                          "repeats with rotated order; ratio = median over repeats of per-repeat "
                          "jaxtok tokens/s / peer tokens/s",
                "hf_device": args.hf_device, "hf_attn": args.hf_attn,
                "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)", "jax_devices": str(jax.devices()),
                "versions": versions}
    results: dict = {"settings": settings, "command": command,
                     "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)), "rows": {}}
    for b in batches:
        for n in names:
            ts = np.array(times[(n, b)])
            lengths = [len(t) for t in tokens[(n, b)]]
            results["rows"][f"{n}_b{b}"] = {
                "tokens_per_s": float(np.median(b * args.new_tokens / ts)),
                "ms_per_step": float(np.median(ts) / args.new_tokens * 1e3),
                "seconds": [float(x) for x in ts], "min_len": min(lengths), "max_len": max(lengths),
                "agree_with_jaxtok": agreement(tokens[(n, b)], tokens[("jaxtok", b)]),
            }
        for n in names[1:]:
            if n in ("before", "jaxtok_lp"):
                continue
            if "before" in names:
                ratios = np.array(times[(n, b)]) / np.array(times[("before", b)])
                results[f"before_ar_vs_{n}_b{b}"] = {"ratio": float(np.median(ratios)),
                                                     "per_repeat": [float(x) for x in ratios]}
            ratios = np.array(times[(n, b)]) / np.array(times[("jaxtok", b)])  # = jaxtok tok/s / peer tok/s
            results[f"ar_vs_{n}_b{b}"] = {
                "ratio": float(np.median(ratios)), "per_repeat": [float(x) for x in ratios],
                "jaxtok_tokens_per_s": results["rows"][f"jaxtok_b{b}"]["tokens_per_s"],
                "peer_tokens_per_s": results["rows"][f"{n}_b{b}"]["tokens_per_s"],
                "batch": b, "peer": n, "token_agreement": results["rows"][f"{n}_b{b}"]["agree_with_jaxtok"],
                "settings": "see settings", "command": command,
            }
        for n in peers_of(names) if "jaxtok_lp" in names else []:
            ratios = np.array(times[(n, b)]) / np.array(times[("jaxtok_lp", b)])
            results[f"ar_lp_vs_{n}_b{b}"] = {"ratio": float(np.median(ratios)),
                                             "per_repeat": [float(x) for x in ratios],
                                             "note": "jaxtok with per-token log-probs (generate's default)"}
        if "before" in names:
            ratios = np.array(times[("before", b)]) / np.array(times[("jaxtok", b)])
            results[f"after_vs_before_b{b}"] = {"ratio": float(np.median(ratios)),
                                                "per_repeat": [float(x) for x in ratios],
                                                "before": args.baseline_generate}
    if spec is not None:
        ratios = np.array(ar_b1_times) / np.array(spec_times)
        results["spec_copy_vs_ar_b1"] = {
            "ratio": float(np.median(ratios)), "per_repeat": [float(x) for x in ratios],
            "draft": "a copy of the target (acceptance ~1)", "draft_len": args.draft_len, "batch": 1,
            "token_identical_to_ar": spec_tokens == tokens[("jaxtok", 1)],
            "spec_tokens_per_s": float(np.median(args.new_tokens / np.array(spec_times))),
            "ar_tokens_per_s": float(np.median(args.new_tokens / np.array(ar_b1_times))),
            "settings": "see settings", "command": command,
        }
    if args.json and os.path.isfile(args.json):  # keep keys written by other scripts (spec_membound.py)
        with open(args.json) as f:
            old = json.load(f)
        results = results | {k: v for k, v in old.items() if k not in results}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results, names, batches))
    return 0


def markdown(res: dict, names: list, batches: list) -> str:
    peers = [n for n in names[1:] if n not in ("before", "jaxtok_lp")]
    s = res["settings"]
    m = s["model"]
    lines = [
        "# Greedy AR decoding side by side: jaxtok vs Tunix vs HF transformers",
        "",
        f"Measured {res['measured_utc']} UTC on the shared {s['machine']} machine with `{res['command']}`.",
        "",
        f"Model: random Qwen3-shaped decoder, hidden {m['hidden_size']}, {m['num_layers']} layers, "
        f"{m['num_heads']} query / {m['num_kv_heads']} KV heads of {m['head_dim']}, MLP {m['intermediate_size']}, "
        f"vocabulary {m['vocab_size']:,}, tied embeddings, float32 ({m['params'] / 1e6:.1f}M parameters); the same "
        f"weights in all frameworks (jaxtok writes HF safetensors, HF and Tunix load them). Prompt "
        f"{s['prompt_len']} random tokens, {s['new_tokens']} greedy new tokens, {s['repeats']} interleaved repeats; "
        f"HF with torch {s['torch_threads']} thread(s). Versions: "
        + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ".",
        "",
        "Ratio = median over repeats of (jaxtok tokens/s ÷ peer tokens/s) within the same repeat; > 1 means jaxtok "
        "is faster. `agree` = fraction of generated tokens equal to jaxtok's.",
        "",
        "| batch | " + " | ".join(f"{n} tokens/s (ms/step)" for n in names) + " | "
        + " | ".join(f"jaxtok / {n}" for n in peers) + " | " + " | ".join(f"agree {n}" for n in names[1:]) + " |",
        "|---" * (1 + len(names) + len(peers) + len(names) - 1) + "|",
    ]
    for b in batches:
        rows = [res["rows"][f"{n}_b{b}"] for n in names]
        lines.append(
            f"| {b} | " + " | ".join(f"{r['tokens_per_s']:.0f} ({r['ms_per_step']:.1f})" for r in rows) + " | "
            + " | ".join(f"**{res[f'ar_vs_{n}_b{b}']['ratio']:.2f}**" for n in peers) + " | "
            + " | ".join(f"{res['rows'][f'{n}_b{b}']['agree_with_jaxtok']:.3f}" for n in names[1:]) + " |")
    if "jaxtok_lp" in names:
        lines += ["", "`jaxtok` generates tokens only (`return_logprobs=False`), the work Tunix's and HF's greedy "
                  "defaults do; `jaxtok_lp` is `generate`'s default, which also returns each token's log-prob: "
                  + ", ".join(f"batch {b}: jaxtok_lp / " + ", jaxtok_lp / ".join(
                      f"{n} {res[f'ar_lp_vs_{n}_b{b}']['ratio']:.2f}" for n in peers) for b in batches) + "."]
    if "before" in names:
        lines += ["", "`before` = jaxtok's generate at an earlier revision, timed in the same run: "
                  + ", ".join(f"batch {b}: after/before {res[f'after_vs_before_b{b}']['ratio']:.2f}×, before/"
                              + ", before/".join(f"{n} {res[f'before_ar_vs_{n}_b{b}']['ratio']:.2f}" for n in peers)
                              for b in batches) + "."]
    if "spec_copy_vs_ar_b1" in res:
        sp = res["spec_copy_vs_ar_b1"]
        lines += ["", f"Speculative (draft = a copy of the target, γ = {sp['draft_len']}, greedy) at batch 1: "
                      f"{sp['spec_tokens_per_s']:.0f} tokens/s vs AR {sp['ar_tokens_per_s']:.0f}: "
                      f"**{sp['ratio']:.2f}×** (`spec_copy_vs_ar_b1`; token-identical: {sp['token_identical_to_ar']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
