"""Checkpoint directory layout and JSON metadata, readable without importing JAX or orbax.

Shared by :mod:`jaxdiff.checkpoint` and the ``jaxdiff train`` command, which uses it to see that a
finished run has nothing left to do before it imports anything heavy.
"""

from __future__ import annotations

import json
import os

from jaxdiff._errors import JaxdiffError

__all__ = [
    "FORMAT_VERSION",
    "committed_steps",
    "read_metadata",
    "latest_readable",
    "check_fingerprint",
]

FORMAT_VERSION = 1


def committed_steps(directory: str) -> list[int]:
    """The committed step directories under ``directory``, ascending (orbax's temporary
    ``<step>.orbax-checkpoint-tmp`` directories excluded)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
            out.append(int(name))
    return sorted(out)


def read_metadata(directory: str, step: int) -> dict:
    """The JSON metadata of ``step``; raises ``OSError`` / ``ValueError`` if it is missing or
    does not describe that step."""
    path = os.path.join(directory, str(step), "meta", "metadata")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not jaxdiff checkpoint metadata (format {FORMAT_VERSION})")
    if meta.get("step") != step or "fingerprint" not in meta or "digest" not in meta:
        raise ValueError(f"{path}: metadata does not describe step {step}")
    return meta


def latest_readable(directory: str) -> tuple[int | None, dict | None]:
    """``(step, metadata)`` of the newest step whose metadata reads, or ``(None, None)``."""
    for s in reversed(committed_steps(directory)):
        try:
            return s, read_metadata(directory, s)
        except (OSError, ValueError):
            continue
    return None, None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _flat_config(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def check_fingerprint(saved: dict, expected: dict, where: str = "checkpoint") -> None:
    """Raise :class:`JaxdiffError` unless two :func:`fingerprint` results describe the same
    layout (and, when both carry one, the same config).

    The config is compared first (the message names the first differing key), then the leaves
    (the message names the first mismatching leaf path with its saved and expected shape and
    dtype)."""
    s_cfg, e_cfg = saved.get("config"), expected.get("config")
    if s_cfg is not None and e_cfg is not None and s_cfg != e_cfg:
        fs, fe = _flat_config(s_cfg), _flat_config(e_cfg)
        for k in sorted(set(fs) | set(fe)):
            if fs.get(k, "<absent>") != fe.get(k, "<absent>"):
                raise JaxdiffError(
                    f"{where} was written with a different config: {k} is "
                    f"{fs.get(k, '<absent>')!r} there, {fe.get(k, '<absent>')!r} now "
                    "(use another directory, or restore the original config)"
                )
    s_leaves, e_leaves = saved.get("leaves", []), expected.get("leaves", [])
    for i in range(max(len(s_leaves), len(e_leaves))):
        s = s_leaves[i] if i < len(s_leaves) else None
        e = e_leaves[i] if i < len(e_leaves) else None
        if s == e:
            continue
        desc = lambda v: "absent" if v is None else f"shape {tuple(v['shape'])} {v['dtype']}"  # noqa: E731
        path = (e or s)["path"] if (s is None or e is None or s["path"] == e["path"]) else None
        if path is None:
            raise JaxdiffError(
                f"{where} is from an incompatible model: leaf {i} is {s['path']} "
                f"({desc(s)}) in the checkpoint but {e['path']} ({desc(e)}) in the model"
            )
        raise JaxdiffError(
            f"{where} is from an incompatible model: leaf {path} has saved {desc(s)}, "
            f"expected {desc(e)}"
        )
