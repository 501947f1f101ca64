"""Watching a training run: one metrics path, several sinks, and a profiler window.

The training loop hands every record (a logged step, an eval, a resume marker) to one :class:`Observer`, which
writes it to ``<run_dir>/metrics.jsonl`` (:class:`jaxtok.metrics.MetricsWriter`) and to the sinks the config
switches on:

- ``run.tensorboard: true``: TensorBoard event files under ``<run_dir>/tensorboard/`` (:class:`TensorBoardSink`,
  through ``tensorboardX``: ``pip install 'jaxtok[tensorboard]'``); ``tensorboard --logdir runs/`` shows them.
- ``run.wandb: {project: ...}``: Weights & Biases (:class:`WandbSink`; ``wandb`` is imported only then, and the
  config check refuses the key when it is not installed).

Scalars go to the sinks under their ``metrics.jsonl`` name, training values without a ``/`` grouped as
``train/<name>`` (``train/loss``, ``train/lr``, ``train/tokens_per_s``), ``eval/*`` and ``rollout/*`` as they are;
event records (``{"event": "resume"}``) and non-numbers stay in ``metrics.jsonl`` only.

``run.profile_steps: [first, last]`` (:class:`ProfileWindow`) captures a ``jax.profiler`` trace of those steps
into ``<run_dir>/profile/``. :func:`startup_summary` is the one start-up message the loop logs.

Nothing here imports the model, train or decode packages (jaxtok's layering); JAX only for the profiler.
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

from jaxtok.metrics import MetricsWriter

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run id, so a resumed training continues the same W&B run


class Sink(Protocol):
    """Where metric records go besides ``metrics.jsonl``."""

    def write(self, step: int, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numeric entries of a record as ``{tag: float}``: names without ``/`` as ``train/<name>``;
    event records, strings, bools and ``None`` are left out."""
    if "event" in values:
        return {}
    out = {}
    for k, v in values.items():
        if v is None or isinstance(v, (bool, str)):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        out[k if "/" in k else f"train/{k}"] = x
    return out


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``<run_dir>/tensorboard/`` (tensorboardX ``SummaryWriter``).
    ``purge_step=k`` (a run resumed from step ``k - 1``): TensorBoard drops the earlier files' events of steps
    ``>= k``, which the resumed run redoes, so each step shows once."""

    def __init__(self, run_dir: str | Path, purge_step: Optional[int] = None):
        SummaryWriter = _import_summary_writer()
        self.logdir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=30, purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        for tag, x in scalars(values).items():
            if math.isfinite(x):
                self._writer.add_scalar(tag, x, global_step=int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def _import_summary_writer():
    """``tensorboardX.SummaryWriter``, imported without PyTorch: tensorboardX's writer imports ``torch`` when it is
    installed (2 s and ~500 MB, only to accept torch tensors); jaxtok writes Python floats. A torch the process
    already imported is left alone."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # ``import torch`` raises ImportError while tensorboardX loads
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class WandbSink:
    """Scalars to a Weights & Biases run (``run.wandb``: project, entity, name, group, tags, notes, mode). The run
    id is kept in ``<run_dir>/wandb_run_id`` so a resumed training continues the same W&B run (W&B keeps the
    first record of a step: steps redone after a resume are not logged again)."""

    def __init__(self, run_dir: str | Path, settings: Mapping[str, Any], config: Optional[dict] = None):
        from jaxtok.config import ConfigError

        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"run.wandb: Weights & Biases logging needs the wandb package ({e}): pip install "
                              f"wandb, or remove run.wandb") from None
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        kwargs = {"name": run_dir.name, **dict(settings)}
        self._wandb = wandb
        self._run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), config=config, **kwargs)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        data = scalars(values)
        if data:
            self._run.log(data, step=int(step))

    def close(self) -> None:
        self._run.finish()


class Observer:
    """The loop's one metrics writer: ``write(step, values)`` appends to ``metrics.jsonl`` and feeds every sink.
    ``enabled=False`` (processes other than 0) writes nothing anywhere. A sink that fails while writing is
    closed and dropped with a warning; ``metrics.jsonl`` is always written."""

    def __init__(self, run_dir: str | Path, sinks: Sequence[Sink] = (), enabled: bool = True):
        self.jsonl = MetricsWriter(run_dir, enabled=enabled)
        self.sinks = list(sinks) if enabled else []
        self.enabled = enabled

    @property
    def path(self) -> Path:
        return self.jsonl.path

    def write(self, step: int, values: Mapping[str, Any], **extra: Any) -> Optional[dict]:
        record = self.jsonl.write(step, values, **extra)
        if record is not None:
            values = {k: v for k, v in record.items() if k not in ("step", "time")}
            for sink in list(self.sinks):
                try:
                    sink.write(step, values)
                except Exception as e:  # noqa: BLE001 - a dashboard must not stop the training
                    log.warning("metrics sink %s failed (%s: %s); it is switched off for this run",
                                type(sink).__name__, type(e).__name__, e)
                    self.sinks.remove(sink)
        return record

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing metrics sink %s failed: %s", type(sink).__name__, e)
        self.sinks = []

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_observer(cfg, run_dir: str | Path, *, enabled: bool = True, start: int = 0) -> Observer:
    """The :class:`Observer` of ``cfg.run``: ``metrics.jsonl`` plus TensorBoard (``run.tensorboard``) and W&B
    (``run.wandb``) when switched on; ``start``: the step a resumed run continues from."""
    sinks: list = []
    if enabled and cfg.run.tensorboard:
        sinks.append(TensorBoardSink(run_dir, purge_step=start + 1 if start else None))
        log.info("TensorBoard event files: %s (tensorboard --logdir %s)", Path(run_dir) / TENSORBOARD_DIR,
                 Path(run_dir).parent)
    if enabled and cfg.run.wandb:
        from jaxtok.config import to_dict

        sinks.append(WandbSink(run_dir, cfg.run.wandb, config=to_dict(cfg)))
    return Observer(run_dir, sinks, enabled=enabled)


class ProfileWindow:
    """``run.profile_steps: [first, last]``: a ``jax.profiler`` trace from before step ``first`` until step
    ``last`` has finished, into ``<run_dir>/profile/``. A resumed run past ``first`` starts at its first step;
    one past ``last`` traces nothing. ``close`` stops a trace still running (an error mid-window)."""

    def __init__(self, steps: Sequence[int], run_dir: str | Path, *, start: int = 0, enabled: bool = True):
        self.window = (int(steps[0]), int(steps[1])) if steps and enabled else None
        self.dir = Path(run_dir) / PROFILE_DIR
        self.begin = max(self.window[0], start + 1) if self.window else None
        self.active = False

    def before_step(self, step: int) -> None:
        if self.window is not None and step == self.begin and step <= self.window[1]:
            import jax

            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir))
            self.active = True
            log.info("profile: tracing steps %d..%d into %s", step, self.window[1], self.dir)

    def after_step(self, step: int, outputs: Any = None) -> None:
        if self.active and step >= self.window[1]:
            import jax

            jax.block_until_ready(outputs)
            self.close()
            log.info("profile: trace written to %s (tensorboard --logdir %s, or Perfetto)", self.dir, self.dir)

    def close(self) -> None:
        if self.active:
            import jax

            self.active = False
            jax.profiler.stop_trace()


def fmt_count(n: int) -> str:
    """``1234567`` -> ``"1.23M"``."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def fmt_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    s = int(round(max(seconds, 0.0)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def startup_summary(rows: Sequence[tuple[str, str]], title: str) -> str:
    """``title`` and aligned ``  label  text`` lines: the loop's one start-up message."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
