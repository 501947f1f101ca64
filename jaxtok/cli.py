"""The ``jaxtok`` command line.

``jaxtok {train,eval,decode,bench} CONFIG [key=value ...]`` load a config, apply dotted overrides, validate it
(bad keys, types, ranges and method names exit with code 2 before any compute), create the run directory
``<run.out_dir>/<run.name or config stem>`` with the resolved ``config.yaml``, and run. ``jaxtok run RECIPE``
runs a multi-stage recipe (:mod:`jaxtok.recipe`); ``jaxtok convert`` converts between HF and jaxtok checkpoints;
``jaxtok validate`` prints the resolved config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from jaxtok.config import Config, ConfigError, load_config, to_yaml, validate_names

EXIT_CONFIG = 2


# ----------------------------------------------------------------------------------------------------------------
# Handlers: (cfg, run_dir) -> result dict
# ----------------------------------------------------------------------------------------------------------------


def _train(cfg: Config, run_dir: Path) -> dict:
    from jaxtok.train.loop import train

    return train(cfg, run_dir)


def _eval(cfg: Config, run_dir: Path) -> dict:
    from jaxtok.train.loop import evaluate

    return evaluate(cfg, run_dir)


def _decode(cfg: Config, run_dir: Path) -> dict:
    """Greedy/sampled AR decoding of held-out prompts with the model of ``model.init_from`` (or ``hf_path``);
    writes results.json, a markdown table of samples and the accuracy."""
    import time

    import jax
    import numpy as np

    from jaxtok import mesh as mesh_lib
    from jaxtok.data import make_task_from_config, prompt_dataset
    from jaxtok.decode.generate import generate
    from jaxtok.metrics import write_results
    from jaxtok.tasks.tokenizer import SpecialTokens, decode
    from jaxtok.train.loop import build_model, load_tokenizer_for

    if cfg.decode.method != "ar":
        raise ConfigError(f"decode.method={cfg.decode.method!r}: only 'ar' is available so far")
    if not (cfg.model.init_from or cfg.model.hf_path):
        raise ConfigError("decode needs trained weights: set model.init_from=<run dir> or model.hf_path=<HF dir>")
    mesh = mesh_lib.mesh_from_config(cfg.mesh)
    tok = load_tokenizer_for(cfg)
    model = build_model(cfg, tok.get_vocab_size(), mesh=mesh)
    task = make_task_from_config(cfg.data)
    sp = SpecialTokens.of(tok)
    ds, _ = prompt_dataset(task, "eval", tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                           num_examples=cfg.data.num_eval, overlong=cfg.data.overlong)
    rows, hits, n_tok, wall = [], 0.0, 0, 0.0
    key = jax.random.key(cfg.train.seed)
    for batch in ds:
        B = batch["prompt"].shape[0]
        t0 = time.perf_counter()
        key, sub = jax.random.split(key)
        out = generate(model, batch["prompt"], batch["prompt_valid"], max_new_tokens=cfg.decode.max_new_tokens,
                       temperature=cfg.decode.temperature, top_k=cfg.decode.top_k, top_p=cfg.decode.top_p,
                       min_p=cfg.decode.min_p, rng=sub, stop_tokens=(sp.eos,), pad_id=sp.pad, mesh=mesh)
        tokens = np.asarray(jax.device_get(out.tokens))
        wall += time.perf_counter() - t0
        n_tok += int(np.asarray(out.valid).sum())
        for r in range(B):
            ex = task.example("eval", int(batch["index"][r]))
            text = decode(tok, tokens[r])
            ok = task.reward(text, ex) >= 1.0
            hits += ok
            if len(rows) < 20:
                rows.append({"prompt": ex.prompt, "completion": text, "answer": ex.answer, "correct": bool(ok)})
    total = cfg.data.num_eval
    results = {"exact_match": hits / max(total, 1), "num_examples": total, "generated_tokens": n_tok,
               "tokens_per_s": n_tok / max(wall, 1e-9), "wall_s": wall}
    write_results(run_dir, results, rows, title=f"decode samples (exact match {results['exact_match']:.3f})")
    print(json.dumps(results, indent=2))
    return results


def _bench(cfg: Config, run_dir: Path) -> dict:
    import importlib

    from jaxtok.registry import BENCHES

    try:
        importlib.import_module("jaxtok.bench")
    except ModuleNotFoundError:
        pass
    return BENCHES.get(cfg.bench.name, "bench.name")(cfg, run_dir)


HANDLERS = {"train": _train, "eval": _eval, "decode": _decode, "bench": _bench}


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxtok", description="Token-level post-training and decoding in JAX/Flax NNX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "train": "train a model as the config says (resumes a run directory's last good checkpoint)",
        "eval": "held-out evaluation of a run directory or model.init_from",
        "decode": "decode held-out prompts with a trained model; writes samples and accuracy",
        "bench": "run a benchmark (bench.name); writes results.json, a table and plots",
        "validate": "check a config (keys, types, ranges, method names) and print it resolved",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-3 train.steps=100")
    sp = sub.add_parser("run", help="run a multi-stage recipe (stages cached by content)",
                        description="run a multi-stage recipe (stages cached by content)")
    sp.add_argument("config", help="recipe YAML (stages: [{name, command, config, overrides}])")
    sp.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
    sp = sub.add_parser("convert", help="convert checkpoints: HF directory <-> jaxtok run directory",
                        description="convert checkpoints: HF directory <-> jaxtok run directory")
    sp.add_argument("direction", choices=["to-jax", "to-hf"])
    sp.add_argument("src", help="source directory")
    sp.add_argument("dst", help="destination directory")
    sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="stored dtype")
    sp.add_argument("--diffusion", action="store_true", help="to-jax: load as a masked-diffusion LM (LLaDA/Dream)")
    sp.add_argument("--mask-token-id", dest="mask_token_id", type=int, default=None)
    sp.add_argument("--architecture", default=None, help="llama | qwen2 | qwen3")
    return p


def run_dir_for(cfg: Config, config_path: str) -> Path:
    return Path(cfg.run.out_dir) / (cfg.run.name or Path(config_path).stem)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            from jaxtok.models.hf import convert_main

            return convert_main(args) or 0
        if args.command == "run":
            from jaxtok.recipe import run_recipe

            run_recipe(args.config, args.overrides)
            return 0
        cfg = load_config(args.config, args.overrides)
        validate_names(cfg)
        if args.command == "validate":
            print(to_yaml(cfg), end="")
            return 0
        run_dir = run_dir_for(cfg, args.config)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        HANDLERS[args.command](cfg, run_dir)
        print(f"run directory: {run_dir}")
        return 0
    except ConfigError as e:
        print(f"jaxtok: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except FileNotFoundError as e:
        print(f"jaxtok: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
