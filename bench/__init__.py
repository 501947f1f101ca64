"""jaxtok.bench: every benchmark and report of ``jaxtok bench`` (the ``BENCHES`` registry), and their plots.

=====================  ================================================================================
``decode``             :mod:`jaxtok.bench.decode` — AR decode throughput against the device's bandwidth
``speculative``        :mod:`jaxtok.bench.speculative` — every speculative method against AR on one target
``length_control``     :mod:`jaxtok.bench.length` — what a trained LenVM does for its decoder
``diffusion``          :mod:`jaxtok.bench.diffusion` — commit policies: accuracy against NFE
``plan_conditioning``  :mod:`jaxtok.bench.plan_conditioning` — a diffusion LM with vs without an AR plan
``train``              :mod:`jaxtok.bench.train` — train-step throughput and MFU at several batch sizes
``sweep``              :mod:`jaxtok.bench.train` — training variants of one config side by side
``rl_compare``         :mod:`jaxtok.bench.rl_report` — RL loss modes trained from one student, as curves
=====================  ================================================================================

Plots live in :mod:`jaxtok.bench.plots`. This package sits above the others: it may import ``jaxtok``, ``models``,
``train`` and ``decode``; nothing but the command line imports it (``tests/test_layering.py``). Importing it registers
every bench.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from jaxtok.registry import BENCHES

from . import decode, diffusion, length, plan_conditioning, rl_report, speculative, train  # noqa: F401  (registration)


def run_bench(cfg, run_dir: str | Path) -> dict:
    """``jaxtok bench``: run the benchmark named ``bench.name`` with ``bench.args`` (a JAX profiler trace under
    ``<run_dir>/trace`` when ``bench.trace``) and print its ``results.md``."""
    import jax

    fn = BENCHES.get(cfg.bench.name, "bench.name")
    args = BENCHES.parse_args(cfg.bench.name, cfg.bench.args, "bench.args")
    trace = jax.profiler.trace(str(Path(run_dir) / "trace")) if cfg.bench.trace else contextlib.nullcontext()
    with trace:
        out = fn(cfg, run_dir, args)
    print(open(Path(run_dir) / "results.md").read())
    return out
