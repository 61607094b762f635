"""A run's checkpoints: sealed with checksums, the last two kept, a damaged one detected and skipped.

A checkpoint is a plain ``torch.save`` dictionary (read back with ``torch.load(weights_only=True)``,
so no pickled code is ever run) with two more entries:

* ``config_checksum``: SHA-256 of the run's config as saved in it, which ties the checkpoint to
  the settings it belongs to;
* ``checksum``: SHA-256 of everything else in it (every tensor's dtype, shape and bytes, every
  number, string and key), computed when saving and again when loading.

A flipped byte in a tensor, a truncated or empty file, or one that is not a checkpoint at all is
then detected and named instead of being trained on. Each save keeps the previous checkpoint as
``checkpoint.prev.pt``; a resumed run that finds the newest one damaged continues from the
previous one (one epoch earlier, so its figures are still those of the uninterrupted run), and
stops with :class:`CheckpointError` when no good one is left.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from dropkit.lab.atomic_files import temporary_name

__all__ = ["CHECKPOINT", "PREVIOUS", "CheckpointError", "checksum", "clear", "load", "load_latest", "save"]

#: the newest checkpoint of a run folder, and the one before it
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
#: the entries a sealed checkpoint adds to the saved state
SEALS = ("checksum", "config_checksum")


class CheckpointError(ValueError):
    """A checkpoint is damaged or unusable; the message names the file."""


def checksum(value: Any) -> str:
    """SHA-256 (hex) of a checkpoint's contents: nested dicts, lists and tuples of tensors, numbers,
    strings, bytes, booleans and None. Equal contents give equal sums whatever the dict order."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add an unambiguous encoding of ``value`` (a type tag, then its parts) to ``digest``."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, bool) or value is None:
        digest.update(f"B{value}".encode())
    elif isinstance(value, int):
        digest.update(f"I{value}.".encode())
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack(">d", value))
    elif isinstance(value, str):
        encoded = value.encode()
        digest.update(f"S{len(encoded)}.".encode() + encoded)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(f"Y{len(value)}.".encode() + bytes(value))
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def save(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Seal ``state`` (which must hold ``config``) with its checksums and write it as the folder's
    newest checkpoint, keeping the one it replaces as :data:`PREVIOUS`; returns the path written.

    The new file is complete before any rename, so a kill at any point leaves a good checkpoint:
    the new one, the old one, or (between the two renames) the old one under :data:`PREVIOUS`.
    """
    folder = Path(folder)
    sealed = {key: value for key, value in state.items() if key not in SEALS}
    sealed["config_checksum"] = checksum(sealed["config"])
    sealed["checksum"] = checksum(sealed)
    current, tmp = folder / CHECKPOINT, temporary_name(folder / CHECKPOINT)
    try:
        torch.save(sealed, tmp)
        if current.exists():
            os.replace(current, folder / PREVIOUS)
        os.replace(tmp, current)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return current


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read one checkpoint with ``torch.load(weights_only=True)`` and verify its checksums.

    A checkpoint without them (written before checkpoints were sealed) is returned with a warning.

    Raises:
        CheckpointError: the file cannot be read, is not a checkpoint, or its contents do not match
            its checksums; the message names the file.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch reports a damaged file as any of a dozen exception types)
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path}: damaged checkpoint: cannot be read ({reason})") from None
    if not isinstance(state, dict) or "config" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a dropkit checkpoint (no config and epoch in it)")
    if not all(key in state for key in SEALS):
        print(f"warning: {path} carries no checksum (written by an older dropkit); its contents are not "
              f"verified", file=sys.stderr)
        return state
    contents = {key: value for key, value in state.items() if key != "checksum"}
    if checksum(state["config"]) != state["config_checksum"]:
        raise CheckpointError(f"{path}: damaged checkpoint: its config does not match its config checksum")
    if checksum(contents) != state["checksum"]:
        raise CheckpointError(f"{path}: damaged checkpoint: its contents do not match its checksum")
    return {key: value for key, value in state.items() if key not in SEALS}


def load_latest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The newest good checkpoint of ``folder``: :data:`CHECKPOINT`, else :data:`PREVIOUS` (a damaged
    newer one is named on stderr); None when the folder holds neither.

    Raises:
        CheckpointError: every checkpoint in the folder is damaged; the message names each one.
    """
    folder = Path(folder)
    paths = [folder / name for name in (CHECKPOINT, PREVIOUS) if (folder / name).is_file()]
    problems = []
    for path in paths:
        try:
            state = load(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from {path} (epoch {state['epoch']}) instead",
                  file=sys.stderr)
        return state
    if problems:
        raise CheckpointError(f"no usable checkpoint in {folder}: {'; '.join(problems)} "
                              f"(remove them, or resume without --resume, to start afresh)")
    return None


def clear(folder: str | os.PathLike) -> None:
    """Remove the folder's checkpoints, so that a fresh run never falls back to another run's."""
    for name in (CHECKPOINT, PREVIOUS):
        Path(folder, name).unlink(missing_ok=True)
