"""Memory claims checked on the compiled programs (XLA's buffers and memory analysis), not assumed: the chunked
float32 losses never hold a [tokens, vocab] array, so their temporary memory follows the chunk size."""

import re

import numpy as np
import pytest
import optax
from flax import nnx

from jaxtok.models import Decoder, presets
from jaxtok.train.objectives.sft import SFTArgs, sft_loss
from jaxtok.train.step import init_train_state, make_train_step

V, B, T = 16384, 4, 256  # a [tokens, vocab] float32 array would be 64 MiB


def _compiled(chunk_size: int):
    model = Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(0))
    opt = optax.sgd(1e-3)
    _, state = init_train_state(model, opt)
    step = make_train_step(model, opt, lambda m, b, r: sft_loss(m, b, r, SFTArgs(chunk_size=chunk_size)))
    batch = {"tokens": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "valid": np.ones((B, T), bool), "loss_mask": np.ones((B, T), bool)}
    return step.lower(state, batch).compile()


def _vocab_rows(hlo: str) -> set[int]:
    """Leading sizes of every 2-D buffer with a vocabulary axis in the optimized HLO."""
    return {int(m) for m in re.findall(rf"\[(\d+),{V}\]", hlo)}


@pytest.mark.slow
def test_chunked_cross_entropy_never_holds_tokens_by_vocab():
    small, large = _compiled(64), _compiled(B * T)
    assert _vocab_rows(small.as_text()) <= {64, 48}  # [chunk, V] activations and the [D=48, V] head only
    assert B * (T - 1) in _vocab_rows(large.as_text())  # one chunk spanning all N = B(T-1) targets: [N, V]
    t_small = small.memory_analysis().temp_size_in_bytes
    t_large = large.memory_analysis().temp_size_in_bytes
    assert t_small < B * T * V * 4 / 2 < t_large, (t_small, t_large)
