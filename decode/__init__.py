"""jaxtok.decode: jitted decode loops.

- :func:`generate` — autoregressive generation (prefill + one ``while_loop`` over the KV cache);
- :func:`speculative_generate` / :func:`ead_generate` — lossless speculative decoding with pluggable drafters
  (:class:`ModelDrafter`, :class:`NgramDrafter`, :class:`DeerDrafter`, :class:`RoutedDrafter` for TAPS) and
  draft-length policies (:mod:`jaxtok.decode.draft_policies`); EAD's lossy small/large switching;
- :mod:`jaxtok.decode.length_control` — LenVM length control: a logit guide for :func:`generate` (tilt, target
  length, budget) and the prompt-boundary length readout;
- :func:`diffusion_generate` — masked-diffusion sampling with pluggable commit policies
  (:mod:`jaxtok.decode.commit_policies`), returning per-row NFE and the commit trajectory;
- :func:`jaxtok.decode.evaluate.evaluate` — the one decode-and-score loop over a method's step (``jaxtok decode``,
  held-out eval in training, the benchmarks).

Importing this package registers every draft-length and commit policy and logit guide (``DRAFT_POLICIES``,
``COMMIT_POLICIES``, ``LOGIT_GUIDES``) and the decoding methods and drafters (``DECODE_METHODS``, ``DRAFTERS``).
"""

from . import commit_policies, draft_policies, length_control  # noqa: F401  (registration)
from .diffusion import DiffusionResult, diffusion_generate, trajectory_state
from .generate import generate
from .length_control import LengthGuide, predict_length
from .run import run_decode
from .speculative import (
    DeerDrafter, ModelDrafter, NgramDrafter, RoutedDrafter, ead_generate, speculative_generate,
)

__all__ = [
    "DeerDrafter", "DiffusionResult", "LengthGuide", "ModelDrafter", "NgramDrafter", "RoutedDrafter",
    "diffusion_generate", "ead_generate", "generate", "predict_length", "run_decode",
    "speculative_generate", "trajectory_state",
]
