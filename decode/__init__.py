"""jaxtok.decode: jitted decode loops (autoregressive generation; speculative and diffusion decoding to come)."""

from .generate import generate

__all__ = ["generate"]
