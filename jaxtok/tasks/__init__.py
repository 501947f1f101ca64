"""Synthetic verifiable tasks (registered in ``jaxtok.registry.TASKS``) and the tokenizer they share."""

from jaxtok.registry import TASKS
from jaxtok.tasks import arith, countdown, sampled, sorting  # noqa: F401  (registration)
from jaxtok.tasks import reasoning_gym  # noqa: F401  (registration; the package is imported lazily)
from jaxtok.tasks.base import Example, Task, scratchpad_steps, split_of
from jaxtok.tasks.tokenizer import SpecialTokens, build_tokenizer, load_tokenizer, save_tokenizer


def make_task(name: str, args: dict | None = None, seed: int = 0):
    """Instantiate a registered task from its name and argument mapping (validated)."""
    return TASKS.get(name, "data.task")(TASKS.parse_args(name, args or {}, "data.task_args"), seed)


__all__ = ["Example", "SpecialTokens", "TASKS", "Task", "build_tokenizer", "load_tokenizer", "make_task", "save_tokenizer",
           "scratchpad_steps", "split_of"]
