"""scripts/block_expand.py: function-preserving block expansion (LLaMA Pro) of a small Decoder."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import Decoder, presets

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("_block_expand", REPO / "scripts" / "block_expand.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_expansion_preserves_logits():
    be = _script()
    small = Decoder(presets.get("tiny_student", vocab_size=16, num_layers=2), rngs=nnx.Rngs(0))
    big = be.expand(small, 2)
    assert big.cfg.num_layers == 4
    # block 0 -> 0 (original), 1 (copy with zero o / down); block 1 -> 2, 3
    np.testing.assert_array_equal(np.asarray(big.layers[2].attn.q_weight_dhn[...]),
                                  np.asarray(small.layers[1].attn.q_weight_dhn[...]))
    assert not np.any(np.asarray(big.layers[1].attn.o_weight_hnd[...]))
    assert not np.any(np.asarray(big.layers[3].mlp.down_weight_fd[...]))
    assert np.any(np.asarray(big.layers[2].mlp.down_weight_fd[...]))
    toks = jax.random.randint(jax.random.key(1), (3, 9), 0, 16)
    np.testing.assert_allclose(np.asarray(big(toks).logits), np.asarray(small(toks).logits), atol=1e-5, rtol=0)
