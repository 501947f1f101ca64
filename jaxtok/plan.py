"""The run plan: a config resolved once into what every handler needs, typed (issue 16, item 2).

:func:`jaxtok.config.validate_names` is the one place a config's registered methods are looked up and their
argument mappings parsed (``objective.name``/``objective.args`` against :data:`~jaxtok.registry.OBJECTIVES`,
``data.task``/``data.task_args`` against :data:`~jaxtok.registry.TASKS`, the decode section against its
registries), with every cross-section rule checked on the parsed values. The frozen :class:`RunPlan` it returns is
what ``jaxtok train``/``eval`` and the training loop's builders
(objective, collectors, self-teacher, evaluation, the train-step bench) receive, so they read
``plan.objective.spec.<field>`` and ``plan.objective_args`` instead of parsing ``cfg`` again (as MaxText's typed
config or Tunix's ``GRPOConfig`` handed to its learner).

This module holds the types only and imports nothing from ``models/``, ``train/`` or ``decode/`` (nor
:mod:`jaxtok.config`, which builds the plan): the registering packages are imported lazily by
:func:`jaxtok.config.import_registering_modules`, and the plan holds their registry entries.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from jaxtok.registry import Entry
from jaxtok.specs import ObjectiveSpec

if TYPE_CHECKING:
    from jaxtok.config import Config


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """``decode.*`` resolved (:func:`jaxtok.config.check_decode`).

    - ``method``: the :data:`~jaxtok.registry.DECODE_METHODS` entry of ``decode.method`` (``fn``: its step builder,
      ``spec``: a :class:`~jaxtok.specs.DecodeMethodSpec`).
    - ``policy``: the entry of the policy inside the method's loop (``decode.policy`` or the method's default, in
      the family its spec names; None: no policy); ``policy_args``: ``decode.policy_args`` parsed into the policy's
      argument dataclass — for a method without policies (ead, lave), into the method's own.
    - ``drafter``: the :data:`~jaxtok.registry.DRAFTERS` entry of ``decode.drafter`` when the method takes a
      drafter; ``drafter_args``: ``decode.drafter_args`` parsed.
    """

    method: Entry
    policy: Optional[Entry]
    policy_args: Any
    drafter: Optional[Entry] = None
    drafter_args: Any = None


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A validated config and its resolved methods.

    - ``cfg``: the validated :class:`~jaxtok.config.Config` (its raw mappings unchanged: ``config.yaml`` is written
      from it).
    - ``objective``: the :data:`~jaxtok.registry.OBJECTIVES` entry of ``objective.name`` (``fn``; ``spec``: the
      :class:`~jaxtok.specs.ObjectiveSpec` the loop reads); ``objective_args``: ``objective.args`` parsed into the
      entry's argument dataclass (None: it takes none).
    - ``task``: the :data:`~jaxtok.registry.TASKS` entry of ``data.task`` (None for the file datasets ``files`` /
      ``jsonl`` / ``parquet``); ``task_args``: ``data.task_args`` parsed.
    - ``rewards``: the checked ``rollout.rewards`` names (scored with their weights from ``cfg``).
    - ``draft_policy``: with ``rollout.sampler=speculative``, the :data:`~jaxtok.registry.DRAFT_POLICIES` entry of
      ``rollout.draft_policy``; ``draft_policy_args``: ``rollout.draft_policy_args`` parsed (else both None).

    - ``decode``: the :class:`DecodePlan` (decode method, its policy and drafter with their parsed arguments).
    """

    cfg: "Config"
    objective: Entry
    objective_args: Any
    task: Optional[Entry]
    task_args: Any
    rewards: tuple[str, ...]
    draft_policy: Optional[Entry] = None
    draft_policy_args: Any = None
    decode: Optional[DecodePlan] = None

    @property
    def spec(self) -> ObjectiveSpec:
        """The objective's :class:`~jaxtok.specs.ObjectiveSpec`."""
        return self.objective.spec

    def make_task(self):
        """The task instance of ``data.task`` with the parsed ``task_args`` and ``data.seed`` (file datasets:
        :func:`jaxtok.data.file_task_from_config`)."""
        from jaxtok.data import make_task_from_config

        if self.task is None:
            return make_task_from_config(self.cfg.data)
        return self.task.fn(self.task_args, self.cfg.data.seed)
