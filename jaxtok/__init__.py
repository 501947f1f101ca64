"""jaxtok: token-level post-training and decoding of language models in JAX/Flax NNX.

Subpackages: ``jaxtok.models`` (NNX decoder family), ``jaxtok.train`` (train step, objectives, loop),
``jaxtok.decode`` (jitted AR, speculative and diffusion decoding). The modules directly under ``jaxtok``
hold the token algebra (pure array functions) and the plumbing (config, mesh, data, checkpoints, CLI).
"""

__version__ = "0.1.0"
