"""jaxtok.decode: jitted decode loops (autoregressive generation; speculative and diffusion decoding to come)."""

from .generate import generate
from .run import run_decode

__all__ = ["generate", "run_decode"]
