"""Config schema and loading (DESIGN.md, principle 5: config is the interface).

Frozen dataclasses are the schema; OmegaConf structured configs merge YAML files and dotted command-line overrides
onto it and reject unknown keys and wrong types. Field metadata declares allowed values (``choices``) and ranges
(``min``/``max``/``gt``), checked by each section's ``__post_init__`` (so no out-of-range section can exist), plus
cross-field rules. :func:`validate_names` checks method names (objective, task, decode policy) and their arguments
against the registries and resolves the config into a typed run plan (:mod:`jaxtok.plan`). Every error is a
:class:`ConfigError` naming the dotted key, the bad value and what is allowed; all of this runs before any compute.

YAML files may include others with ``base: other.yaml`` (or a list), resolved relative to the including file and
merged first, so an experiment file states only what it changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxtok.registry import (
    COMMIT_POLICIES, DRAFT_POLICIES, LOGIT_GUIDES, REWARDS, ConfigError, Entry, Registry, peer_hint,
)
from jaxtok.plan import DecodePlan, RunPlan
from jaxtok.specs import ObjectiveSpec

__all__ = [
    "Config", "ConfigError", "ModelSection", "MeshSection", "DataSection", "TokenizerSection", "OptimizerSection",
    "ObjectiveSection", "LoraSection", "LORA_TARGETS",
    "TrainSection", "RolloutSection", "DecodeSection", "RunSection", "BenchSection", "load_config", "from_dict", "to_yaml", "to_dict",
    "validate_names", "check_paths", "build_optimizer", "build_schedule", "learning_rate", "describe",
    "reference_yaml",
]


def _f(default, *, choices: Optional[Sequence] = None, min=None, max=None, gt=None, doc: str = ""):
    """A dataclass field with validation metadata (``choices``, ``min``, ``max``, ``gt``) and a doc string."""
    meta = {"choices": choices, "min": min, "max": max, "gt": gt, "doc": doc}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Section:
    """Base of the config sections: ``__post_init__`` checks every field's metadata and the section's own rules
    (:meth:`check`), so an out-of-range section cannot be built, whether from YAML or in Python."""

    _key: ClassVar[str] = ""  # the section's key in Config, used in messages

    def __post_init__(self):
        _check_fields(self, f"{self._key}." if self._key else "")
        self.check()

    def check(self) -> None:
        """Cross-field rules of the section (raise ConfigError)."""


@dataclasses.dataclass(frozen=True)
class ModelSection(_Section):
    """Which model to build or load."""

    _key: ClassVar[str] = "model"
    preset: str = _f("tiny_student", doc="a name from jaxtok.models.presets (ignored with hf_path)")
    hf_path: Optional[str] = _f(None, doc="local Hugging Face checkpoint directory to load instead of a preset")
    init_from: Optional[str] = _f(None, doc="run directory (or checkpoint dir) of an earlier stage to start from")
    dtype: str = _f("float32", choices=("float32", "bfloat16"),
                    doc="compute dtype of matmuls; bfloat16 with param_dtype float32 is mixed precision (float32 master "
                        "weights and optimizer state, bfloat16 matmuls, float32 norms, softmax and loss); float16 "
                        "is refused: it needs loss scaling, which jaxtok does not implement")
    param_dtype: str = _f("float32", choices=("float32", "bfloat16"),
                          doc="storage dtype of parameters, gradients and the optimizer state")

    def __post_init__(self):
        for key in ("dtype", "param_dtype"):  # before the generic choices check, to say why
            if getattr(self, key) == "float16":
                raise ConfigError(f"model.{key}='float16': float16 training needs loss scaling, which jaxtok does "
                                  f"not implement; use bfloat16 (float32's exponent range, no scaling needed): "
                                  f"model.dtype=bfloat16 model.param_dtype=float32 is the mixed-precision setting")
        super().__post_init__()
    vocab_size: Optional[int] = _f(None, min=1, doc="default: the tokenizer's vocabulary size")
    attention: str = _f("causal", choices=("causal", "bidirectional", "block_causal"),
                        doc="attention kind (bidirectional/block_causal for diffusion LMs)")
    block_size: Optional[int] = _f(None, min=1, doc="block length for block_causal attention")
    attention_impl: str = _f("auto", choices=("auto", "xla", "dot_product_attention", "pallas"),
                             doc="attention kernel (models/attention.py): auto = pallas splash on TPU, "
                                 "jax.nn.dot_product_attention (cuDNN) on GPU, xla elsewhere; kernels that cannot "
                                 "take a call's mask (block_causal, siblings, KV cache) fall back to xla under auto")
    scan_layers: bool = _f(False, doc="stack the blocks' parameters on a leading 'layers' axis and jax.lax.scan "
                                      "over them (one compiled block; same values as unrolled)")
    remat: str = _f("none", choices=("none", "full", "minimal", "save_dot_with_context_except_mlp",
                                     "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj",
                                     "save_out_proj"),
                    doc="per-block rematerialisation policy, MaxText's names: none saves every activation, "
                        "full saves only block inputs, save_* keep the named projections")
    moe_dispatch: str = _f("auto", choices=("auto", "ragged_dot", "tiled"),
                           doc="MoE token dispatch (models/moe.py): ragged_dot = one grouped matmul (a real one on "
                               "GPU/TPU; on CPU it computes every expert for every row), tiled = one-expert row "
                               "tiles with empty tiles skipped (work follows the routed rows), auto = tiled on CPU "
                               "without an expert mesh axis, else ragged_dot; no effect on dense models")
    overrides: Dict[str, Any] = _f({}, doc="ModelConfig field overrides, e.g. {num_layers: 3}")

    def check(self) -> None:
        if self.attention == "block_causal" and self.block_size is None:
            raise ConfigError("model.block_size=None: required with model.attention='block_causal'")


@dataclasses.dataclass(frozen=True)
class MeshSection(_Section):
    """Device mesh: degrees of the ``data``, ``fsdp`` and ``tensor`` axes (-1 = fill with the remaining devices).

    ``expert`` > 1 adds the ``expert`` axis of mixture-of-experts models (batch and experts split over it)."""

    _key: ClassVar[str] = "mesh"
    data: int = _f(-1, min=-1, doc="data-parallel degree (-1 = fill)")
    fsdp: int = _f(1, min=-1, doc="parameter-sharding (FSDP) degree (-1 = fill)")
    tensor: int = _f(1, min=-1, doc="tensor-parallel degree (-1 = fill)")
    expert: int = _f(1, min=1, doc="expert-parallel degree of MoE models (> 1 adds the mesh axis 'expert')")
    distributed: bool = _f(False, doc="call jax.distributed.initialize (multi-host)")
    coordinator_address: Optional[str] = _f(None, doc="host:port of process 0; default from the environment")
    num_processes: Optional[int] = _f(None, min=1, doc="number of processes; default from the environment")
    process_id: Optional[int] = _f(None, min=0, doc="this process's index; default from the environment")

    def check(self) -> None:
        degrees = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, d in degrees.items():
            if d == 0:
                raise ConfigError(f"mesh.{name}=0: a degree is >= 1, or -1 to fill with the remaining devices")
        fill = [n for n, d in degrees.items() if d == -1]
        if len(fill) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (fill), got {fill}")
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes):
            raise ConfigError(f"mesh.process_id={self.process_id}: must be < mesh.num_processes={self.num_processes}")


@dataclasses.dataclass(frozen=True)
class DataSection(_Section):
    """Training/eval data: a registered task from jaxtok.tasks (synthetic, reasoning_gym), or local data files."""

    _key: ClassVar[str] = "data"
    task: str = _f("arith", doc="a registered task name (TASKS: arith, countdown, sort, reasoning_gym, ...), or "
                                "'files' with data.train_files / data.eval_files ('jsonl' / 'parquet' also take "
                                "the older single-file data.path)")
    task_args: Dict[str, Any] = _f({}, doc="arguments of the task (its dataclass), e.g. {digits: 2, steps: 1}")
    path: Optional[str] = _f(None, doc="task=jsonl|parquet: one file, read as data.train_files=[path]")
    train_files: List[str] = _f([], doc="task=files: training data, .jsonl / .parquet files or directories saved "
                                        "by datasets' save_to_disk (glob patterns allowed)")
    eval_files: List[str] = _f([], doc="file tasks: held-out eval data (each example evaluated once, at most "
                                       "data.num_eval); none and eval_fraction=0: no held-out eval (training "
                                       "skips it with a warning, `jaxtok eval` refuses)")
    eval_fraction: float = _f(0.0, min=0.0, max=0.5, doc="file tasks without eval_files: hold out this share of "
                                                         "the train examples, by a hash of the prompt")
    prompt_field: str = _f("prompt", doc="file tasks: the prompt field (text, or a list of {role, content} "
                                         "messages rendered by the chat template)")
    messages_field: Optional[str] = _f(None, doc="file tasks: a field of {role, content} chat messages to use as "
                                                 "the prompt instead of prompt_field (a trailing assistant "
                                                 "message is the SFT target when target_field is unset)")
    answer_field: str = _f("answer", doc="file tasks: the reference answer field (rewards, eval)")
    target_field: Optional[str] = _f(None, doc="file tasks: the full response for SFT (default: the trailing "
                                               "assistant message, else the answer, as written)")
    answer_regex: Optional[str] = _f(None, doc="file tasks: the answer is the last match of this regex (group 1 "
                                               "if it has groups), which is also the format format_ok checks; "
                                               "default: the whole stripped completion, no format")
    seq_len: int = _f(128, min=2, doc="SFT sequence length (prompt + response), tokens")
    prompt_len: int = _f(64, min=1, doc="left-padded prompt length for rollouts and eval, tokens")
    batch_size: int = _f(32, min=1, doc="global batch size (rows)")
    num_train: int = _f(200_000, min=1, doc="training examples drawn from the task")
    num_eval: int = _f(256, min=1, doc="held-out examples for eval (disjoint from train)")
    seed: int = _f(0, doc="seed of the synthetic task generator and the shuffle")
    worker_count: int = _f(0, min=0, doc="grain worker processes (0 = in-process)")
    overlong: str = _f("drop", choices=("drop", "error"),
                       doc="over-long examples: dropped with a counted warning, or an error (never truncated); "
                           "held-out generation eval scores a dropped prompt 0 and counts it (eval/overlong_prompts)")

    def check(self) -> None:
        import re

        files = self.task in ("files", "jsonl", "parquet")
        given = [k for k in ("path", "train_files", "eval_files", "eval_fraction") if getattr(self, k)]
        if not files and given:
            raise ConfigError(f"data.{given[0]}: file data needs data.task='files' (data.task={self.task!r} is a "
                              f"registered task with its own data)")
        if self.path and (self.train_files or self.eval_files):
            raise ConfigError(f"data.path={self.path!r}: the older single-file form; with data.train_files / "
                              f"data.eval_files leave data.path unset")
        if self.path and self.task == "files":
            raise ConfigError(f"data.path={self.path!r}: with data.task='files' use data.train_files=[...]")
        if self.eval_files and self.eval_fraction:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction}: hold-out is for runs without "
                              f"data.eval_files; set one of them")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ConfigError(f"data.answer_regex={self.answer_regex!r}: not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True)
class TokenizerSection(_Section):
    """Where the tokenizer comes from and explicit overrides of what its files say (special tokens are read from
    ``tokenizer_config.json`` / ``generation_config.json``, never guessed from token names)."""

    _key: ClassVar[str] = "tokenizer"
    path: Optional[str] = _f(None, doc="directory with tokenizer.json (default: model.init_from's, else "
                                       "model.hf_path's, else the synthetic character tokenizer)")
    bos: Optional[Any] = _f(None, doc="override the begin-of-sequence token (a token string or an id)")
    eos: Optional[Any] = _f(None, doc="override the end-of-sequence tokens: a token string, an id or a list "
                                      "(every one ends generation; the first ends SFT targets)")
    pad: Optional[Any] = _f(None, doc="override the padding token (a token string or an id)")
    chat_template: Optional[str] = _f(None, doc="override the chat template: a .jinja file or the template text")
    chat_template_kwargs: Dict[str, Any] = _f({}, doc="extra variables for the chat template, e.g. "
                                                      "{enable_thinking: false} for Qwen3")
    use_chat_template: bool = _f(False, doc="render text prompts with the chat template as one user turn (after "
                                            "system_prompt) plus the generation prompt; message-list prompts "
                                            "always use it")
    system_prompt: Optional[str] = _f(None, doc="with use_chat_template: a system turn before each text prompt")

    def check(self) -> None:
        for key in ("bos", "pad"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
                raise ConfigError(f"tokenizer.{key}={value!r}: a token string or an id")
        eos = self.eos
        items = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if eos is not None and (not items or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in items)):
            raise ConfigError(f"tokenizer.eos={eos!r}: a token string, an id, or a non-empty list of them")


@dataclasses.dataclass(frozen=True)
class OptimizerSection(_Section):
    """optax optimizer and learning-rate schedule (built by :func:`build_optimizer`)."""

    _key: ClassVar[str] = "optimizer"
    name: str = _f("adamw", choices=("adamw", "adam", "sgd", "lion", "adafactor"), doc="optax update rule")
    lr: float = _f(1e-3, gt=0.0, doc="peak learning rate")
    schedule: str = _f("warmup_cosine", choices=("constant", "linear", "cosine", "warmup_cosine"),
                       doc="learning-rate schedule over train.steps")
    warmup_steps: int = _f(0, min=0, doc="linear warm-up from 0 to lr")
    end_lr_ratio: float = _f(0.1, min=0.0, max=1.0, doc="final lr as a fraction of lr (cosine/linear)")
    weight_decay: float = _f(0.0, min=0.0, doc="decoupled weight decay (adamw, lion, adafactor)")
    b1: float = _f(0.9, min=0.0, max=1.0, doc="first-moment decay (adam*, lion); sgd: momentum (0 = none)")
    b2: float = _f(0.999, min=0.0, max=1.0, doc="second-moment decay (adam*, lion)")
    eps: float = _f(1e-8, gt=0.0, doc="adam epsilon")
    grad_clip: float = _f(1.0, min=0.0, doc="global-norm gradient clipping; 0 = off")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # = jaxtok.models.lora.TARGETS (tests check)
_PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                 "down_proj": "down"}


@dataclasses.dataclass(frozen=True)
class LoraSection(_Section):
    """LoRA adapters (jaxtok.models.lora): only low-rank updates of the named projections train, the base is frozen."""

    _key: ClassVar[str] = "lora"
    rank: int = _f(0, min=0, doc="adapter rank r; 0 = off (every parameter trains)")
    alpha: float = _f(16.0, gt=0.0, doc="the update of W is (alpha / rank) * x A B")
    targets: List[str] = _f(["q", "k", "v", "o"], doc="projections with adapters: q, k, v, o (attention), gate, up, "
                                                     "down (MLP; not on mixture-of-experts layers)")

    def check(self) -> None:
        targets = list(self.targets)
        for t in targets:
            if t not in LORA_TARGETS:
                hint = f" (PEFT's {t!r} is {_PEFT_TARGETS[t]!r} here)" if t in _PEFT_TARGETS else ""
                raise ConfigError(f"lora.targets: {t!r} is not a projection{hint}; allowed {list(LORA_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"lora.targets={targets!r}: a projection is named twice")
        if self.rank and not targets:
            raise ConfigError(f"lora.targets=[]: lora.rank={self.rank} needs at least one of {list(LORA_TARGETS)}")


@dataclasses.dataclass(frozen=True)
class ObjectiveSection(_Section):
    """The loss: a registered objective name and its arguments."""

    _key: ClassVar[str] = "objective"
    name: str = _f("sft", doc="a name from the OBJECTIVES registry (sft, distill, policy_gradient, ...)")
    args: Dict[str, Any] = _f({}, doc="the objective's arguments (checked against its dataclass)")


@dataclasses.dataclass(frozen=True)
class TrainSection(_Section):
    """Training loop."""

    _key: ClassVar[str] = "train"
    steps: int = _f(1000, min=1, doc="optimizer steps")
    micro_batches: int = _f(1, min=1, doc="gradient accumulation: micro-batches per step (token-weighted)")
    eval_every: int = _f(0, min=0, doc="steps between evals; 0 = only at the end")
    log_every: int = _f(50, min=1, doc="steps between metrics.jsonl records")
    checkpoint_every: int = _f(0, min=0, doc="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, min=1, doc="checkpoints kept in the run directory")
    seed: int = _f(0, doc="seed of parameter init and training randomness")
    eval_batches: int = _f(4, min=1, doc="batches per periodic eval")
    eval_at_start: bool = _f(False, doc="also evaluate the starting model (step 0 of metrics.jsonl) when a run "
                                        "starts fresh, e.g. an init_from model on the same curve")


@dataclasses.dataclass(frozen=True)
class RolloutSection(_Section):
    """On-policy data for rollout objectives (OPD/TIP/TRACE, the RL losses): every ``inner_epochs`` optimizer
    steps, ``data.batch_size / num_generations`` prompts are completed ``num_generations`` times by the current
    policy (:mod:`jaxtok.train.rollout`), scored by the rewards and handed to the objective."""

    _key: ClassVar[str] = "rollout"
    num_generations: int = _f(4, min=1, doc="completions per prompt (the GRPO group size); divides data.batch_size")
    max_new_tokens: int = _f(32, min=1, doc="cap on completion tokens")
    temperature: float = _f(1.0, gt=0.0, doc="sampling temperature (the objective's log-probs use the same)")
    top_k: int = _f(0, min=0, doc="sampling top-k; 0 = off (old log-probs are recomputed without filters)")
    top_p: float = _f(1.0, gt=0.0, max=1.0, doc="sampling nucleus; 1 = off")
    inner_epochs: int = _f(1, min=1, doc="optimizer steps per rollout batch (PPO's mu)")
    width_buckets: int = _f(4, min=1, doc="rollout batches drop all-padding columns (left of the longest prompt, "
                                          "right of the longest completion) and are cut to the next of this many "
                                          "equal widths up to data.prompt_len + max_new_tokens, so the scoring and "
                                          "train step compile at most this many shapes; 1 = always the full width")
    behaviour_logprobs: str = _f("recompute", choices=("recompute", "sampler"),
                                 doc="the rollout batch's old_logprobs / entropy: recompute = a scoring forward of "
                                     "the policy over the sampled tokens (logs the sampler/trainer mismatch every "
                                     "step); sampler = the sampler's own log-probs and entropies, no scoring forward "
                                     "(TRL's single-epoch shortcut: the train step's ratio_* / approx_kl then show the "
                                     "mismatch); needs no top-k/top-p filter, the ar sampler, no off-policy rows")
    teacher_init_from: Optional[str] = _f(None, doc="run directory of the frozen teacher (objectives needing one)")
    reference: str = _f("none", doc="frozen reference policy for KL terms: none | init (the initial policy) | "
                                    "<run dir>")
    rewards: Dict[str, float] = _f({"exact_match": 1.0},
                                   doc="reward name -> weight (jaxtok.train.rewards: exact_match, format, "
                                       "math_verify)")
    off_policy_fraction: float = _f(0.0, min=0.0, max=1.0,
                                    doc="GKD-style mixing: share of prompt groups completed by the teacher")
    topk: int = _f(0, min=0, doc="top-K of the behaviour distribution stored per completion token (topk_ids / "
                                  "topk_logprobs) for objectives that read them (CPPO topk_tv/topk_kl); 0 = the "
                                  "objective's default (20 when it needs them, else none)")
    branches: int = _f(0, min=0, doc="APPO tree rollouts: branch rollouts per prompt from high Branching-Score "
                                     "tokens (jaxtok.train.branching); 0 = off")
    branch_gamma: float = _f(1.0, min=0.0, max=1.0, doc="APPO: discount of the future log-ratio in the score")
    branch_eps: float = _f(0.2, gt=0.0, doc="APPO: clip of the future value Omega to [1-eps, 1+eps]")
    sampler: str = _f("ar", choices=("ar", "speculative"),
                      doc="rollout sampler: ar = jaxtok.decode.generate; speculative = lossless draft-and-verify "
                          "(jaxtok.decode.speculative) with the drafter rollout.draft_init_from: same rollout "
                          "distribution and sampler log-probs, fewer target forwards")
    draft_init_from: Optional[str] = _f(None, doc="speculative rollouts: the AR drafter, a run directory, an HF "
                                                  "folder or preset:<name> (randomly initialised; pair it with "
                                                  "draft_refresh_every); same vocabulary as the policy")
    draft_len: int = _f(4, min=1, doc="speculative rollouts: maximum draft tokens per round (gamma)")
    draft_policy: str = _f("fixed", doc="speculative rollouts: draft-length policy, a DRAFT_POLICIES name "
                                        "(fixed, heuristic, confidence, specdecpp, speckv)")
    draft_policy_args: Dict[str, Any] = _f({}, doc="speculative rollouts: the draft policy's arguments")
    draft_refresh_every: int = _f(0, min=0, doc="speculative rollouts: every N rollouts, distil the drafter towards "
                                                "the current policy by on-policy distillation (objective opd); 0 = "
                                                "the drafter stays as loaded")
    draft_refresh_steps: int = _f(2, min=1, doc="speculative rollouts: OPD optimizer steps per drafter refresh")
    draft_refresh_lr: float = _f(1e-3, gt=0.0, doc="speculative rollouts: AdamW learning rate of drafter refreshes")

    @property
    def rows_per_prompt(self) -> int:
        """Rows of the rollout batch per prompt: initial completions plus branches."""
        return self.num_generations + self.branches

    def check(self) -> None:
        for name, w in self.rewards.items():
            if not isinstance(w, (int, float)) or _non_finite(w):
                raise ConfigError(f"rollout.rewards.{name}={w!r}: weights are finite numbers")
        if self.behaviour_logprobs == "sampler":
            needed = {"top_k": 0, "top_p": 1.0, "sampler": "ar", "off_policy_fraction": 0.0, "branches": 0}
            clash = [(k, getattr(self, k)) for k, v in needed.items() if getattr(self, k) != v]
            if clash:
                raise ConfigError(f"rollout.behaviour_logprobs='sampler' with rollout.{clash[0][0]}="
                                  f"{clash[0][1]!r}: the sampler's log-probs are the policy's only "
                                  f"without top-k/top-p filters, from the ar sampler, on the policy's own rows (no "
                                  f"off-policy or APPO branch rows); use behaviour_logprobs: recompute")
        if self.sampler == "speculative":
            if not self.draft_init_from:
                raise ConfigError("rollout.draft_init_from=None: rollout.sampler='speculative' needs a drafter (a run "
                                  "directory, an HF folder or preset:<name>)")
            if self.branches:
                raise ConfigError(f"rollout.branches={self.branches}: APPO tree rollouts sample with "
                                  f"rollout.sampler='ar' only")
            if self.draft_policy in ("ead", "taps"):  # decode.method=ead / decode.drafter=taps, not draft policies
                raise ConfigError(f"rollout.draft_policy={self.draft_policy!r}: speculative rollouts take one AR "
                                  f"drafter and a draft-length policy (fixed, heuristic, confidence, specdecpp, "
                                  f"speckv); ead is lossy and taps routes several drafters")


# Old loop selectors spelled as decode.policy values -> the keys that select them now (refused, not renamed)
_OLD_DECODE_POLICIES = {
    "ead": "EAD is a decoding loop of its own: set decode.method=ead (small model: decode.draft_init_from; its "
           "arguments stay in decode.policy_args) and leave decode.policy unset",
    "taps": "TAPS is a drafter: set decode.method=speculative decode.drafter=taps with decode.drafter_args="
            "{drafters, ngram, max_ngram}; the inner draft-length policy is decode.policy / decode.policy_args",
    "lave": "LAVE is a decoding loop of its own: set decode.method=lave (its arguments stay in decode.policy_args) "
            "and leave decode.policy unset",
}


@dataclasses.dataclass(frozen=True)
class DecodeSection(_Section):
    """Decoding: the method (the loop), its drafter, sampling parameters, and the policy inside the loop."""

    _key: ClassVar[str] = "decode"
    method: str = _f("greedy", doc="the decoding loop, a DECODE_METHODS name (`jaxtok registry decode-methods`; one "
                                   "registered by your own code works too): greedy/sample: autoregressive; "
                                   "speculative: lossless draft-and-verify; ead: entropy-adaptive small/large "
                                   "switching (lossy); diffusion: masked diffusion; lave: grammar-constrained masked "
                                   "diffusion (a host loop); lud: lexical unit decoding, k tokens per forward from "
                                   "placeholders (lossy)")
    max_new_tokens: int = _f(32, min=1, doc="cap on generated tokens per row")
    temperature: float = _f(1.0, min=0.0, doc="sampling temperature (method=greedy ignores it; 0 = greedy)")
    top_k: int = _f(0, min=0, doc="keep the k most likely tokens; 0 = off")
    top_p: float = _f(1.0, gt=0.0, max=1.0, doc="nucleus: keep the smallest set with mass >= top_p; 1 = off")
    min_p: float = _f(0.0, min=0.0, max=1.0, doc="drop tokens with p < min_p * p_max; 0 = off")
    policy: Optional[str] = _f(None, doc="the policy inside the method's loop: speculative: a DRAFT_POLICIES name "
                                         "(default fixed); diffusion: a COMMIT_POLICIES name (default llada); "
                                         "greedy/sample: a LOGIT_GUIDES name (lenvm: length control, grammar); "
                                         "ead/lave/lud take none; None = the method's default")
    policy_args: Dict[str, Any] = _f({}, doc="the policy's arguments (checked against its dataclass); ead/lave/lud: "
                                             "the method's own arguments")
    drafter: str = _f("single", doc="speculative: a DRAFTERS name (`jaxtok registry drafters`): single = "
                                    "decode.draft_init_from (an AR run: model drafter; a diffusion run: DEER; unset: "
                                    "n-gram prompt lookup); taps = route each round among several drafters "
                                    "(decode.drafter_args)")
    drafter_args: Dict[str, Any] = _f({}, doc="the drafter's arguments (taps: drafters, ngram, max_ngram)")
    draft_init_from: Optional[str] = _f(None, doc="speculative: run directory of the draft model; ead: the small "
                                                  "model")
    draft_len: int = _f(4, min=1, doc="speculative: maximum draft tokens per round")
    batch_size: int = _f(32, min=1, doc="prompts decoded together")

    def check(self) -> None:
        if self.policy in _OLD_DECODE_POLICIES:
            raise ConfigError(f"decode.policy={self.policy!r}: {_OLD_DECODE_POLICIES[self.policy]}")
        if self.drafter_args and self.drafter == "single":
            raise ConfigError(f"decode.drafter_args={self.drafter_args!r}: decode.drafter='single' takes none; "
                              f"set decode.drafter=taps")
        if self.method == "ead" and self.draft_init_from is None:
            raise ConfigError("decode.draft_init_from=None: decode.method='ead' needs the small model's run directory")


@dataclasses.dataclass(frozen=True)
class RunSection(_Section):
    """Where outputs go."""

    _key: ClassVar[str] = "run"
    out_dir: str = _f("runs", doc="parent of run directories")
    name: Optional[str] = _f(None, doc="run directory name; default: the config file's stem")
    resume: bool = _f(True, doc="resume from the run directory's last good checkpoint")
    overwrite: bool = _f(False, doc="with resume=false: replace the run directory's earlier outputs (checkpoints, "
                                    "metrics, summary); without it, training into a directory holding a run is "
                                    "refused")
    cache_dir: str = _f(".cache/jaxtok", doc="recipe stage cache: <cache_dir>/<stage>-<key>/")
    progress: bool = _f(True, doc="show progress bars (steps, tokens/s, ETA)")
    tensorboard: bool = _f(False, doc="train: also write the metrics as TensorBoard event files under "
                                      "<run_dir>/tensorboard/ (needs tensorboardX: pip install 'jaxtok[tensorboard]')")
    wandb: Dict[str, Any] = _f({}, doc="train: also log the metrics to Weights & Biases, e.g. {project: my-project} "
                                       "(keys: project, entity, name, group, tags, notes, mode; needs wandb "
                                       "installed); {} = off")
    profile_steps: List[int] = _f([], doc="train: [first, last]: capture a jax.profiler trace of steps first..last "
                                          "(1-based, inclusive) into <run_dir>/profile/ (TensorBoard/Perfetto); "
                                          "[] = off")

    WANDB_KEYS: ClassVar[tuple] = ("project", "entity", "name", "group", "tags", "notes", "mode")

    def check(self) -> None:
        if self.tensorboard and _find_spec("tensorboardX") is None:
            raise ConfigError("run.tensorboard=true: the TensorBoard writer needs tensorboardX, which is not "
                              "installed: pip install 'jaxtok[tensorboard]' (or set run.tensorboard=false)")
        if self.wandb:
            unknown = sorted(set(self.wandb) - set(self.WANDB_KEYS))
            if unknown:
                raise ConfigError(f"run.wandb.{unknown[0]}: unknown key; allowed keys of run.wandb: "
                                  f"{list(self.WANDB_KEYS)}")
            if not isinstance(self.wandb.get("project"), str) or not self.wandb["project"]:
                raise ConfigError(f"run.wandb={dict(self.wandb)!r}: needs a project name, e.g. "
                                  f"run.wandb.project=my-project ({{}} = off)")
            if _find_spec("wandb") is None:
                raise ConfigError("run.wandb: Weights & Biases logging needs the wandb package, which is not "
                                  "installed: pip install wandb (or remove run.wandb)")
        if self.profile_steps:
            p = list(self.profile_steps)
            if len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in p) or not 1 <= p[0] <= p[1]:
                raise ConfigError(f"run.profile_steps={p!r}: [first, last] steps to trace, 1 <= first <= last "
                                  f"(or [] = off)")


@dataclasses.dataclass(frozen=True)
class BenchSection(_Section):
    """A benchmark by name and its arguments."""

    _key: ClassVar[str] = "bench"
    name: str = _f("train", doc="benchmark name (BENCHES registry, jaxtok.bench)")
    args: Dict[str, Any] = _f({}, doc="the benchmark's arguments")
    trace: bool = _f(False, doc="write a jax.profiler trace of the run into <run_dir>/trace (TensorBoard/Perfetto)")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: every section has defaults, a YAML file states what it changes."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    decode: DecodeSection = dataclasses.field(default_factory=DecodeSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    bench: BenchSection = dataclasses.field(default_factory=BenchSection)

    def __post_init__(self):
        opt = self.optimizer
        if opt.schedule != "constant" and opt.warmup_steps >= self.train.steps:
            raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps}: must be < train.steps={self.train.steps} "
                              f"with optimizer.schedule={opt.schedule!r}")
        if self.run.profile_steps and self.run.profile_steps[0] > self.train.steps:
            raise ConfigError(f"run.profile_steps={list(self.run.profile_steps)!r}: the window starts after the last "
                              f"step (train.steps={self.train.steps}); no trace would be written")
        if self.data.batch_size % self.train.micro_batches:
            raise ConfigError(f"train.micro_batches={self.train.micro_batches}: must divide "
                              f"data.batch_size={self.data.batch_size}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML of ``path``; a missing file, a directory, unreadable or non-UTF-8 bytes and invalid YAML
    are ConfigErrors naming the file (``what`` says which kind of file it is)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml_with_bases(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file, merging the files named by its ``base`` key first (recursively, relative paths)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, _seen + (path,)))}")
    data = read_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"base={bases!r} in {path}: must be a file name or a list of file names")
    merged: dict = {}
    for base in bases:
        merged = _merge_layer(merged, read_yaml_with_bases(path.parent / base, _seen + (path,)))
    return _merge_layer(merged, data)


# (section, name key, its arguments key): arguments belong to the name they were written for
NAMED_ARGS = (("objective", "name", "args"), ("decode", "policy", "policy_args"), ("decode", "drafter", "drafter_args"),
              ("data", "task", "task_args"), ("bench", "name", "args"))


def _clear_named_args(data: dict, overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """Overrides ``objective.args={}`` (or ``=null``; likewise ``decode.policy_args``, ``data.task_args``,
    ``bench.args``) clear the config file's arguments instead of merging into them (a merge cannot remove keys):
    the way to override a name without keeping the old name's arguments. Returns the data without them and the
    remaining overrides."""
    rest = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        target = [(s, a) for s, _, a in NAMED_ARGS if key.strip() == f"{s}.{a}"]
        if target and value.strip() in ("{}", "null", "~"):
            section, args_key = target[0]
            if isinstance(data.get(section), Mapping):
                data = {**data, section: {k: v for k, v in data[section].items() if k != args_key}}
            continue
        rest.append(ov)
    return data, rest


def _merge_layer(below: dict, above: dict) -> dict:
    """``above`` (an including file) merged over ``below`` (its merged bases). Where ``above`` names another
    objective / decode policy / task / benchmark than ``below`` (:data:`NAMED_ARGS`; an unnamed one is the schema
    default), ``below``'s arguments of the old name are dropped instead of merged: the new name starts from its own
    defaults plus the arguments ``above`` gives."""
    below = dict(below)
    for section, name_key, args_key in NAMED_ARGS:
        low, high = below.get(section), above.get(section)
        if not isinstance(low, Mapping) or not isinstance(high, Mapping) or name_key not in high:
            continue
        default = _default_of({f.name: f for f in dataclasses.fields(_section_class(section))}[name_key])
        if args_key in low and high[name_key] != low.get(name_key, default):
            below[section] = {k: v for k, v in low.items() if k != args_key}
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(below), OmegaConf.create(above)))


def _omegaconf_error(e: OmegaConfBaseException, raw: Any) -> ConfigError:
    """An OmegaConf merge/validation error as a ConfigError naming the dotted key, the given value (looked up in
    ``raw``, the merged input without the schema) and the allowed keys or type."""
    key = getattr(e, "full_key", None) or "?"
    head = key.rpartition(".")[0]
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    value = ""
    if raw is not None:
        found = OmegaConf.select(raw, key, default=_NOT_GIVEN, throw_on_missing=False)
        if found is not _NOT_GIVEN:
            value = f"={OmegaConf.to_container(found) if OmegaConf.is_config(found) else found!r}"
    node = _section_class(head)
    if node is not None and "not in" in msg:
        hint = msg.split("Did you mean", 1)[1].strip(" :?") if "Did you mean" in msg else ""
        allowed = sorted(f.name for f in dataclasses.fields(node))
        where = head or "the top level"
        hint = peer_hint(key) or (f" (did you mean {hint}?)" if hint else "")
        return ConfigError(f"{key}{value}: unknown key{hint}; allowed keys of {where}: {allowed}")
    if "is not a ListConfig" in msg:  # a scalar given for a list field, e.g. data.train_files=a.jsonl
        shown = value[1:].strip("'\"") if value else "..."
        return ConfigError(f"{key}{value}: expects a list; write {key}=[{shown}] on the command line (in YAML: "
                           f"[a, b] or one '- item' per line)")
    return ConfigError(f"{key}{value}: {msg}")


_NOT_GIVEN = object()


def _section_class(dotted: str):
    """The schema dataclass at ``dotted`` ("" = Config), or None if that key is not a section."""
    cls = Config
    for part in [p for p in dotted.split(".") if p]:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    return cls if dataclasses.is_dataclass(cls) else None


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a plain mapping plus dotted overrides."""
    raw = None
    data, overrides = _clear_named_args(data, overrides)
    for name, value in data.items():  # a section given a scalar or list, e.g. ``optimizer: 3``
        section = _section_class(name)
        if section is not None and value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{name}={value!r}: {name} is a section; give a mapping of its keys, one of "
                              f"{sorted(f.name for f in dataclasses.fields(section))}")
    for ov in overrides:  # a value that is not YAML (``a.b=[1,``) is named, not a parser traceback
        key = ov.split("=", 1)[0].strip()
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([ov]), key)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({problem})") from None
        except OmegaConfBaseException:
            continue  # reported below with the key
        section = _section_class(key) if key else None
        if section is not None and key and value is not None and not OmegaConf.is_dict(value):
            raise ConfigError(f"override {ov!r}: {key} is a section, not a value; set its keys ({key}.KEY=value), "
                              f"one of {sorted(f.name for f in dataclasses.fields(section))}")
    try:
        given = [OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides))]
        raw = OmegaConf.merge(*given)
        merged = OmegaConf.merge(OmegaConf.structured(Config), *given)
        cfg = OmegaConf.to_object(merged)  # builds the frozen dataclasses, whose __post_init__ checks ranges
    except (OmegaConfBaseException, TypeError) as e:  # TypeError: a container merged into a scalar or back
        if getattr(e, "full_key", None):
            raise _omegaconf_error(e, raw) from None
        for ov in overrides:  # an error without a key: find the override that causes it
            key = ov.split("=", 1)[0].strip()
            try:
                OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist([ov]))
            except (OmegaConfBaseException, TypeError) as e1:
                if _section_class(key) is not None:
                    fields = sorted(f.name for f in dataclasses.fields(_section_class(key)))
                    raise ConfigError(f"override {ov!r}: {key} is a section, not a value; set its keys "
                                      f"({key}.KEY=value), one of {fields}") from None
                msg = _omegaconf_error(e1, None) if isinstance(e1, OmegaConfBaseException) else e1
                raise ConfigError(f"override {ov!r}: {msg}") from None
        if isinstance(e, TypeError):
            raise ConfigError(f"config: {e}") from None
        raise _omegaconf_error(e, raw) from None
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``base`` includes), apply ``a.b=value`` overrides, validate; raise ConfigError."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.subkey=value")
        key = ov.split("=", 1)[0].strip()
        if not key:
            raise ConfigError(f"override {ov!r}: the key before '=' is empty; write key.subkey=value")
        if any(not part for part in key.split(".")):
            raise ConfigError(f"override {ov!r}: key {key!r} has an empty part; write key.subkey=value")
    return from_dict(read_yaml_with_bases(path), overrides)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory's ``config.yaml`` holds; loadable by load_config)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain nested dicts."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _check_fields(section: Any, prefix: str) -> None:
    """Check every field's ``choices``/``min``/``max``/``gt`` metadata; raise ConfigError naming the key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}{f.name}"
        meta = f.metadata
        if value is None:
            continue
        if _non_finite(value) and not _non_finite(_default_of(f)):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r}: allowed values {list(meta['choices'])}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key}={value!r}: must be >= {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key}={value!r}: must be <= {meta['max']}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"{key}={value!r}: must be > {meta['gt']}")


def _find_spec(name: str):
    """``importlib.util.find_spec(name)`` (None when the package is not installed; a module placed in
    ``sys.modules`` without a spec counts as installed)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None) or True
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is a float NaN or +-inf (bools and ints are finite)."""
    return isinstance(value, float) and not math.isfinite(value)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


_REGISTERING_MODULES = ("jaxtok.tasks", "jaxtok.train.objectives", "jaxtok.train.rewards", "jaxtok.decode",
                        "jaxtok.bench")


def import_registering_modules(modules: Sequence[str] = _REGISTERING_MODULES) -> list[str]:
    """Import the packages that fill the registries; returns those that do not exist (yet). An import error
    inside an existing package is not hidden."""
    missing = []
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise
            missing.append(mod)
    return missing


def check_name(registry: Registry, key: str, name: str, args: Any = None, args_key: Optional[str] = None) -> Any:
    """``name`` must be registered in ``registry`` (ConfigError naming ``key``, the value and the allowed names)
    and ``args`` must fit its argument dataclass; returns the parsed arguments. An empty registry (its package
    registers nothing yet) is not checked."""
    if not registry.names():
        return None
    if name not in registry:
        raise ConfigError(f"{key}={name!r}: not a known {registry.kind}; allowed: {registry.names()}")
    return registry.parse_args(name, args, args_key or f"{key}_args")


def validate_names(cfg: Config) -> RunPlan:
    """Resolve ``cfg`` into its :class:`~jaxtok.plan.RunPlan`: check method names against the registries, parse
    each argument mapping once into its registered dataclass (``data.task``/``data.task_args``,
    ``objective.name``/``objective.args``, ``model.preset``, the decode section, :func:`check_decode`) and check the
    rules between sections on the parsed values. The one place a run's config is parsed: handlers and the loops
    receive the plan. Imports the registering packages lazily; every problem is a ConfigError naming the key, the
    value and the allowed ones."""
    from jaxtok.registry import OBJECTIVES, TASKS

    import_registering_modules()
    task, task_args = None, None
    if check_data_files(cfg):  # a registered task, not a file dataset
        task_args = check_named(TASKS, "data.task", cfg.data.task, cfg.data.task_args, "data.task_args")
        task = TASKS.entry(cfg.data.task, "data.task")
    objective_args = check_named(OBJECTIVES, "objective.name", cfg.objective.name, cfg.objective.args,
                                 "objective.args")
    objective = OBJECTIVES.entry(cfg.objective.name, "objective.name")
    check_objective(cfg, objective.spec, objective_args)
    draft_policy, draft_policy_args = check_rollout_sampler(cfg)
    check_preset(cfg)
    decode = check_decode(cfg)
    check_bench(cfg)
    return RunPlan(cfg=cfg, objective=objective, objective_args=objective_args, task=task, task_args=task_args,
                   rewards=tuple(cfg.rollout.rewards), draft_policy=draft_policy,
                   draft_policy_args=draft_policy_args, decode=decode)


def check_bench(cfg: Config) -> None:
    """``bench.name`` must be a registered benchmark and ``bench.args`` must fit its arguments, so ``jaxtok validate``
    and every command catch a misspelt benchmark before anything runs (``jaxtok bench`` parses them again)."""
    from jaxtok.registry import BENCHES

    if len(BENCHES.names()) and cfg.bench.name:
        check_named(BENCHES, "bench.name", cfg.bench.name, cfg.bench.args, "bench.args")


def as_plan(cfg_or_plan: Config | RunPlan) -> RunPlan:
    """``cfg_or_plan`` itself when a :class:`~jaxtok.plan.RunPlan`, else :func:`validate_names` of the config
    (tests and scripts pass a Config to ``train``/``evaluate``/``run_decode``)."""
    return cfg_or_plan if isinstance(cfg_or_plan, RunPlan) else validate_names(cfg_or_plan)


def check_data_files(cfg: Config) -> bool:
    """File datasets (``data.task`` ``files``/``jsonl``/``parquet``) name their files and, with the ``format``
    reward, an answer format; returns True when ``data.task`` is a registered task instead."""
    if cfg.data.task not in ("files", "jsonl", "parquet"):
        return True
    if not (cfg.data.path or cfg.data.train_files or cfg.data.eval_files):
        if cfg.data.task == "files":
            raise ConfigError("data.train_files=[]: data.task='files' needs data.train_files and/or "
                              "data.eval_files")
        raise ConfigError(f"data.path=None: required with data.task={cfg.data.task!r} (or data.train_files / "
                          f"data.eval_files)")
    if "format" in cfg.rollout.rewards and cfg.data.answer_regex is None:
        raise ConfigError("rollout.rewards.format: file datasets have an answer format only with "
                          "data.answer_regex (the pattern format_ok checks); set it or drop the format reward")
    return False


def check_rollout_sampler(cfg: Config) -> tuple[Optional[Entry], Any]:
    """With ``rollout.sampler=speculative``: the draft-length policy's entry (``rollout.draft_policy``) and its
    parsed ``rollout.draft_policy_args``; else ``(None, None)``."""
    ro = cfg.rollout
    if ro.sampler != "speculative":
        return None, None
    args = check_named(DRAFT_POLICIES, "rollout.draft_policy", ro.draft_policy, ro.draft_policy_args,
                       "rollout.draft_policy_args")
    return DRAFT_POLICIES.entry(ro.draft_policy, "rollout.draft_policy"), args


def check_preset(cfg: Config) -> None:
    """``model.preset`` names a preset (unless ``model.hf_path`` is given)."""
    if cfg.model.hf_path is None and not import_registering_modules(("jaxtok.models.presets",)):
        presets = importlib.import_module("jaxtok.models.presets")
        if cfg.model.preset not in presets.PRESETS:
            raise ConfigError(f"model.preset={cfg.model.preset!r}: allowed {presets.names()}")


def check_decode(cfg: Config) -> Optional[DecodePlan]:
    """``decode.*`` resolved against :data:`~jaxtok.registry.DECODE_METHODS`: the method, the policy its loop takes
    (``decode.policy`` or the method's default, in the family the method's spec names) with ``decode.policy_args``
    parsed — or, for a method without policies (its spec's ``policy`` is None: ead, lave, lud), its own arguments
    parsed from ``decode.policy_args`` — and the drafter (``decode.drafter``/``decode.drafter_args``) of a method that takes one."""
    from jaxtok.registry import DECODE_METHODS, DRAFTERS

    d = cfg.decode
    if not DECODE_METHODS.names():  # the decoding package could not be imported: nothing to resolve against
        return None
    method = DECODE_METHODS.entry(d.method, "decode.method")
    spec = method.spec
    family = {"guide": LOGIT_GUIDES, "draft": DRAFT_POLICIES, "commit": COMMIT_POLICIES}.get(spec.policy)
    policy, args = None, None
    if family is None and d.policy is not None:  # the spec says: policy_args are the method's own arguments
        raise ConfigError(f"decode.policy={d.policy!r}: decode.method={d.method!r} takes no policy (its arguments "
                          f"are decode.policy_args)")
    if family is not None and d.policy_args and d.policy is None:
        raise ConfigError(f"decode.policy_args={dict(d.policy_args)!r}: set decode.policy too")
    if family is None:
        args = check_named(DECODE_METHODS, "decode.method", d.method, d.policy_args, "decode.policy_args")
    elif d.policy or spec.default_policy:
        name = d.policy or spec.default_policy
        args = check_named(family, "decode.policy", name, d.policy_args, "decode.policy_args")
        policy = family.entry(name, "decode.policy")
    drafter, drafter_args = None, None
    if d.drafter != "single" and not spec.drafter:
        raise ConfigError(f"decode.drafter={d.drafter!r}: decode.method={d.method!r} takes no drafter (drafters are "
                          f"for {[n for n in DECODE_METHODS.names() if DECODE_METHODS.entry(n).spec.drafter]})")
    if spec.drafter:
        drafter_args = check_named(DRAFTERS, "decode.drafter", d.drafter, d.drafter_args, "decode.drafter_args")
        drafter = DRAFTERS.entry(d.drafter, "decode.drafter")
    return DecodePlan(method=method, policy=policy, policy_args=args, drafter=drafter, drafter_args=drafter_args)


def check_named(registry: Registry, key: str, name: str, args: Any, args_key: str) -> Any:
    """:func:`check_name`; arguments that do not fit get a hint: those written for another name are kept when only
    the name is overridden on the command line (a base file's are dropped, :func:`_merge_layer`)."""
    try:
        return check_name(registry, key, name, args, args_key)
    except ConfigError as e:
        if not args or not str(e).startswith(args_key):
            raise
        raise ConfigError(f"{e}; if {args_key} were written for another {registry.kind} (an override of {key} "
                          f"keeps the config file's), clear them with {args_key}={{}} and give those of {name!r} as "
                          f"{args_key}.KEY=value") from None


def check_micro_batches(cfg: Config, spec: ObjectiveSpec) -> None:
    """``train.micro_batches > 1`` interleaves the rows of a batch over micro-batches, splitting every prompt group.
    An objective computing group advantages inside its loss (``spec.group_advantages is True``) would normalise
    over group fragments: refused. ``group_advantages=fn(batch, args)`` means the loop computes them on the whole
    rollout batch before the split (``policy_gradient``'s ``host_advantages``): allowed."""
    if cfg.train.micro_batches > 1 and spec.group_advantages is True:
        raise ConfigError(f"train.micro_batches={cfg.train.micro_batches}: objective {cfg.objective.name!r} "
                          f"computes group advantages inside its loss and micro-batches split every prompt group; "
                          f"use train.micro_batches=1 (a smaller data.batch_size fits memory the same way)")


DEFAULT_ROLLOUT_TOPK = 20  # CPPO/DPPO's top-K reduced divergence (train_methods.md §6.5)


def rollout_topk(cfg: Config, spec: ObjectiveSpec, args: Any) -> int:
    """K of the top-K behaviour statistics the rollout stores: ``rollout.topk``, else
    :data:`DEFAULT_ROLLOUT_TOPK` when the objective's ``spec.rollout_topk(args)`` says it reads them (``args``: the
    parsed ``objective.args``), else 0. Only the default collector stores them: with APPO branches or an objective's
    own ``collect`` a K > 0 is a ConfigError."""
    needed = bool(spec.rollout_topk is not None and spec.rollout_topk(args))
    k = cfg.rollout.topk or (DEFAULT_ROLLOUT_TOPK if needed else 0)
    if k and (cfg.rollout.branches or spec.collect is not None):
        who = ("rollout.branches > 0 (APPO)" if cfg.rollout.branches
               else f"objective {cfg.objective.name!r}'s own collector")
        raise ConfigError(f"rollout.topk={k}: top-K rollout statistics are stored by the default collector only, not "
                          f"with {who}")
    return k


def self_teacher_sync(spec: ObjectiveSpec, args: Any) -> Optional[tuple[int, int]]:
    """``(sync period N, first step without teacher)`` when the teacher is the student's own synced copy
    (``spec.self_teacher(args)``, TRACE's ``teacher: self``), else None."""
    return None if spec.self_teacher is None else spec.self_teacher(args)


def check_objective(cfg: Config, spec: ObjectiveSpec, args: Any) -> None:
    """Rules between the objective (its spec, parsed ``args``) and the other sections. Rollout and trajectory
    objectives: group size (trajectory: pairs per trajectory) divides the batch, the frozen models they name are
    configured, reward names are registered, group advantages are not split over micro-batches, top-K statistics
    come from a collector that stores them."""
    ro = cfg.rollout
    if spec.data not in ("rollout", "trajectory"):
        return
    if spec.data == "trajectory" and ro.branches:
        raise ConfigError(f"rollout.branches={ro.branches}: APPO branching is for rollout objectives, not "
                          f"objective {cfg.objective.name!r} (data='trajectory')")
    check_micro_batches(cfg, spec)
    rollout_topk(cfg, spec, args)
    if cfg.data.batch_size % ro.rows_per_prompt:
        raise ConfigError(f"rollout.num_generations={ro.num_generations} + rollout.branches={ro.branches}: must "
                          f"divide data.batch_size={cfg.data.batch_size} (rows = prompts x completions)")
    own = bool(self_teacher_sync(spec, args))  # the teacher is the student's synced copy (TRACE's teacher: self)
    if own and ro.teacher_init_from:
        raise ConfigError(f"rollout.teacher_init_from={ro.teacher_init_from!r}: objective {cfg.objective.name!r} "
                          f"distils from the student's own synced copy (teacher: self); unset it, or set "
                          f"objective.args.teacher=external")
    if "teacher" in spec.models and not own and not ro.teacher_init_from:
        raise ConfigError(f"rollout.teacher_init_from=None: objective {cfg.objective.name!r} needs a teacher run "
                          f"directory")
    for name in ro.rewards:
        check_name(REWARDS, "rollout.rewards", name)


def check_paths(cfg: Config) -> None:
    """Input paths named by ``cfg`` must exist. Checked by the commands that run, not by ``jaxtok validate``:
    a config may name run directories that an earlier recipe stage creates."""
    paths = {"model.hf_path": cfg.model.hf_path, "model.init_from": cfg.model.init_from,
             "decode.draft_init_from": cfg.decode.draft_init_from,
             "rollout.teacher_init_from": cfg.rollout.teacher_init_from}
    if cfg.rollout.reference not in ("none", "init"):
        paths["rollout.reference"] = cfg.rollout.reference
    if cfg.data.task in ("jsonl", "parquet"):
        paths["data.path"] = cfg.data.path
    for key, value in paths.items():
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{key}={value!r}: no such file or directory")
    from jaxtok.data import expand_paths

    expand_paths(cfg.data.train_files, "data.train_files")  # glob patterns must match; files must exist
    expand_paths(cfg.data.eval_files, "data.eval_files")


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows of every schema field, for the README config reference."""
    rows = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            rows += describe(t, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, f.metadata["choices"]))
        rows.append((prefix + f.name, repr(default), doc))
    return rows


def reference_yaml() -> str:
    """Every key with its default and doc as commented YAML (``configs/base.yaml`` holds this text)."""
    import json

    lines = ["# Every jaxtok config key with its default (generated by jaxtok.config.reference_yaml()).",
             "# An experiment file states only what it changes; it may include others with `base: file.yaml`."]
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        lines += ["", f"# {cls.__doc__.splitlines()[0]}", f"{sec.name}:"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, f.metadata["choices"]))
            text = json.dumps(default)
            if isinstance(default, float) and "e" in text and "." not in text:
                text = text.replace("e", ".0e")  # YAML 1.1 reads 1e-08 as a string, 1.0e-08 as a float
            lines.append(f"  {f.name}: {text}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def build_schedule(section: OptimizerSection, total_steps: int):
    """The optax learning-rate schedule of ``section`` over ``total_steps``: ``schedule(count)`` is the rate of
    the update taken after ``count`` earlier updates (the optimizer's step ``count + 1``, see
    :func:`learning_rate`)."""
    import optax

    if section.schedule != "constant" and section.warmup_steps >= total_steps:
        raise ConfigError(f"optimizer.warmup_steps={section.warmup_steps}: must be < the {total_steps} total steps")
    lr, end = section.lr, section.lr * section.end_lr_ratio
    decay_steps = max(total_steps - section.warmup_steps, 1)
    if section.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif section.schedule == "linear":
        sched = optax.linear_schedule(lr, end, decay_steps)
    elif section.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps, alpha=section.end_lr_ratio)
    else:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, section.warmup_steps, total_steps, end_value=end)
    if section.schedule != "warmup_cosine" and section.warmup_steps:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, section.warmup_steps), sched],
                                     [section.warmup_steps])
    return sched


def learning_rate(schedule, step: int) -> float:
    """The learning rate ``schedule`` (:func:`build_schedule`) gave optimizer step ``step`` (1-based: the update
    that made the train state's step ``step``). optax's ``scale_by_learning_rate`` calls the schedule with the
    count of earlier updates, so this is ``schedule(step - 1)``."""
    return float(schedule(max(int(step) - 1, 0)))


def build_optimizer(section: OptimizerSection, total_steps: int):
    """The optax optimizer of ``section``: schedule (:func:`build_schedule`), optional global-norm clipping, then
    the update rule."""
    import optax

    sched = build_schedule(section, total_steps)
    if section.name == "adamw":
        opt = optax.adamw(sched, section.b1, section.b2, section.eps, weight_decay=section.weight_decay)
    elif section.name == "adam":
        opt = optax.adam(sched, section.b1, section.b2, section.eps)
    elif section.name == "lion":
        opt = optax.lion(sched, section.b1, section.b2, weight_decay=section.weight_decay)
    elif section.name == "adafactor":
        # optax.adafactor adds its weight decay after the lr scaling; decay lr-scaled (decoupled) like adamw
        opt = optax.chain(optax.adafactor(None), optax.scale(-1.0), optax.add_decayed_weights(section.weight_decay),
                          optax.scale_by_learning_rate(sched))
    else:
        opt = optax.sgd(sched, momentum=section.b1 or None)
    if section.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(section.grad_clip), opt)
    return opt
