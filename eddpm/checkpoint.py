"""Checkpoints: `checkpoint-<step>/` folders of safetensors and JSON only, written atomically, verified on resume.

A checkpoint holds the whole training state as nested dicts (UNet weights, optimizer, LR schedule, loss
scaler, EMA, keep probabilities and their optimizer, counters): every tensor goes to `<part>.safetensors`,
everything else to `state.json`, and `manifest.json` (each file's size and sha256) is written last. Nothing
is pickled, so a checkpoint received from someone else cannot run code when it is resumed; a pickle found in
a checkpoint folder is refused by name. The folder is written under a temporary name and renamed, so a kill
during a save leaves the previous checkpoint usable; `--resume_from_checkpoint latest` takes the newest
checkpoint whose manifest matches its files and says why it skipped any newer one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from eddpm.metadata import file_digest

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
MANIFEST = "manifest.json"
PLAIN_STATE = "state.json"
LOCK_FILE = ".train.lock"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the folder and the file."""


class OutputLock:
    """An exclusive lock on `<output_dir>/.train.lock` held while a run uses the folder, so that a second run on
    the same --output_dir stops at once instead of deleting the first one's temporary checkpoints. The
    operating system releases it when the process ends, even after a kill."""

    def __init__(self, output_dir: str):
        self.path, self._fh = os.path.join(output_dir, LOCK_FILE), None

    def acquire(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here, the folder is not guarded
            return self
        self._fh = open(self.path, "a")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            self._fh = None
            raise CheckpointError(f"another run is using {os.path.dirname(self.path)} (it holds {self.path}); "
                                  "wait for it to finish or choose another --output_dir") from None
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the lock
            self._fh = None


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders in `output_dir` that have a manifest, oldest first (no verification)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isfile(os.path.join(output_dir, name, MANIFEST))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_resume(output_dir: str, resume: str | None, say=print) -> str | None:
    """The checkpoint folder to resume from: None, 'latest' (the newest intact one; None if there is none
    yet) or a path (which must be intact). Skipped damaged checkpoints are reported through `say`."""
    if resume is None:
        return None
    if resume != "latest":
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume_from_checkpoint {resume!r} is not a folder")
        verify_checkpoint(resume)
        return resume
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            say(f"train.py: skipping damaged checkpoint: {err}")
    return None


def verify_checkpoint(folder: str) -> None:
    """Raise CheckpointError naming the first file that is missing, pickled, or differs from the manifest."""
    pickles = sorted(n for n in os.listdir(folder) if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(f"{folder}: holds pickled files {', '.join(pickles)}; this project never loads "
                              "pickles (they can run code). Remove them, or resume from a checkpoint this code wrote.")
    try:
        with open(os.path.join(folder, MANIFEST)) as fh:
            manifest = json.load(fh)
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:  # Recursion: nested brackets
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({err.__class__.__name__}: {err})") from None
    for name, (size, digest) in files.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise CheckpointError(f"{folder}: {name} is missing")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"{folder}: {name} has {os.path.getsize(path)} bytes, the manifest says {size}")
        if file_digest(path) != digest:
            raise CheckpointError(f"{folder}: {name} does not match its checksum (damaged)")


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None) -> str:
    """Write checkpoint-<step>/ atomically; returns its path. Every process calls it (the state is the same on
    every process, as the ranks train in lockstep); the main process writes. A full disk raises
    CheckpointError saying so, after removing the partial folder."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):  # leftovers of saves that were killed
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        try:
            write_state(tmp, state)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)  # the atomic step: the folder is complete or absent
            prune_checkpoints(output_dir, total_limit)
        except Exception as err:  # safetensors reports a full disk as SafetensorError
            shutil.rmtree(tmp, ignore_errors=True)
            error = err
    accelerator.wait_for_everyone()
    if error is not None:
        if _is_disk_full(error):
            raise CheckpointError(f"no space left on the device while writing {final}; the partial folder was "
                                  "removed. Free some space (or lower --checkpoints_total_limit) and resume.") from None
        raise error
    return final


def write_state(folder: str, state: dict) -> None:
    """state: {part: nested dicts/lists of tensors and JSON values}. One safetensors file per part that
    holds tensors, `state.json` for the rest, then `manifest.json`."""
    os.makedirs(folder, exist_ok=True)
    plain, files = {}, {}
    for part, value in state.items():
        tensors: dict[str, torch.Tensor] = {}
        plain[part] = _split(value, "", tensors)
        if tensors:
            name = f"{part}.safetensors"
            save_file(_unshared(tensors), os.path.join(folder, name))
            files[name] = None
    _write_json(os.path.join(folder, PLAIN_STATE), plain)
    files[PLAIN_STATE] = None
    entries = {name: [os.path.getsize(os.path.join(folder, name)), file_digest(os.path.join(folder, name))]
               for name in files}
    _write_json(os.path.join(folder, MANIFEST), {"files": entries})


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors for save_file, which refuses tensors that share memory: a tensor whose storage an earlier one
    already uses is copied. bitsandbytes' AdamW8bit gives every parameter's state the same two 1 KB
    quantisation maps; after a resume each parameter holds its own copy."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


def load_state(folder: str) -> dict:
    """The state `write_state` wrote (tensors on the CPU). Call `verify_checkpoint` first. A state.json that
    does not describe the tensors beside it (edited, or made by something else) is a CheckpointError."""
    try:
        with open(os.path.join(folder, PLAIN_STATE)) as fh:
            plain = json.load(fh)
        state = {}
        for part, value in plain.items():
            path = os.path.join(folder, f"{part}.safetensors")
            tensors = load_file(path) if os.path.isfile(path) else {}
            state[part] = _join(value, tensors)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"{folder}: {PLAIN_STATE} does not match the checkpoint's tensors "
                              f"({err.__class__.__name__}: {err})") from None
    return state


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    if total_limit is None or total_limit < 1:
        return
    for path in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(path, ignore_errors=True)


def _write_json(path: str, value) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


def _split(obj, prefix: str, tensors: dict):
    """Replace every tensor in nested dicts/lists by a reference into `tensors`; returns the plain copy."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        out = {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        out["__keys__"] = [[str(k), type(k).__name__] for k in obj]  # JSON keys are strings
        return out
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        keys = obj.get("__keys__")
        if keys is None:
            return {k: _join(v, tensors) for k, v in obj.items()}
        cast = {"int": int, "str": str}
        return {cast.get(kind, str)(k): _join(obj[k], tensors) for k, kind in keys}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj
