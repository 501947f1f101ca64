"""Typed plug-in specs: what a loop needs to know about a registered method beyond its function.

Each registry family has one frozen dataclass here whose fields the loops read by attribute (an explicit hook
interface, as Tunix's distillation strategies or gemma's per-method sampler dataclasses). A method declares its
spec at registration — ``@OBJECTIVES.register("opd", OPDArgs, data="rollout", models=("teacher",))`` builds
``ObjectiveSpec(data="rollout", models=("teacher",))`` — and a keyword that is not a field is a ``TypeError`` at
import time, never a silently ignored flag. Adding a method is one registered function and its spec; no loop edit.

The specs live in ``jaxtok/`` (beside :mod:`jaxtok.registry`) because the registries do; hooks are typed as plain
callables so this module imports nothing from ``models/``, ``train/`` or ``decode/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional, Union


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """How the train loop runs an objective (``jaxtok.train.objectives``).

    - ``data``: the batches the loss reads — ``sft`` (tokenized examples), ``rollout`` (sampled completions with
      rewards, :mod:`jaxtok.train.rollout`), ``trajectory`` (recorded diffusion trajectories, TAD) or
      ``documents`` (REFINE's own collector).
    - ``models``: the frozen models it needs by name (``teacher``, ``reference``), passed to the loss as keywords.
    - ``collect(…, args=)``: the objective's own batch collector instead of the default one for ``data``.
    - ``prepare(batch, …[, args=])``: a host hook run on each collected batch before the step (TRACE's annotation);
      ``prepare_args``: it takes the parsed objective arguments.
    - ``group_advantages``: ``True`` when the loss normalises over whole prompt groups itself (then micro-batches
      that split groups are refused), or ``fn(batch, args)`` computing them on the host over the whole rollout
      batch before any split (``policy_gradient``), or ``False``.
    - ``rollout_topk(args) -> bool``: whether the rollout must store top-K behaviour statistics (CPPO/DPPO).
    - ``self_teacher(args) -> sync``: the teacher is the student's own synced copy when it returns a sync rule.
    - ``wrap_model(model, args) -> model``: the trained module wraps the decoder (LenVM's value head).
    - ``batch_step``: the step needs the whole batch at once (no micro-batch loop).
    - ``eval``: held-out evaluation by ``generate`` (AR decoding) or by the ``diffusion`` sampler.
    - ``head(cfg, args, *, tokenizer, task) -> HeadRun``: the trained module is a small head beside frozen
      decoders (SpecDec++, SpecKV, Learn2PD, TraceLock): the hook loads them, records the head's examples and
      builds the head; the loop then trains only the head with the one train step (``jaxtok.train.heads``) and
      writes the head files ``decode.policy_args.head_path=<run dir>`` loads.
    """

    data: Literal["sft", "rollout", "trajectory", "documents"] = "sft"
    models: tuple[str, ...] = ()
    collect: Optional[Callable[..., Any]] = None
    prepare: Optional[Callable[..., Any]] = None
    prepare_args: bool = False
    group_advantages: Union[bool, Callable[..., Any]] = False
    rollout_topk: Optional[Callable[[Any], bool]] = None
    self_teacher: Optional[Callable[[Any], Any]] = None
    wrap_model: Optional[Callable[..., Any]] = None
    batch_step: bool = False
    eval: Literal["generate", "diffusion"] = "generate"
    head: Optional[Callable[..., Any]] = None

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))


@dataclasses.dataclass(frozen=True)
class CommitPolicySpec:
    """How the diffusion loop runs a commit policy (``jaxtok.decode.commit_policies``, decode_methods.md Part B).

    - ``init_state(B, N, args) -> pytree``: the policy's per-row carry (BACD's confidence history); None: ``{}``.
    - ``block_rule``: adaptive block end ``(…) -> end [B]`` (AdaBlock, Dystruct); None: fixed ``block_len``.
    - ``heads``: names of learned modules the policy needs (Learn2PD's ``filter``, TraceLock's ``controller``).
    - ``lookahead``: the loop passes ``heads["lookahead"]`` (Info-Gain's batched one-more-token forwards).
    - ``needs_hidden``: ``StepInfo.hidden`` is filled (final-normed hidden states).
    - ``verifier``: the loop passes ``heads["verify"]``, the same model in AR mode (S2D2).
    - ``window``: the model sees only generated positions ``< state["window"]`` (Dystruct).
    - ``block_local``: the rule reads logits only inside the active block ``[lo, hi)`` (its block rule, if any,
      only on steps that start a block), so the ``dual`` window cache may serve it, and with fixed blocks the exact
      ``block`` cache; False (the safe default): it may read beyond, and only ``none``/``prefix`` serve it.
    """

    init_state: Optional[Callable[..., Any]] = None
    block_rule: Optional[Callable[..., Any]] = None
    heads: tuple[str, ...] = ()
    lookahead: bool = False
    needs_hidden: bool = False
    verifier: bool = False
    window: bool = False
    block_local: bool = False

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))

    @property
    def full_forward_only(self) -> bool:
        """True when the policy needs every position recomputed each step (no approximate KV cache)."""
        return self.lookahead or self.needs_hidden or self.verifier or self.window


@dataclasses.dataclass(frozen=True)
class DraftPolicySpec:
    """How the speculative loop uses a draft-length policy (``jaxtok.decode.draft_policies``, Part A). No fields
    yet: every draft-length policy runs in the one speculative loop with any drafter (``decode.drafter`` picks the
    drafter, ``decode.method`` the loop)."""


@dataclasses.dataclass(frozen=True)
class DecodeMethodSpec:
    """How a decoding method (``decode.method``, ``jaxtok.decode.run``) is configured.

    - ``policy``: the family ``decode.policy`` names inside the method's loop — ``guide`` (a logit guide of
      AR decoding), ``draft`` (a draft-length policy), ``commit`` (a commit policy) — or None: the method takes
      no policy and ``decode.policy_args`` are its own arguments (the entry's args class: EAD, LAVE).
    - ``default_policy``: the policy when ``decode.policy`` is unset (None: no policy).
    - ``diffusion``: the method decodes a masked-diffusion LM (its weights load as one).
    - ``drafter``: the method takes a drafter (``decode.drafter``, ``decode.draft_init_from``).
    """

    policy: Optional[Literal["guide", "draft", "commit"]] = None
    default_policy: Optional[str] = None
    diffusion: bool = False
    drafter: bool = False
