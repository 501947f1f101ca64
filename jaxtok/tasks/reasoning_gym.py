"""reasoning-gym generators as a task: ``data.task: reasoning_gym`` with ``data.task_args: {name: ..., size, ...}``.

Needs the optional extra ``reasoning`` (``pip install 'jaxtok[reasoning]'``, the ``reasoning-gym`` package); it is
imported only when such a task is configured.

Splits. One generator instance (``name``, ``config``, ``seed``) is a deterministic sequence of items. Eval example
``i`` is item ``size + i`` (``i < eval_size``); train example ``i`` is item ``i`` (``i < size``), unless its question
also occurs among the eval questions, in which case it is replaced by item ``size + eval_size + i`` (a problem space
so small that this one collides too is an error). So the splits are disjoint by question text, deterministic in the
seed, and computed lazily (only the eval questions are generated up front, on first use).

Prompts follow reasoning-gym's convention: a system prompt (``system_prompt``: a key of
``reasoning_gym.utils.SYSTEM_PROMPTS`` such as ``default``, literal text, or ``""`` for none) asks for the answer in
``<answer>…</answer>``; the prompt is a list of chat messages (``chat: true``, rendered by the tokenizer's chat
template) or plain text. The SFT target is ``<answer>{answer}</answer>``. The answer is the last ``<answer>`` tag's
content (``reasoning_gym.utils.extract_answer``), ``format_ok`` says the tag is there, and :meth:`reward` is the
generator's own ``score_answer`` (in [0, 1]; the ``exact_match`` reward counts a score of 1).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Optional

from jaxtok.registry import TASKS
from jaxtok.tasks.base import Example

INSTALL = "pip install 'jaxtok[reasoning]' (the reasoning-gym package)"


def _rg():
    """The ``reasoning_gym`` package (ImportError naming the extra when it is missing)."""
    try:
        import reasoning_gym
        import reasoning_gym.utils  # noqa: F401
    except ImportError:
        raise ImportError(f"data.task=reasoning_gym needs {INSTALL}") from None
    return reasoning_gym


def generator_names() -> list[str]:
    """The names of the installed reasoning-gym generators."""
    from reasoning_gym.factory import DATASETS

    _rg()
    return sorted(DATASETS)


@dataclasses.dataclass(frozen=True)
class ReasoningGymArgs:
    name: str = ""  # generator name (reasoning_gym.factory.DATASETS): gsm_symbolic, basic_arithmetic, countdown, ...
    size: int = 1000  # train examples
    eval_size: int = 256  # held-out examples (disjoint from train by question text)
    seed: Optional[int] = None  # generator seed (default: data.seed)
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the generator's own options
    system_prompt: str = "default"  # a key of reasoning_gym.utils.SYSTEM_PROMPTS, literal text, or "" for none
    chat: bool = True  # prompt as chat messages (system + user); false: plain text

    def __post_init__(self):
        if self.size < 1 or self.eval_size < 1:
            raise ValueError(f"size={self.size}, eval_size={self.eval_size}: both must be >= 1")
        try:
            _rg()
        except ImportError as e:
            raise ValueError(str(e)) from None
        from reasoning_gym.factory import DATASETS

        if self.name not in DATASETS:
            close = difflib.get_close_matches(self.name, DATASETS, n=5)
            raise ValueError(f"name={self.name!r}: not a reasoning-gym generator"
                             + (f" (did you mean {close}?)" if close else "")
                             + f"; {len(DATASETS)} are installed, e.g. gsm_symbolic, basic_arithmetic, countdown "
                               f"(reasoning_gym.factory.DATASETS)")
        allowed = {f.name for f in dataclasses.fields(DATASETS[self.name][1])} - {"seed", "size"}
        unknown = sorted(set(self.config) - allowed)
        if unknown:
            raise ValueError(f"config.{unknown[0]}: not an option of generator {self.name!r}; allowed: "
                             f"{sorted(allowed)} (seed and size are task_args.seed / size)")


class ReasoningGymTask:
    """A reasoning-gym generator with deterministic disjoint train/eval splits and its own scorer as reward."""

    name = "reasoning_gym"
    has_format = True

    def __init__(self, args: ReasoningGymArgs, seed: int = 0):
        rg = _rg()
        self.args = args
        self.seed = args.seed if args.seed is not None else seed
        total = 2 * args.size + args.eval_size  # train, eval, then one replacement slot per train index
        try:
            self.dataset = rg.create_dataset(args.name, **dict(args.config), seed=self.seed, size=total)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"data.task_args: generator {args.name!r} refused config {dict(args.config)} "
                             f"({type(e).__name__}: {e})") from None
        prompts = rg.utils.SYSTEM_PROMPTS
        self.system = prompts.get(args.system_prompt, args.system_prompt)
        self._items: dict[int, dict] = {}
        self._eval_questions: Optional[frozenset] = None

    def __getstate__(self):  # grain workers get the task without the item cache
        return {**self.__dict__, "_items": {}}

    # ------------------------------------------------------------------------------------------------ splits

    def _item(self, index: int) -> dict:
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]

    def eval_questions(self) -> frozenset:
        """The questions of the eval split (generated once)."""
        if self._eval_questions is None:
            base = self.args.size
            self._eval_questions = frozenset(self._item(base + i)["question"] for i in range(self.args.eval_size))
        return self._eval_questions

    def item_index(self, split: str, index: int) -> int:
        """The generator index of ``split`` example ``index`` (see the module docstring)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: allowed ('train', 'eval')")
        n = self.split_size(split)
        if not 0 <= index < n:
            raise IndexError(f"{split} example {index}: the {split} split has {n} examples "
                             f"(data.task_args.{'size' if split == 'train' else 'eval_size'})")
        if split == "eval":
            return self.args.size + index
        held = self.eval_questions()
        for j in (index, self.args.size + self.args.eval_size + index):
            if self._item(j)["question"] not in held:
                return j
        raise ValueError(f"reasoning-gym {self.args.name!r}: train example {index} repeats an eval question twice; "
                         f"the problem space is too small for disjoint splits of size {self.args.size} and "
                         f"eval_size {self.args.eval_size} (widen data.task_args.config or shrink the splits)")

    def split_size(self, split: str) -> int:
        """Examples in ``split``: ``size`` (train) or ``eval_size`` (eval)."""
        return self.args.size if split == "train" else self.args.eval_size

    def has_split(self, split: str) -> bool:
        return split in ("train", "eval")

    # ------------------------------------------------------------------------------------------------ examples

    def prompt_of(self, question: str):
        """The prompt of a question: chat messages (system, user) or plain text."""
        if self.args.chat:
            return ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": question}]
        return f"{self.system}\n\n{question}" if self.system else question

    def example(self, split: str, index: int) -> Example:
        entry = self._item(self.item_index(split, index))
        answer = str(entry["answer"])
        return Example(prompt=self.prompt_of(entry["question"]), target=f"<answer>{answer}</answer>", answer=answer,
                       meta=entry)

    def extract_answer(self, completion: str) -> Optional[str]:
        """The content of the last ``<answer>…</answer>`` (reasoning-gym's own extractor)."""
        return _rg().utils.extract_answer(completion)

    def reward(self, completion: str, example: Example) -> float:
        """The generator's ``score_answer`` of the extracted answer (0 when there is none)."""
        return float(self.dataset.score_answer(self.extract_answer(completion), example.meta))

    def format_ok(self, completion: str) -> bool:
        """Whether the completion holds an ``<answer>…</answer>`` pair."""
        return self.extract_answer(completion) is not None


@TASKS.register("reasoning_gym", ReasoningGymArgs)
def make_reasoning_gym(args: ReasoningGymArgs, seed: int = 0) -> ReasoningGymTask:
    return ReasoningGymTask(args, seed)
