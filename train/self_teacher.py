"""A self-teacher: a copy of the student's own parameters that the train step receives as a frozen model, refreshed
from the student every ``N`` steps while it is needed (TRACE, train_methods.md §3: "parameters synced from the
student every 10 steps while KL is active"; ``ObjectiveSpec.self_teacher=fn(args) -> (N, end) | None``).

Where it lives: in the training loop, as the ``teacher`` entry of the step's third argument (the frozen states,
sharded like parameters, *not* donated) — the same slot an external frozen teacher uses, so the objective and the
jitted step do not know which kind they get. Optimizer step ``k`` (``state.step`` before the update, 0-based) sees
the teacher ``θ_{N·⌊k/N⌋}``: the student's parameters at the last multiple of ``N`` at or before ``k``.

Sync on the host, not inside the step: at every step with ``k % N == 0`` (and ``k < end``) the loop replaces the
teacher by :func:`copy_state` of the train state's parameters before running the step. Why not a
``jnp.where(step % N == 0, params, teacher)`` inside the step: the teacher would have to be carried (and donated)
in the train state, a new pytree in every checkpoint and sharding declaration, and the select would read and write
both full parameter copies on every step instead of one copy every ``N`` steps. The copy is an explicit
``jnp.copy`` (new buffers, the parameters' own shardings, so the step's frozen in-shardings match without a
reshard): the train state is donated to the step, so a teacher aliasing its buffers would be deleted by the first
update.

Skip: from step ``end`` on (TRACE: the first step with ``λ_k = 0`` for good) the teacher is neither synced nor
passed: the loop runs a second step function built without it (no teacher argument, no teacher forward, its
memory freed; the objective sees ``teacher=None``).

Resume: the teacher of step ``k`` is re-derivable from the student only at sync steps, so it is checkpointed: the
``train`` item of a checkpoint after ``k`` updates holds ``teacher`` = the teacher step ``k`` uses — the synced
copy between syncs, the student's own state at sync steps (what step ``k`` copies) and after ``end`` (unused). The
item has one structure in every checkpoint of the run, so the loop's fallback to an older good checkpoint restores
with the same template. A resume at ``k`` keeps the restored teacher between syncs and re-copies the restored
student at sync steps: bitwise the teacher of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

TEACHER = "teacher"  # the frozen-model name the objective receives it under (``ObjectiveSpec.models``)


def copy_state(graphdef, params, rest) -> nnx.State:
    """``nnx.State`` of the model ``graphdef`` with fresh copies of ``params`` and ``rest`` (``jnp.copy``: new
    buffers, same shardings), the full-model state a step built with ``frozen={"teacher": ...}`` merges."""
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    return nnx.state(nnx.merge(graphdef, params, rest))


@dataclasses.dataclass
class SelfTeacher:
    """Host-side schedule and owner of the self-teacher copy (module docstring). ``every`` = ``N``, ``end`` = the
    first step without a teacher; ``state``: the teacher's current ``nnx.State`` (None once dropped);
    ``graphdef``: the student's (``params``/``rest`` split); ``bare_step``: the train step built without the
    teacher (used from ``end`` on); ``syncs``: copies made so far (a counter for tests and logs)."""

    every: int
    end: int
    state: Optional[nnx.State] = None
    graphdef: Any = None
    bare_step: Optional[Callable] = None
    syncs: int = 0

    @classmethod
    def of(cls, plan) -> Optional["SelfTeacher"]:
        """The self-teacher of the run plan's objective (``spec.self_teacher(args)``,
        :func:`jaxtok.config.self_teacher_sync`), or None (no self-teacher: an external frozen teacher, or none)."""
        from jaxtok.config import self_teacher_sync

        sync = self_teacher_sync(plan.spec, plan.objective_args)
        return None if sync is None else cls(every=int(sync[0]), end=int(sync[1]))

    # -- schedule (k: the 0-based optimizer step about to be taken = updates done so far) -----------------------
    def needed(self, k: int) -> bool:
        """Whether step ``k`` gets the teacher (``k < end``)."""
        return k < self.end

    def sync_due(self, k: int) -> bool:
        """Whether the teacher is re-copied from the student before step ``k`` (``k % N == 0`` while needed)."""
        return self.needed(k) and k % self.every == 0

    def stored(self, k: int) -> bool:
        """Whether the teacher of step ``k`` is not re-derivable from the student at ``k``: needed and ``k`` is not
        a sync step (a checkpoint after ``k`` updates then holds the synced copy itself)."""
        return self.needed(k) and k % self.every != 0

    def synced_at(self, k: int) -> int:
        """The step whose student parameters the teacher of step ``k`` holds: ``N·⌊k/N⌋``."""
        return self.every * (k // self.every)

    # -- the loop's hooks -------------------------------------------------------------------------------------
    def build_steps(self, make_step: Callable[..., Callable], frozen: dict, graphdef, state) -> Callable:
        """The train step with the teacher (``make_step(frozen=...)``, graphdef and shardings read from a copy of
        ``state``'s model, which becomes the initial :attr:`state`) and, as :attr:`bare_step`, the step without it
        (the other ``frozen`` models only)."""
        self.graphdef = graphdef
        module = nnx.merge(graphdef, *jax.tree.map(jnp.copy, (state.params, state.rest)))
        step_fn = make_step(frozen={**frozen, TEACHER: module})
        self.bare_step = make_step(frozen=frozen or None)
        self.state = nnx.state(module)
        return step_fn

    def step(self, k: int, state, batch, frozen_args: tuple, step_fn: Callable):
        """Run optimizer step ``k``: re-copy the student first at sync steps (the old copy released before the new
        one is made), pass the teacher while needed, and from ``end`` on run :attr:`bare_step` without it."""
        if not self.needed(k):
            self.state = None
            return self.bare_step(state, batch, *frozen_args)
        if self.sync_due(k) or self.state is None:
            self.state = None
            self.state = copy_state(self.graphdef, state.params, state.rest)
            self.syncs += 1
        others = frozen_args[0] if frozen_args else {}
        return step_fn(state, batch, {**others, TEACHER: self.state})

    def checkpoint_item(self, k: int, state) -> dict:
        """``{"teacher": the teacher of step k}`` for the ``train`` item of a checkpoint after ``k`` updates: the
        synced copy when :meth:`stored`, else the student's own state (at a sync step exactly what step ``k`` will
        copy; from ``end`` on unused). Every checkpoint of the run has the same structure, so falling back to an
        older checkpoint (a damaged newer one) restores with the same template."""
        if self.stored(k) and self.state is not None:
            return {TEACHER: self.state}
        return {TEACHER: nnx.state(nnx.merge(self.graphdef, state.params, state.rest))}

    def restored(self, train: dict, k: int) -> dict:
        """The restored ``train`` item (resumed after ``k`` updates) without the teacher, which becomes
        :attr:`state` when :meth:`stored` (else step ``k`` re-copies the student, or runs without a teacher)."""
        train = dict(train)
        teacher = train.pop(TEACHER)
        self.state = teacher if self.stored(k) else None
        return train
