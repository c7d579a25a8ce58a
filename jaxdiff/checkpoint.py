"""Preemption-safe training checkpoints on orbax-checkpoint.

:class:`CheckpointManager` keeps one directory per saved step under ``directory``::

    directory/
      40/                       # a complete step (renamed into place on commit)
        state/                  # the TrainState's leaves (orbax StandardSave, OCDBT)
        data/                   # optional user data_state pytree
        meta/metadata           # JSON: step, examples_seen, fingerprint, digest, config
      44.orbax-checkpoint-tmp/  # a save in progress (or killed): never read

One format, one API: :func:`save` / :func:`restore` (one-off saves, e.g. from a notebook; also
``jaxdiff.train.save_checkpoint`` / ``restore_checkpoint``), ``jaxdiff.train.train(...,
checkpoint_dir=...)``, the ``jaxdiff train`` command and :class:`CheckpointManager` all write
and read the layout above, so any of them reads what any other wrote.

Atomicity: orbax writes every step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only after every file is written and flushed (``AtomicRenameTemporaryPath``; saves are
synchronous here), so a process killed mid-save leaves only a temporary directory, which is
ignored (and replaced when that step is saved again). On top of that, the JSON metadata stores a
SHA-256 digest of every leaf's bytes: a step whose files were truncated, deleted or altered after
the commit fails verification on restore, and :meth:`CheckpointManager.restore` falls back to the
previous good step with a :class:`CheckpointWarning`.

The metadata also stores a *fingerprint* of the state (each leaf's path, shape and dtype) and an
optional user config dict: restoring into a state of a different model raises
:class:`~jaxdiff._checks.JaxdiffError` naming the first mismatching leaf, and nothing in the
directory is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np

from jaxdiff._checks import JaxdiffError, check_positive_int, fail
from jaxdiff._ckpt_meta import (
    FORMAT_VERSION,
    _jsonable,
    check_fingerprint,
    committed_steps,
    latest_readable,
    read_metadata,
)

__all__ = [
    "save",
    "restore",
    "CheckpointManager",
    "CheckpointWarning",
    "Restored",
    "fingerprint",
    "check_fingerprint",
]


class CheckpointWarning(UserWarning):
    """A checkpoint step was unreadable and an older one was used instead."""


# ------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------
def _flatten(tree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def _leaf_dtype(leaf) -> str:
    if isinstance(leaf, bool | int | float | complex):  # a Python scalar: JAX's default dtype
        return str(jax.dtypes.canonicalize_dtype(np.result_type(type(leaf))))
    return str(np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype))


def fingerprint(state, config: dict | None = None) -> dict:
    """A JSON-able description of a pytree's layout (and an optional config).

    Args:
      state: any pytree of arrays (a :class:`~jaxdiff.train.TrainState`: params, EMA params,
        optimizer state, step).
      config: an optional JSON-able dict (e.g. the run's model/optimizer settings).
    Returns:
      ``{"leaves": [{"path", "shape", "dtype"}, ...], "config": config}`` with the leaves in
      ``jax.tree_util`` flattening order and paths as ``jax.tree_util.keystr`` strings.
    """
    paths, leaves, _ = _flatten(state)
    out = [
        {"path": p, "shape": [int(d) for d in np.shape(x)], "dtype": _leaf_dtype(x)}
        for p, x in zip(paths, leaves, strict=True)
    ]
    return {"leaves": out, "config": None if config is None else _jsonable(config)}


def _host_tree(tree):
    """Every leaf as a numpy array (orbax stores arrays, not numpy/Python scalars)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _place(host, like):
    """``host`` on ``like``'s devices: its sharding when ``like`` is a committed jax.Array (e.g.
    replicated on a mesh), the default device (uncommitted, like a fresh ``init``, so jit's cache
    is shared with a fresh run) otherwise."""
    if isinstance(like, jax.Array):
        if getattr(like, "_committed", True):
            return jax.device_put(host, like.sharding)
        return jax.device_put(host)
    return host


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for x in leaves:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# the manager
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns.

    Attributes:
      state: the restored pytree, with the target's structure, dtypes and shardings.
      step: the step restored.
      examples_seen: training examples consumed up to ``step`` (as saved; may be None).
      data_state: the user data-pipeline pytree saved with the step (None if none was saved).
      metadata: the step's full JSON metadata.
    """

    state: Any
    step: int
    examples_seen: int | None
    data_state: Any
    metadata: dict


class CheckpointManager:
    """Save a training state every ``every`` steps, atomically, keeping the last ``keep``.

    Built on ``orbax.checkpoint.CheckpointManager`` (synchronous saves, atomic rename on
    commit). Each step holds the state's leaves, an optional ``data_state`` pytree (the position of
    an iterator-based input pipeline) and JSON metadata: ``step``, ``examples_seen``, the
    :func:`fingerprint` of the state (+ ``config``) and a SHA-256 digest of the leaves' bytes.

    Args:
      directory: where the step directories live (created on the first save).
      every: save period for :meth:`should_save` (``None``: only explicit/forced saves).
      keep: number of most recent steps kept (older ones are deleted after each save); None
        keeps every step.
      config: an optional JSON-able dict stored with every step and compared on restore/save
        (a different config raises :class:`JaxdiffError` naming the first differing key).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory, *, every: int | None = None, keep: int | None = 3, config=None):
        if not isinstance(directory, str | os.PathLike):
            fail("directory", directory, "a path (str or os.PathLike)")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = None if every is None else check_positive_int("every", every)
        self.keep = None if keep is None else check_positive_int("keep", keep)
        if config is not None and not isinstance(config, dict):
            fail("config", config, "a JSON-able dict or None")
        self.config = None if config is None else _jsonable(config)
        self._mngr = None
        self._verified = False

    # ---- orbax plumbing ----------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        if self._mngr is None:
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                enable_async_checkpointing=False,
                create=False,
                temporary_path_class=ocp.path.atomicity.AtomicRenameTemporaryPath,
            )
            self._mngr = ocp.CheckpointManager(
                self.directory, options=opts, item_names=("state", "data", "meta")
            )
        return self._mngr

    def close(self) -> None:
        """Release orbax's resources (idempotent)."""
        if self._mngr is not None:
            self._mngr.close()
            self._mngr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- queries -------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The committed step directories, ascending (temporary directories excluded; a
        committed step may still fail verification on restore)."""
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """The highest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True when ``every`` is set and ``step`` is a positive multiple of it."""
        return self.every is not None and step > 0 and step % self.every == 0

    def metadata(self, step: int) -> dict:
        """The JSON metadata of ``step``; raises if it is missing or unreadable."""
        return read_metadata(self.directory, step)

    def _latest_readable_meta(self):
        return latest_readable(self.directory)

    def check_compatible(self, state) -> None:
        """Raise :class:`JaxdiffError` if the newest readable step's fingerprint (or config)
        differs from ``state``'s. Reads only; never modifies the directory."""
        step, meta = self._latest_readable_meta()
        if meta is None:
            return
        check_fingerprint(
            meta["fingerprint"],
            fingerprint(state, self.config),
            where=f"checkpoint directory {self.directory} (step {step})",
        )

    # ---- save ----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state,
        *,
        examples_seen: int | None = None,
        data_state=None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as ``step`` if :meth:`should_save` (or ``force``); return whether saved.

        Before the first save, the directory's newest readable step is checked for
        compatibility (:meth:`check_compatible`): an incompatible directory raises and is left
        untouched. Committed steps ``>= step`` (from an abandoned or corrupt later run) are
        replaced. After the commit only the ``keep`` newest steps remain.

        Args:
          step: the step number (>= 0), the directory name.
          state: a pytree of arrays (host-fetched with ``jax.device_get``).
          examples_seen: training examples consumed so far (stored in the metadata).
          data_state: an optional pytree of arrays/scalars describing the input pipeline's
            position (restored by :meth:`restore`).
          force: save even when ``step`` is not a multiple of ``every``.
        """
        import orbax.checkpoint as ocp

        step = check_positive_int("step", int(step), minimum=0)
        if not (force or self.should_save(step)):
            return False
        if not self._verified:
            self.check_compatible(state)
            self._verified = True
        paths, leaves, _ = _flatten(state)
        host = [np.asarray(x) for x in jax.device_get(leaves)]
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "examples_seen": None if examples_seen is None else int(examples_seen),
            "fingerprint": fingerprint(state, self.config),
            "digest": _digest(host),
            "has_data_state": data_state is not None,
            "time": time.time(),
        }
        _ensure_writable(self.directory)
        mngr = self._manager()
        mngr.reload()
        for s in self.steps():
            if s >= step:  # a stale or corrupt later step: this run replaces it
                shutil.rmtree(os.path.join(self.directory, str(s)))
        mngr.reload()
        items = {
            "state": ocp.args.StandardSave({f"{i:06d}": a for i, a in enumerate(host)}),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_state is not None:
            items["data"] = ocp.args.StandardSave(_host_tree(data_state))
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
        return True

    # ---- restore -------------------------------------------------------------------------
    def _read_leaves(self, step: int, meta: dict, n: int, data_template):
        """``(host leaves, raw data_state)`` of ``step``, checked against the metadata digest."""
        import orbax.checkpoint as ocp

        mngr = self._manager()
        mngr.reload()
        items = {"state": ocp.args.StandardRestore()}
        if meta.get("has_data_state"):
            items["data"] = (
                ocp.args.StandardRestore()
                if data_template is None
                else ocp.args.StandardRestore(_host_tree(data_template))
            )
        raw = mngr.restore(step, args=ocp.args.Composite(**items))
        saved = raw["state"]
        keys = [f"{i:06d}" for i in range(n)]
        if not isinstance(saved, dict) or sorted(saved) != keys:
            raise ValueError(f"step {step}: the saved state does not hold {n} leaves")
        host = [np.asarray(saved[k]) for k in keys]
        if _digest(host) != meta["digest"]:
            raise ValueError(f"step {step}: the leaves' SHA-256 digest does not match the metadata")
        return host, (raw.get("data") if meta.get("has_data_state") else None)

    def _restore_step(self, step: int, target, data_template, expected: dict):
        meta = self.metadata(step)
        check_fingerprint(
            meta["fingerprint"],
            expected,
            where=f"checkpoint directory {self.directory} (step {step})",
        )
        host, data_state = self._read_leaves(step, meta, len(expected["leaves"]), data_template)
        _, t_leaves, treedef = _flatten(target)
        placed = [_place(h, t) for h, t in zip(host, t_leaves, strict=True)]
        return Restored(
            state=jax.tree_util.tree_unflatten(treedef, placed),
            step=step,
            examples_seen=meta.get("examples_seen"),
            data_state=data_state,
            metadata=meta,
        )

    def restore_raw(self, *, step: int | None = None) -> dict:
        """The saved leaves of the newest good step (or ``step``) without a target: nested dicts
        keyed by each leaf's path components (see :func:`restore`), digest-verified."""
        steps = self.steps()
        if not steps:
            fail("directory", self.directory, "a directory holding at least one checkpoint step")
        if step is not None and step not in steps:
            fail("step", step, f"one of the saved steps {steps}")
        bad = []
        for s in [step] if step is not None else list(reversed(steps)):
            try:
                meta = self.metadata(s)
                leaves_meta = meta["fingerprint"]["leaves"]
                host = self._read_leaves(s, meta, len(leaves_meta), None)[0]
            except Exception as e:  # noqa: BLE001 - corrupt/partial: fall back
                if step is not None:
                    raise JaxdiffError(
                        f"checkpoint step {s} in {self.directory} is unreadable: {e}"
                    ) from e
                bad.append((s, f"{type(e).__name__}: {e}"))
                continue
            if bad:
                self._warn_fallback(bad, s)
            return _nest([leaf["path"] for leaf in leaves_meta], host)
        listed = "; ".join(f"step {b} ({why[:200]})" for b, why in bad)
        raise JaxdiffError(f"no readable checkpoint in {self.directory}: {listed}")

    def _warn_fallback(self, bad, used: int) -> None:
        listed = "; ".join(f"step {b} ({why[:200]})" for b, why in bad)
        warnings.warn(
            f"checkpoint {listed} in {self.directory} is corrupt or incomplete; "
            f"restored step {used} instead",
            CheckpointWarning,
            stacklevel=3,
        )

    def restore(self, target, *, step: int | None = None, data_state=None) -> Restored:
        """Restore the newest good step (or ``step``) into ``target``'s structure.

        Steps are tried newest first. A step whose metadata is missing/unreadable, whose files
        cannot be read, or whose leaves fail the SHA-256 check is skipped with a
        :class:`CheckpointWarning` naming it and the step used instead.

        Args:
          target: a pytree with the expected structure, shapes and dtypes (e.g. a fresh
            ``TrainState``); restored leaves take its shardings.
          step: restore exactly this step (no fallback).
          data_state: a template pytree for the saved ``data_state`` (None: orbax's raw
            nested dicts).
        Returns:
          a :class:`Restored`.
        Raises:
          JaxdiffError: no committed step; none readable; the requested ``step`` is absent or
            unreadable; or the checkpoint is from an incompatible model/config (first
            mismatching leaf named; nothing is modified).
        """
        steps = self.steps()
        if not steps:
            fail("directory", self.directory, "a directory holding at least one checkpoint step")
        expected = fingerprint(target, self.config)
        if step is not None:
            if step not in steps:
                fail("step", step, f"one of the saved steps {steps}")
            try:
                return self._restore_step(step, target, data_state, expected)
            except JaxdiffError:
                raise
            except Exception as e:  # noqa: BLE001
                raise JaxdiffError(
                    f"checkpoint step {step} in {self.directory} is unreadable: {e}"
                ) from e
        bad = []
        for s in reversed(steps):
            try:
                out = self._restore_step(s, target, data_state, expected)
            except JaxdiffError:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt/partial: fall back
                bad.append((s, f"{type(e).__name__}: {e}"))
                continue
            if bad:
                self._warn_fallback(bad, s)
            return out
        listed = "; ".join(f"step {b} ({why[:200]})" for b, why in bad)
        raise JaxdiffError(f"no readable checkpoint in {self.directory}: {listed}")


def _ensure_writable(directory: str) -> None:
    """Create ``directory`` if needed; raise :class:`JaxdiffError` naming it when it cannot be
    created or written (before any checkpoint file is touched)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        fail("directory", directory, f"a directory that can be created ({e.strerror or e})")
    if not os.path.isdir(directory):
        fail("directory", directory, "a directory (a file of that name exists)")
    if not os.access(directory, os.W_OK | os.X_OK):
        fail("directory", directory, "a writable directory (permission denied)")


_PATH_TOKEN = re.compile(
    r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(?:'((?:[^'\\]|\\.)*)'|\"([^\"]*)\"|(-?\d+))\]"
)


def _parse_path(path: str) -> list:
    """The keys of a ``jax.tree_util.keystr`` path: ``.params['w'][0]`` -> ``['params', 'w', 0]``
    (attribute and dict keys as strings, sequence indices as ints)."""
    keys, pos = [], 0
    for m in _PATH_TOKEN.finditer(path):
        if m.start() != pos:
            return [path]
        attr, sq, dq, idx = m.groups()
        keys.append(int(idx) if idx is not None else (attr or sq or dq or ""))
        pos = m.end()
    return keys if pos == len(path) and keys else [path]


def _nest(paths, leaves) -> dict:
    """Nested dicts keyed by the path components of each leaf (a target-less restore)."""
    out: dict = {}
    for path, leaf in zip(paths, leaves, strict=True):
        keys = _parse_path(path)
        d = out
        for k in keys[:-1]:
            nxt = d.setdefault(k, {})
            if not isinstance(nxt, dict):  # a leaf and a subtree at one path: keep both flat
                d, keys = out, [path]
                break
            d = nxt
        d[keys[-1]] = leaf
    return out


# ------------------------------------------------------------------------------------------
# one-off save / restore
# ------------------------------------------------------------------------------------------
def save(
    directory,
    state,
    step: int | None = None,
    *,
    keep: int | None = None,
    examples_seen: int | None = None,
    data_state=None,
    config: dict | None = None,
) -> str:
    """Save a pytree (e.g. a ``TrainState``) as checkpoint ``step`` under ``directory``.

    The same layout, atomic commit, fingerprint and digest as :class:`CheckpointManager` (this is
    ``CheckpointManager(directory, keep=keep, config=config).save(step, state, force=True)``), so
    :func:`restore`, ``train(..., checkpoint_dir=directory)`` and ``jaxdiff sample`` read it.
    Committed steps ``>= step`` in the directory are replaced; a directory holding another
    model's checkpoints is refused before anything is written.

    Args:
      directory: where the step directories live (created if needed; must be writable).
      state: a pytree of arrays.
      step: the step number (default ``state.step``, or 0 for a state without one).
      keep: keep only the newest ``keep`` steps (default: all).
      examples_seen, data_state, config: stored with the step (see :class:`CheckpointManager`).
    Returns:
      the absolute path of ``directory``.
    Raises:
      JaxdiffError: a bad or unwritable ``directory``, a bad ``step``, or a directory written by
        a different model or config.
    """
    if step is None:
        step = getattr(state, "step", 0)
    if isinstance(step, jax.Array | np.ndarray | np.generic):
        if np.ndim(step) != 0 or not np.issubdtype(np.asarray(step).dtype, np.integer):
            fail("step", step, "an integer >= 0")
        step = int(np.asarray(step))
    step = check_positive_int("step", step, minimum=0)
    with CheckpointManager(directory, keep=keep, config=config) as m:
        m.save(step, state, examples_seen=examples_seen, data_state=data_state, force=True)
        return m.directory


def restore(directory, target=None, *, step: int | None = None, config: dict | None = None):
    """Restore a checkpoint written by :func:`save`, ``train(..., checkpoint_dir=...)``, the
    ``jaxdiff train`` command or :class:`CheckpointManager`.

    The newest good step is restored (a corrupt newest step falls back to the previous one with
    a :class:`CheckpointWarning`, as :meth:`CheckpointManager.restore`), or exactly ``step``.

    Args:
      directory: the checkpoint directory (for ``jaxdiff train``: ``<out_dir>/checkpoints``).
      target: a pytree with the saved structure, shapes and dtypes (e.g. ``train.init(params,
        optimizer)``); the result has its structure and its leaves' shardings. Without it, the
        saved leaves are returned as nested dicts keyed by their path components (e.g.
        ``restored["params"]["params"]["Dense_0"]["kernel"]``; sequence indices as ints).
      step: restore exactly this step (no fallback).
      config: the config dict the checkpoints were saved with, to compare (optional).
    Returns:
      the restored pytree (``CheckpointManager.restore`` also gives ``examples_seen`` and the
      ``data_state``).
    Raises:
      JaxdiffError: no checkpoint in ``directory``, an absent or unreadable ``step``, nothing
        readable, or a checkpoint from an incompatible model (the first mismatching leaf named).
    """
    with CheckpointManager(directory, keep=None, config=config) as m:
        if not os.path.isdir(m.directory):
            fail("directory", m.directory, "an existing checkpoint directory")
        if target is None:
            return m.restore_raw(step=step)
        return m.restore(target, step=step).state


def examples_seen(step: int, batch_size: int) -> int:
    """Examples consumed after ``step`` steps of ``batch_size`` (``step * batch_size``)."""
    return int(step) * int(batch_size)
