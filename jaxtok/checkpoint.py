"""Checkpoints with orbax-checkpoint: parameters, optimizer state, data-iterator state, RNG and step.

Layout: ``<directory>/<step>/{params, train, data, meta}``. ``params`` and ``train`` (optimizer state, step, RNG)
are flat ``{dotted.path: array}`` dicts (``StandardSave``), so any pytree (nnx.State, optax namedtuples) round-trips
through its own treedef; ``data`` (the grain iterator's ``get_state()``) and ``meta`` (model config, counters) are
JSON.

Safety:
- atomic saves: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it only once every file is written, so
  an interrupted save leaves a temporary directory that is never listed as a step and never replaces the last
  good checkpoint (stale temporaries are removed on the next start);
- restores are checked: the stored array metadata is compared with the abstract target (names, shapes, dtypes)
  before any data is read, and an unreadable or truncated checkpoint raises :class:`CheckpointError` naming the
  directory and the problem;
- async saves run in the background; :meth:`Checkpointer.wait` / :meth:`Checkpointer.close` (also the context
  manager exit) block until they are committed;
- a save that cannot be written (full disk, read-only or vanished directory: an ``OSError``, whether raised at once
  or by the background save) is one :class:`CheckpointWriteError` naming the step, the directory, the reason and the
  last committed step, which stays intact;
- :meth:`Checkpointer.restore_good` (resume) falls back past damaged newer steps to the newest good one and moves
  the damaged ones aside into ``<directory>-damaged/`` (kept for inspection, out of the way of new saves).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "train", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model/optimizer."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. no space left on device); earlier committed checkpoints are intact."""


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError in ``e``'s cause/context chain (orbax re-raises background failures wrapped), else None; an
    error whose text says the disk is full counts as ENOSPC."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        if "No space left on device" in str(cur):
            return OSError(errno.ENOSPC, "No space left on device")
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def flatten(tree) -> tuple[dict[str, Any], Any]:
    """``({"a.b.0.c": leaf}, treedef)`` with dotted key paths (``jax.tree_util.keystr(simple=True)``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}
    if len(flat) != len(leaves):
        raise ValueError("pytree has colliding dotted key paths; cannot checkpoint it")
    return flat, treedef


def unflatten(treedef, flat: dict[str, Any], like) -> Any:
    """Inverse of :func:`flatten`, with the key order of the template ``like``."""
    keys, _ = flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


@jax.jit
def _fingerprints(flat: dict) -> dict:
    """Per-array uint32 fingerprint: position-weighted wrap-around sum of the raw bits (detects flipped bytes and
    swapped values that the storage layer would return silently)."""

    def one(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
        if width is None:
            raise ValueError(f"cannot fingerprint dtype {x.dtype}")
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return {k: one(v) for k, v in flat.items()}


def fingerprints(flat: dict[str, Any]) -> dict[str, int]:
    """Host ``{key: int}`` fingerprints of a flat dict of arrays (computed on device, globally)."""
    return {k: int(v) for k, v in jax.device_get(_fingerprints(flat)).items()}


def abstract_of(tree) -> Any:
    """``ShapeDtypeStruct`` (with the sharding, when the leaf has one) for every array leaf of ``tree``."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _remove_interrupted_saves(directory: Path) -> None:
    """Delete temporary step directories left by a process killed mid-save (never committed, never read).

    orbax's own ``cleanup_tmp_directories`` does this on a background thread; doing it here, synchronously and on
    process 0 only, means a fresh ``Checkpointer`` never races with it."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for tmp in directory.glob(f"*{_TMP_SUFFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


class Checkpointer:
    """Save and restore training checkpoints under ``directory`` (keeps the ``max_to_keep`` newest)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        _remove_interrupted_saves(self.directory)
        self._max_to_keep, self._async = max_to_keep, async_save
        self._pending: Optional[int] = None  # step of the save in flight
        self._failed = False  # a write error was reported: close() does not report it again
        self._mngr = self._manager()

    def _manager(self) -> "ocp.CheckpointManager":
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async,
        )
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _write_error(self, e: BaseException, step: Optional[int]) -> Optional[CheckpointWriteError]:
        """``e`` as a :class:`CheckpointWriteError` when it is an OS-level write failure, else None."""
        ose = _os_error(e)
        if ose is None:
            return None
        self._failed = True
        reason = ose.strerror or str(ose)
        if ose.errno is not None:
            reason += f" [{errno.errorcode.get(ose.errno, ose.errno)}]"
        good = sorted(int(p.name) for p in self.directory.glob("*") if p.name.isdigit() and p.is_dir()) \
            if self.directory.is_dir() else []
        kept = (f"the last good checkpoint, step {good[-1]}, is intact" if good
                else "no earlier checkpoint exists")
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointWriteError(f"could not write checkpoint {what} to {self.directory}: {reason}; {kept}")

    # ----------------------------------------------------------------------------------------------- queries
    def steps(self) -> list[int]:
        """Committed steps, oldest first (temporary directories of interrupted saves are not steps)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    # ----------------------------------------------------------------------------------------------- save
    def save(self, step: int, *, params, train=None, data: Optional[dict] = None, meta: Optional[dict] = None,
             force: bool = True) -> bool:
        """Start saving ``step`` (asynchronously by default). ``params``/``train`` are pytrees of arrays,
        ``data``/``meta`` JSON-serialisable dicts. Returns whether a save was started."""
        flat_params = flatten(params)[0]
        sums = {"params": fingerprints(flat_params)}
        items = {"params": ocp.args.StandardSave(flat_params)}
        if train is not None:
            flat_train = flatten(train)[0]
            sums["train"] = fingerprints(flat_train)
            items["train"] = ocp.args.StandardSave(flat_train)
        items["meta"] = ocp.args.JsonSave(_jsonable(dict(meta or {}, step=int(step), fingerprints=sums)))
        if data is not None:
            items["data"] = ocp.args.JsonSave(_jsonable(data))
        try:
            started = self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - orbax raises the previous background save's failure here too
            err = self._write_error(e, self._pending if self._pending is not None else int(step))
            if err is None:
                raise
            raise err from None
        self._pending = int(step)
        return started

    def wait(self) -> None:
        """Block until pending async saves are committed (:class:`CheckpointWriteError` if one failed to write)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            err = self._write_error(e, self._pending)
            if err is None:
                raise
            raise err from None
        finally:
            self._pending = None

    def close(self) -> None:
        """Wait for pending saves and release the manager. After a reported write error, nothing is raised again."""
        try:
            self.wait()
        except Exception:
            if not self._failed:
                raise
        finally:
            try:
                self._mngr.close()
            except Exception:
                if not self._failed:
                    raise

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- restore
    def _step_or_latest(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"checkpoint step {step} not found in {self.directory}; have {self.steps()}")
        return step

    def read_meta(self, step: Optional[int] = None) -> dict:
        """The JSON ``meta`` item of ``step`` (default: latest)."""
        step = self._step_or_latest(step)
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: unreadable meta item ({e})") from None

    def restore_good(self, *, params, train=None, data: bool = True) -> tuple[dict, list[tuple[int, str]]]:
        """Restore the newest committed step that passes :meth:`restore`'s checks, trying older steps when newer ones
        are damaged. Returns ``(result, skipped)`` with ``skipped = [(step, reason)]`` for the damaged newer steps,
        which are moved to ``<directory>-damaged/<step>`` so new saves of those steps are possible. Raises
        :class:`CheckpointError` naming every step's problem when none is good."""
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                out = self.restore(step, params=params, train=train, data=data)
            except CheckpointError as e:
                skipped.append((step, str(e)))
                continue
            if skipped:
                self._move_aside([s for s, _ in skipped])
            return out, skipped
        if not skipped:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        reasons = "; ".join(f"step {s}: {r}" for s, r in skipped[:3])
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({reasons})")

    def _move_aside(self, steps: list[int]) -> None:
        """Move damaged step directories out of the manager's directory (process 0; every process reloads)."""
        self._mngr.close()
        if jax.process_index() == 0:
            dest = self.directory.parent / f"{self.directory.name}-damaged"
            dest.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = dest / str(step)
                if target.exists():
                    target = dest / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxtok checkpoint: damaged steps moved aside")
        self._mngr = self._manager()

    def restore(self, step: Optional[int] = None, *, params, train=None, data: bool = True) -> dict:
        """Restore ``step`` (default: latest) into the structure, shapes, dtypes and shardings of the templates.

        ``params``/``train`` are pytrees of arrays or ``ShapeDtypeStruct`` (with ``sharding`` for sharded
        restores); ``train=None`` restores parameters only (``init_from``). Returns ``{"params", "train", "data",
        "meta", "step"}``. Raises :class:`CheckpointError` when the checkpoint is missing, unreadable, or its
        arrays differ from the templates in name, shape or dtype.
        """
        step = self._step_or_latest(step)
        where = self.directory / str(step)
        targets = {"params": params} if train is None else {"params": params, "train": train}
        try:
            stored = self._mngr.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
            raise CheckpointError(f"checkpoint {where} is unreadable ({_short(e)})") from None
        flats, treedefs = {}, {}
        for name, template in targets.items():
            flat, treedefs[name] = flatten(abstract_of(template))
            have = stored.get(name) if stored is not None else None
            if have is None:
                raise CheckpointError(f"checkpoint {where} has no readable {name!r} item (missing or damaged metadata)")
            check_compatible(flat, _flat_metadata(have), f"{where} [{name}]")
            flats[name] = flat
        args = {name: ocp.args.StandardRestore(flat) for name, flat in flats.items()}
        args["meta"] = ocp.args.JsonRestore()
        has_data = data and (where / "data").exists()
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} is corrupt or incomplete ({_short(e)})") from None
        result = {"step": step, "meta": out["meta"], "data": out["data"] if has_data else None}
        for name, template in targets.items():
            restored = out[name]
            missing = set(flats[name]) - set(restored)
            if missing:
                raise CheckpointError(f"checkpoint {where} [{name}] lacks {sorted(missing)[:5]}")
            expected_sums = out["meta"].get("fingerprints", {}).get(name)
            if expected_sums is not None:
                got = fingerprints({k: restored[k] for k in flats[name]})
                bad = sorted(k for k in got if expected_sums.get(k) != got[k])
                if bad:
                    raise CheckpointError(f"checkpoint {where} [{name}] is corrupt: stored data of {bad[:5]} "
                                          f"does not match the fingerprints written at save time")
            result[name] = jax.tree_util.tree_unflatten(treedefs[name], [restored[k] for k in flats[name]])
        result.setdefault("train", None)
        return result


def _short(e: Exception, limit: int = 300) -> str:
    """``Type: first line of the message`` cut to ``limit`` characters (tensorstore appends long specs)."""
    text = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _flat_metadata(tree) -> dict[str, Any]:
    """Orbax item metadata (nested or flat dict of array metadata) as ``{dotted key: metadata}``."""
    if hasattr(tree, "tree"):
        tree = tree.tree
    if isinstance(tree, dict) and all(not isinstance(v, dict) for v in tree.values()):
        return dict(tree)
    flat, _ = flatten(tree)
    return flat


def check_compatible(expected: dict[str, Any], stored: dict[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` listing every array whose name, shape or dtype differs."""
    problems = []
    for k in sorted(set(expected) - set(stored))[:5]:
        problems.append(f"missing {k}")
    for k in sorted(set(stored) - set(expected))[:5]:
        problems.append(f"unexpected {k}")
    for k in sorted(set(expected) & set(stored)):
        e, s = expected[k], stored[k]
        s_shape = tuple(getattr(s, "shape", ()) or ())
        if tuple(e.shape) != s_shape:
            problems.append(f"{k}: shape {s_shape} in checkpoint, {tuple(e.shape)} expected")
        elif getattr(s, "dtype", None) is not None and np.dtype(s.dtype) != np.dtype(e.dtype):
            problems.append(f"{k}: dtype {np.dtype(s.dtype)} in checkpoint, {np.dtype(e.dtype)} expected")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {where} does not match the model/optimizer: {shown}. A different model "
                              f"size or optimizer? Use a fresh run directory or matching settings.")


def _jsonable(x):
    """Convert numpy scalars/arrays (as found in iterator states) to plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("latin-1")
    return x
