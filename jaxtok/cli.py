"""The ``jaxtok`` command line.

``jaxtok {train,eval,decode,bench} CONFIG [key=value ...]`` loads a config, applies dotted overrides and
validates it (bad keys, types, ranges, method names and missing input paths exit with code 2 before any compute;
JAX is imported only by the handlers), creates the run directory ``<run.out_dir>/<run.name or config stem>`` with
the resolved ``config.yaml``, and calls the command's handler ``(plan, run_dir) -> dict`` (``train``, ``eval``: the
:class:`~jaxtok.plan.RunPlan` validation resolved; ``decode``, ``bench``: its Config):

==========  =====================================
train       ``jaxtok.train.loop.train``
eval        ``jaxtok.train.loop.evaluate``
decode      ``jaxtok.decode.run_decode``
bench       ``jaxtok.bench.run_bench``
==========  =====================================

``jaxtok run RECIPE`` runs a multi-stage recipe (:mod:`jaxtok.recipe`); ``jaxtok convert {to-jax,to-hf} SRC DST``
converts between HF and jaxtok checkpoints (``jaxtok.models.hf.convert_main``); ``jaxtok validate CONFIG|RECIPE``
checks a config and prints it resolved (a recipe: every stage's config with its overrides); ``jaxtok list [KIND]``
prints the registered objectives, policies, presets, tasks, benchmarks and rewards with their arguments;
``jaxtok --version``.

Exit codes: 0 done; 2 a user error (bad config, override, file, run directory in use or holding another run,
unusable checkpoint), one line naming the key or file, never a traceback (``--debug`` or ``JAXTOK_DEBUG=1`` shows
it); 1 the environment failed the run (a checkpoint or output that cannot be written, e.g. a full disk: the last
good checkpoint stays intact and the same command resumes once there is room) or a command is not available;
130 interrupted (Ctrl-C): the run directory keeps its last good checkpoint and the same command resumes.

``jaxtok train`` into a run directory (:mod:`jaxtok.rundir`): the directory is locked (``train.lock``) for the
run; resuming compares the stored ``config.yaml`` with the new config and refuses any difference outside
``jaxtok.rundir.RESUMABLE_KEYS``; ``run.resume=false`` into a directory holding a run needs
``run.overwrite=true``; a finished run is not trained again and its ``config.yaml``/``summary.json`` are kept.
Other commands pointed at a training run's directory write their resolved config as ``config.<command>.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import re
import sys
import textwrap
import traceback
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from jaxtok import rundir
from jaxtok.config import Config, ConfigError, check_paths, load_config, to_yaml, validate_names
# The command table lives in jaxtok.handlers (recipes run the same handlers); tests and plug-ins patch HANDLERS and
# HANDLER_PATHS through this module (the same dicts).
from jaxtok.handlers import HANDLER_PATHS, HANDLERS, PLAN_COMMANDS, HandlerUnavailable, get_handler  # noqa: F401
from jaxtok.model_source import check_model_paths
from jaxtok.plan import RunPlan

EXIT_OK, EXIT_UNAVAILABLE, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_FAILED = 1  # the environment failed the run (a checkpoint or output that cannot be written)

_HELP = {
    "train": "train a model as the config says (resumes the run directory's last good checkpoint)",
    "eval": "held-out evaluation of a run directory or model.init_from",
    "decode": "decode held-out prompts with a trained model; writes samples, accuracy and tokens/s",
    "bench": "run a benchmark (bench.name); writes results.json, a markdown table and plots",
    "validate": "check a config (keys, types, ranges, method names) and print it resolved; a recipe: every stage",
}

# jaxtok list KIND -> (registry name in jaxtok.registry, modules that register into it, what it names)
LIST_KINDS = {
    "objectives": ("OBJECTIVES", ("jaxtok.train.objectives",), "objective.name"),
    "policies": ("COMMIT_POLICIES", ("jaxtok.decode",), "decode.policy with decode.method=diffusion"),
    "guides": ("LOGIT_GUIDES", ("jaxtok.decode",), "decode.policy with decode.method=greedy|sample"),
    "draft-policies": ("DRAFT_POLICIES", ("jaxtok.decode",), "decode.policy with decode.method=speculative"),
    "decode-methods": ("DECODE_METHODS", ("jaxtok.decode",), "decode.method (ead, lave: arguments in "
                       "decode.policy_args)"),
    "drafters": ("DRAFTERS", ("jaxtok.decode",), "decode.drafter with decode.method=speculative"),
    "presets": (None, ("jaxtok.models.presets",), "model.preset"),
    "tasks": ("TASKS", ("jaxtok.tasks",), "data.task"),
    "benches": ("BENCHES", ("jaxtok.bench",), "bench.name"),
    "rewards": ("REWARDS", ("jaxtok.train.rewards",), "rollout.rewards keys"),
    "selections": ("SELECTIONS", ("jaxtok.select",), "objective.args.selection.rule"),
    "loss-modes": ("LOSS_MODES", ("jaxtok.policy",), "objective.args.loss_mode of policy_gradient; "
                   "its own args are objective.args keys prefixed ctpo_/cppo_/appo_"),
}


def version() -> str:
    """The installed package version (``jaxtok.__version__`` when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("jaxtok")
    except (ImportError, PackageNotFoundError):
        import jaxtok

        return jaxtok.__version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtok", description="Token-level post-training and decoding in JAX/Flax NNX, driven by config files.",
        epilog="Run 'jaxtok COMMAND --help' for a command's arguments. Exit codes: 0 ok, 2 bad input (one line "
               "naming the key or file), 1 the environment failed the run (e.g. a full disk), 130 interrupted.")
    p.add_argument("--version", action="version", version=f"jaxtok {version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also JAXTOK_DEBUG=1)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="level of jaxtok's log messages on stderr")
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
    text = "list registered names with a one-line description and their arguments"
    sp = sub.add_parser("list", help=text, description=text)
    sp.add_argument("kind", nargs="?", choices=list(LIST_KINDS), metavar="KIND",
                    help=f"one of {', '.join(LIST_KINDS)} (default: all)")
    return p


def run_dir_for(cfg: Config, config_path: str | Path) -> Path:
    """``<run.out_dir>/<run.name or the config file's stem>``."""
    return Path(cfg.run.out_dir) / (cfg.run.name or Path(config_path).stem)


def _not_a_recipe(config_path: str | Path, command: str) -> None:
    from jaxtok.recipe import is_recipe_file

    if is_recipe_file(config_path):
        raise ConfigError(f"{str(config_path)!r} is a recipe (it has 'stages'), not a config: run it with "
                          f"'jaxtok run {config_path}'" + (" or check it with 'jaxtok validate'" if command else ""))


def prepare(command: str, config_path: str | Path, overrides: Sequence[str]) -> tuple[RunPlan, Path, Callable]:
    """Load and fully check the config into its run plan (:func:`jaxtok.config.validate_names`), resolve the
    handler, check the run directory (``train``: lock, changed config, ``run.resume=false``, finished run;
    :mod:`jaxtok.rundir`), then write the resolved config.
    Raises ConfigError or HandlerUnavailable before anything is written.

    ``train`` (single-process runs) leaves the run directory locked: the caller releases it with
    ``jaxtok.rundir.release(run_dir)`` (``main`` does)."""
    _not_a_recipe(config_path, command)
    cfg = load_config(config_path, overrides)
    plan = validate_names(cfg)
    check_paths(cfg)
    check_model_paths(cfg)  # each model directory: a jaxtok run or a supported HF checkpoint
    handler = get_handler(command)
    run_dir = run_dir_for(cfg, config_path)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} (run.out_dir/run.name) is a file, not a directory")
    name = "config.yaml"
    if command == "train":
        locked = not cfg.mesh.distributed  # multi-host: process 0 locks inside train()
        if locked:
            rundir.acquire(run_dir)
        try:
            rundir.check_resume(cfg, run_dir)  # a different run in this directory is refused, naming the keys
            rundir.check_fresh_start(cfg, run_dir)  # resume=false: refused, or run.overwrite=true clears it
            if rundir.finished(run_dir, cfg.train.steps) and cfg.run.resume:
                name = None  # nothing will run: the stored config.yaml and summary.json stay as they are
        except BaseException:
            if locked:
                rundir.release(run_dir)
            raise
    elif rundir.committed_steps(run_dir):
        name = f"config.{command}.yaml"  # a training run's directory: its config.yaml describes the training
    if name is not None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text(to_yaml(cfg))
        except OSError as e:
            if command == "train" and not cfg.mesh.distributed:
                rundir.release(run_dir)
            raise ConfigError(f"run directory {str(run_dir)!r} (run.out_dir/run.name) cannot be written: "
                              f"{e.strerror or e}") from None
    return plan, run_dir, handler


def _convert(args) -> int:
    try:
        from jaxtok.models.hf import convert_main
    except ModuleNotFoundError as e:
        raise HandlerUnavailable(f"'jaxtok convert' is not available: {e}") from None
    try:
        return convert_main(args) or EXIT_OK
    except (ValueError, FileNotFoundError) as e:  # bad direction, architecture, missing or corrupt source
        raise ConfigError(str(e)) from None


def list_entries(kind: str) -> list[tuple[str, str, list[str]]]:
    """``[(name, one-line description, ["field: type = default", ...])]`` of the registry ``kind`` names
    (:data:`LIST_KINDS`); presets describe their shape."""
    from jaxtok import registry
    from jaxtok.config import import_registering_modules

    reg_name, modules, _ = LIST_KINDS[kind]
    import_registering_modules(modules)
    if reg_name is None:  # model presets: ModelConfig instances
        from jaxtok.models import presets

        rows = []
        for name in presets.names():
            c = presets.PRESETS[name]
            rows.append((name, f"{c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, mlp "
                               f"{c.intermediate_size}, {c.num_heads} heads / {c.num_kv_heads} kv, vocab "
                               f"{c.vocab_size}", []))
        return rows
    reg = getattr(registry, reg_name)
    rows = []
    for name in reg.names():
        entry = reg.entry(name)
        made = typing.get_type_hints(entry.fn).get("return") if callable(entry.fn) else None
        text = (_first_doc_line(entry.fn) or _first_doc_line(entry.config_cls)
                or (_first_doc_line(made) if isinstance(made, type) else "")  # a factory: what it makes
                or _first_doc_line(sys.modules.get(getattr(entry.fn, "__module__", ""))))  # its module
        rows.append((name, text, _fields(entry.config_cls)))
    return rows


def _first_doc_line(obj) -> str:
    doc = getattr(obj, "__doc__", None) if obj is not None else None
    if not doc or (isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "(")):
        return ""  # no docstring (a dataclass's generated signature is not a description)
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z(`])", text)
    text = text[:end.start() + 1] if end else text  # the first sentence
    return text if len(text) <= 120 else text[:117].rstrip() + "..."


def _fields(cls) -> list[str]:
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f" = {_short_repr(f.default)}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {_short_repr(f.default_factory())}"
        else:
            default = " (required)"
        tp = hints.get(f.name, f.type)
        tp = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        out.append(f"{f.name}: {tp}{default}")
    return out


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _list(kind: Optional[str]) -> int:
    for k in ([kind] if kind else list(LIST_KINDS)):
        _, _, where = LIST_KINDS[k]
        print(f"{k} ({where}):")
        for name, text, fields in list_entries(k):
            print(f"  {name}" + (f" - {text}" if text else ""))
            if fields:
                print(textwrap.fill(", ".join(fields), width=118, initial_indent="      args: ",
                                    subsequent_indent="            ", break_on_hyphens=False))
        if not kind:
            print()
    return EXIT_OK


def _validate(config: str, overrides: Sequence[str]) -> int:
    from jaxtok.recipe import is_recipe_file, validate_recipe

    if is_recipe_file(config):
        stages = validate_recipe(config, overrides)
        for st, _ in stages:
            print(f"stage {st.name}: {st.command} {st.config} {' '.join(st.overrides)}".rstrip() + ": ok")
        print(f"recipe {config}: {len(stages)} stages valid")
        return EXIT_OK
    cfg = load_config(config, overrides)
    validate_names(cfg)
    print(to_yaml(cfg), end="")
    return EXIT_OK


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up per record, so captured/redirected stderr works)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ / setStream assign it; the live sys.stderr always wins
        del value


def configure_logging(level: str = "INFO") -> Callable[[], None]:
    """jaxtok's log messages (resume, fallback past damaged checkpoints, stale locks, finished runs) on stderr as
    ``jaxtok: message`` lines at ``level``, not passed on to the root logger (absl configures one, which would
    print each message twice). Returns the function that restores the previous set-up (``main`` calls it)."""
    logger = logging.getLogger("jaxtok")
    before = (logger.level, logger.propagate)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("jaxtok: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]

    return restore


def _quiet_closed_loop(unraisable) -> None:
    """``sys.unraisablehook`` that drops the ``RuntimeError: Event loop is closed`` orbax's reader threads leave
    behind after a damaged checkpoint was refused (the refusal itself is reported); anything else is printed."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _interrupted_message(command: str, run_dir: Optional[Path]) -> str:
    if command == "train" and run_dir is not None:
        steps = rundir.committed_steps(run_dir)
        kept = f"its last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was written yet"
        return f"jaxtok: interrupted; run directory {run_dir}: {kept}; run the same command again to resume"
    return f"jaxtok: interrupted ({command})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jaxtok`` console script; returns the exit code (0 ok, 2 bad input, 1 the environment
    failed the run or a command is unavailable, 130 interrupted)."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("JAXTOK_DEBUG", "") not in ("", "0")
    restore_logging = configure_logging(args.log_level)
    if not debug and sys.unraisablehook is sys.__unraisablehook__:  # not when a test runner installed its own
        sys.unraisablehook = _quiet_closed_loop
    run_dir: Optional[Path] = None
    locked = False

    def fail(code: int, message: str) -> int:
        if debug:
            traceback.print_exc()
        print(message, file=sys.stderr)
        return code

    try:
        if args.command == "list":
            return _list(args.kind)
        if args.command == "convert":
            return _convert(args)
        if args.command == "run":
            from jaxtok.recipe import run_recipe

            run_recipe(args.config, args.overrides)
            return EXIT_OK
        if args.command == "validate":
            return _validate(args.config, args.overrides)
        plan, run_dir, handler = prepare(args.command, args.config, args.overrides)
        locked = args.command == "train" and not plan.cfg.mesh.distributed
        handler(plan if args.command in PLAN_COMMANDS else plan.cfg, run_dir)
        print(f"run directory: {run_dir}")
        return EXIT_OK
    except BrokenPipeError:  # output piped into head & co.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, _interrupted_message(args.command, run_dir))
    except ConfigError as e:
        prefix = "jaxtok: " if isinstance(e, rundir.RunDirLocked) else "jaxtok: config error: "
        return fail(EXIT_CONFIG, f"{prefix}{_one_line(e)}")
    except HandlerUnavailable as e:
        return fail(EXIT_UNAVAILABLE, f"jaxtok: {e}")
    except Exception as e:  # noqa: BLE001 - only the kinds below are handled; anything else is a bug: re-raised
        ckpt = sys.modules.get("jaxtok.checkpoint")
        if ckpt is not None and isinstance(e, ckpt.CheckpointWriteError):
            return fail(EXIT_FAILED, f"jaxtok: error: {_one_line(e)}")
        if ckpt is not None and isinstance(e, ckpt.CheckpointError):
            return fail(EXIT_CONFIG, f"jaxtok: checkpoint error: {_one_line(e)}")
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            where = f" ({e.filename})" if e.filename else ""
            return fail(EXIT_FAILED, f"jaxtok: error: cannot write{where}: {e.strerror}; the run directory keeps "
                                     f"its last good checkpoint")
        raise
    finally:
        if locked and run_dir is not None:
            rundir.release(run_dir)
        restore_logging()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
