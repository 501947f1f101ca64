"""The ``jaxtok`` command line.

``jaxtok {train,eval,decode,bench} CONFIG [key=value ...]`` loads a config, applies dotted overrides and
validates it (bad keys, types, ranges, method names and missing input paths exit with code 2 before any compute;
JAX is imported only by the handlers), creates the run directory ``<run.out_dir>/<run.name or config stem>`` with
the resolved ``config.yaml``, and calls the command's handler ``(cfg, run_dir) -> dict``:

==========  =====================================
train       ``jaxtok.train.loop.train``
eval        ``jaxtok.train.loop.evaluate``
decode      ``jaxtok.decode.run_decode``
bench       ``jaxtok.train.bench.run_bench``
==========  =====================================

``jaxtok run RECIPE`` runs a multi-stage recipe (:mod:`jaxtok.recipe`); ``jaxtok convert {to-jax,to-hf} SRC DST``
converts between HF and jaxtok checkpoints (``jaxtok.models.hf.convert_main``); ``jaxtok validate CONFIG``
checks a config and prints it resolved.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from jaxtok.config import Config, ConfigError, check_paths, load_config, to_yaml, validate_names
from jaxtok.model_source import check_model_paths

EXIT_OK, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 2

# command -> (module, function) of its handler, imported only when the command runs.
HANDLER_PATHS = {
    "train": ("jaxtok.train.loop", "train"),
    "eval": ("jaxtok.train.loop", "evaluate"),
    "decode": ("jaxtok.decode", "run_decode"),
    "bench": ("jaxtok.train.bench", "run_bench"),
}
# Handlers set here (tests, plug-ins) take precedence over HANDLER_PATHS.
HANDLERS: dict[str, Callable] = {}

_HELP = {
    "train": "train a model as the config says (resumes the run directory's last good checkpoint)",
    "eval": "held-out evaluation of a run directory or model.init_from",
    "decode": "decode held-out prompts with a trained model; writes samples, accuracy and tokens/s",
    "bench": "run a benchmark (bench.name); writes results.json, a markdown table and plots",
    "validate": "check a config (keys, types, ranges, method names) and print it resolved",
}


class HandlerUnavailable(RuntimeError):
    """The module or function implementing a command does not exist (yet)."""


def get_handler(command: str) -> Callable:
    """The handler ``(cfg, run_dir) -> dict`` of ``command``; HandlerUnavailable names what is missing."""
    if command in HANDLERS:
        return HANDLERS[command]
    module, attr = HANDLER_PATHS[command]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # a missing dependency inside an existing module is a real error
        raise HandlerUnavailable(f"'jaxtok {command}' is not available: module {module} does not exist yet") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise HandlerUnavailable(f"'jaxtok {command}' is not available: {module} has no function {attr}() yet")
    return fn


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtok", description="Token-level post-training and decoding in JAX/Flax NNX, driven by config files.",
        epilog="Run 'jaxtok COMMAND --help' for a command's arguments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _HELP.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", help="YAML config file (may include others with 'base: other.yaml')")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optimizer.lr=1e-3 train.steps=100")
    text = "run a multi-stage recipe; each stage is cached by the hash of its resolved config and upstream stages"
    sp = sub.add_parser("run", help=text, description=text)
    sp.add_argument("config", help="recipe YAML: stages: [{name, command, config, overrides}]")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides applied to every stage")
    text = "convert checkpoints: HF directory <-> jaxtok run directory"
    sp = sub.add_parser("convert", help=text, description=text)
    sp.add_argument("direction", choices=["to-jax", "to-hf"], help="to-jax: HF -> jaxtok; to-hf: jaxtok -> HF")
    sp.add_argument("src", help="source directory")
    sp.add_argument("dst", help="destination directory")
    sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="stored dtype")
    sp.add_argument("--diffusion", action="store_true", help="to-jax: load as a masked-diffusion LM (LLaDA/Dream)")
    sp.add_argument("--mask-token-id", dest="mask_token_id", type=int, default=None,
                    help="to-jax --diffusion: the mask token (default: from config.json)")
    sp.add_argument("--architecture", default=None, help="llama | qwen2 | qwen3 (to-hf: the class to write)")
    return p


def run_dir_for(cfg: Config, config_path: str | Path) -> Path:
    """``<run.out_dir>/<run.name or the config file's stem>``."""
    return Path(cfg.run.out_dir) / (cfg.run.name or Path(config_path).stem)


def prepare(command: str, config_path: str | Path, overrides: Sequence[str]) -> tuple[Config, Path, Callable]:
    """Load and fully check the config, resolve the handler, then create the run directory with ``config.yaml``.
    Raises ConfigError or HandlerUnavailable before anything is written."""
    cfg = load_config(config_path, overrides)
    validate_names(cfg)
    check_paths(cfg)
    check_model_paths(cfg)  # each model directory: a jaxtok run or a supported HF checkpoint
    handler = get_handler(command)
    run_dir = run_dir_for(cfg, config_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return cfg, run_dir, handler


def _convert(args) -> int:
    try:
        from jaxtok.models.hf import convert_main
    except ModuleNotFoundError as e:
        raise HandlerUnavailable(f"'jaxtok convert' is not available: {e}") from None
    try:
        return convert_main(args) or EXIT_OK
    except (ValueError, FileNotFoundError) as e:  # bad direction, architecture, missing or corrupt source
        raise ConfigError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jaxtok`` console script; returns the exit code (2: bad config or arguments)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "run":
            from jaxtok.recipe import run_recipe

            run_recipe(args.config, args.overrides)
            return EXIT_OK
        if args.command == "validate":
            cfg = load_config(args.config, args.overrides)
            validate_names(cfg)
            print(to_yaml(cfg), end="")
            return EXIT_OK
        cfg, run_dir, handler = prepare(args.command, args.config, args.overrides)
        handler(cfg, run_dir)
        print(f"run directory: {run_dir}")
        return EXIT_OK
    except ConfigError as e:
        print(f"jaxtok: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except HandlerUnavailable as e:
        print(f"jaxtok: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
