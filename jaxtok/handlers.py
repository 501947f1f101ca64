"""The command handlers: ``jaxtok {train,eval,decode,bench}`` each run one ``(cfg, run_dir) -> dict`` function,
looked up by name and imported only when the command runs. Shared by the command line (:mod:`jaxtok.cli`) and
recipes (:mod:`jaxtok.recipe`), which run the same handlers stage by stage."""

from __future__ import annotations

import importlib
from typing import Callable

# command -> (module, function) of its handler, imported only when the command runs.
HANDLER_PATHS = {
    "train": ("jaxtok.train.loop", "train"),
    "eval": ("jaxtok.train.loop", "evaluate"),
    "decode": ("jaxtok.decode", "run_decode"),
    "bench": ("jaxtok.bench", "run_bench"),
}
# Handlers set here (tests, plug-ins) take precedence over HANDLER_PATHS.
HANDLERS: dict[str, Callable] = {}
# Commands whose handler receives the run plan validation built (jaxtok.plan.RunPlan); the others get plan.cfg
# until they take the plan too.
PLAN_COMMANDS = ("train", "eval")


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
