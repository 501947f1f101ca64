"""Run directories that cannot be mixed up (no JAX): which config changes a resume accepts, the lock that keeps two
trainings out of one directory, and what "holds a run" and "finished" mean.

- :data:`RESUMABLE_KEYS` is the one allow-list of config keys that may differ between the run directory's stored
  ``config.yaml`` and the config of a resumed ``jaxtok train`` (:func:`check_resume`); any other difference is
  refused with the differing keys named.
- ``run.resume=false`` into a directory that holds a run (:func:`holds_run`) is refused unless
  ``run.overwrite=true``, which removes the earlier outputs first (:func:`check_fresh_start`).
- :func:`run_lock` writes ``<run_dir>/train.lock`` (owning PID, host, process start time) for as long as a
  training runs; a second training into the directory is refused naming the owner. A lock whose process is gone
  (same host; PID dead or reused by another process) is stale and taken over with a warning.
- :func:`finished`: the last committed checkpoint is at ``train.steps`` and ``summary.json`` exists; re-running
  such a run trains nothing and rewrites nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from jaxtok.registry import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints-damaged"  # damaged checkpoints moved aside by a resume (jaxtok.checkpoint)
LOCK_FILE = "train.lock"
# Outputs that make a directory "hold a run"; run.overwrite=true removes exactly these.
RUN_OUTPUTS = (CHECKPOINT_DIR, DAMAGED_DIR, "metrics.jsonl", "summary.json", "eval.json",
               "tensorboard", "profile", "wandb_run_id")  # the last three: jaxtok.observe's dashboards and traces

# The config keys a resumed training may change (dotted; ``section.*`` = the whole section): the step budget, the
# eval/log/checkpoint cadence, where outputs go, and the device mesh (checkpoints restore into any layout).
# Everything else (model, data, tokenizer, optimizer, objective, rollout, decode, seeds, ...) defines the run.
RESUMABLE_KEYS = (
    "train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_batches", "train.eval_at_start", "run.*", "mesh.*",
)


class RunDirLocked(ConfigError):
    """Another live process is training into the run directory."""


# ------------------------------------------------------------------------------------------------ state of a dir


def committed_steps(run_dir: str | Path) -> list[int]:
    """Steps of the committed checkpoints in ``<run_dir>/checkpoints`` (integer-named directories; orbax's
    temporary directories of interrupted saves are not steps), oldest first. Reads only directory names."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def holds_run(run_dir: str | Path) -> list[str]:
    """The names of the run outputs (:data:`RUN_OUTPUTS`) present in ``run_dir`` (empty: nothing to lose)."""
    run_dir = Path(run_dir)
    have = []
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if name == CHECKPOINT_DIR:
            if committed_steps(run_dir):
                have.append(name)
        elif p.exists():
            have.append(name)
    return have


def finished(run_dir: str | Path, steps: int) -> bool:
    """A finished run: its newest committed checkpoint is at ``steps`` and it wrote ``summary.json``."""
    done = committed_steps(run_dir)
    return bool(done) and done[-1] == steps and (Path(run_dir) / "summary.json").is_file()


def clear_run(run_dir: str | Path) -> list[str]:
    """Remove the run outputs (:data:`RUN_OUTPUTS`) of ``run_dir``; returns what was removed."""
    removed = []
    for name in RUN_OUTPUTS:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_fresh_start(cfg, run_dir: str | Path) -> None:
    """``run.resume=false``: a directory holding a run is refused (ConfigError) unless ``run.overwrite=true``,
    which removes its outputs. Does nothing with ``run.resume=true``."""
    if cfg.run.resume:
        return
    have = holds_run(run_dir)
    if not have:
        return
    if not cfg.run.overwrite:
        raise ConfigError(f"run.resume=false: run directory {str(run_dir)!r} already holds a run ({', '.join(have)}); "
                          f"set run.overwrite=true to replace it, run.resume=true to continue it, or choose another "
                          f"run.name")
    log.warning("run.overwrite=true: removing %s from %s", ", ".join(have), run_dir)
    clear_run(run_dir)


# ------------------------------------------------------------------------------------------------ config changes


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resumable(key: str) -> bool:
    """Whether dotted ``key`` may change when a run is resumed (:data:`RESUMABLE_KEYS`)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` of every leaf that differs and is not resumable (a key present on
    one side only counts as a difference; ``<missing>`` marks the absent side)."""
    a, b = _flatten(old), _flatten(new)
    missing = "<missing>"
    out = {}
    for key in sorted(set(a) | set(b)):
        if resumable(key):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out[key] = (va, vb)
    return out


def stored_config(run_dir: str | Path) -> Optional[dict]:
    """The run directory's ``config.yaml`` as a plain dict with every default filled in (None if there is none).
    A stored config the current schema cannot load is returned as written."""
    from jaxtok.config import load_config, read_yaml_file, to_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return to_dict(load_config(path))
    except ConfigError:
        raw = read_yaml_file(path, "stored config")
        return raw if isinstance(raw, dict) else {}


def check_resume(cfg, run_dir: str | Path) -> None:
    """A resumed training (``run.resume=true`` into a directory with a committed checkpoint) must have the stored
    ``config.yaml``'s settings except :data:`RESUMABLE_KEYS`; a difference is a ConfigError naming every differing
    key with its stored and new value. Also refuses ``train.steps`` below the last committed step."""
    from jaxtok.config import to_dict

    run_dir = Path(run_dir)
    steps = committed_steps(run_dir)
    if not cfg.run.resume or not steps:
        return
    if steps[-1] > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps}: run directory {str(run_dir)!r} is already at step "
                          f"{steps[-1]}; give train.steps >= {steps[-1]}, or run.resume=false run.overwrite=true to "
                          f"start over")
    old = stored_config(run_dir)
    if old is None:
        return
    diff = config_changes(old, to_dict(cfg))
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f"; ... ({len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ConfigError(f"run directory {str(run_dir)!r} holds a run with a different config ({shown}{more}); a "
                          f"resume may change only {list(RESUMABLE_KEYS)}: choose another run.name, or "
                          f"run.resume=false run.overwrite=true to replace the run")


# ------------------------------------------------------------------------------------------------ lock

_HELD: dict[str, int] = {}  # lock path -> depth (re-entrant within one process: the CLI and train() both lock)


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def _stale_reason(owner: dict) -> Optional[str]:
    """Why the lock of ``owner`` is stale (its process is gone), or None when it may be live."""
    if owner.get("host") != socket.gethostname():
        return None  # cannot check a process on another host
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "it names no process"
    if pid == os.getpid():
        return f"process {pid} is this process, which does not hold it (a PID reused after a restart)"
    if not _alive(pid):
        return f"process {pid} is gone"
    started = owner.get("start_time")
    now = _start_time(pid)
    if started is not None and now is not None and started != now:
        return f"process {pid} is gone (its PID now belongs to another process)"
    return None


def _read_owner(path: Path) -> Optional[dict]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def acquire(run_dir: str | Path) -> Path:
    """Take ``<run_dir>/train.lock`` for this process (re-entrant); raise :class:`RunDirLocked` naming the owner
    when another live process holds it. A stale lock is replaced with a warning."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    key = str(path.absolute())
    if key in _HELD:
        _HELD[key] += 1
        return path
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run directory {str(run_dir)!r} cannot be created: {e.strerror or e}") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner is None:  # being written right now, or garbage left by a crash
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10:
                    time.sleep(0.2)
                    continue
                reason = "it is unreadable"
            else:
                reason = _stale_reason(owner)
            if reason is None:
                raise RunDirLocked(f"run directory {str(run_dir)!r} is in use: process {owner.get('pid')} on "
                                   f"{owner.get('host')} has been training into it since {owner.get('started')} "
                                   f"(lock {path}); wait for it, or choose another run.name. If no such process "
                                   f"runs, delete the lock file")
            log.warning("taking over the stale lock %s: %s", path, reason)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as e:
            raise ConfigError(f"run directory {str(run_dir)!r}: cannot write the lock file ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD[key] = 1
        return path
    raise RunDirLocked(f"run directory {str(run_dir)!r}: could not take the lock {path} (another process keeps "
                       f"taking it)")


def release(run_dir: str | Path) -> None:
    """Give back one level of this process's lock; the file is removed when the outermost holder releases it."""
    path = Path(run_dir) / LOCK_FILE
    key = str(path.absolute())
    depth = _HELD.get(key, 0)
    if depth > 1:
        _HELD[key] = depth - 1
        return
    _HELD.pop(key, None)
    if depth == 1:
        owner = _read_owner(path)
        if owner is not None and owner.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block (``enabled=False``: no lock, e.g. on processes other
    than 0 of a multi-host run)."""
    if not enabled:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
