"""Checkpoints: `checkpoint-<step>/` folders written atomically, pruned to a limit, found again for resume.

accelerate's `save_state` writes the model, optimizer, LR schedule, registered objects (the EMA) and RNG
states; this module adds the EDDPM state (keep probabilities, their optimiser, the mask/noise generator,
counters) as safetensors + JSON, and makes the whole folder appear at once: it is written under a
temporary name and renamed, so a kill during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
EDDPM_STATE = "eddpm_state"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders in `output_dir`, oldest first: temporary `.tmp-*` folders, and folders
    without the EDDPM state (written last, just before the rename), are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isfile(os.path.join(output_dir, name, f"{EDDPM_STATE}.json"))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint folder to resume from: None, 'latest' (None if there is none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a folder")
    return resume


def save_checkpoint(accelerator, output_dir: str, step: int, extra_state: dict, total_limit: int | None) -> str:
    """Write checkpoint-<step>/ atomically on every process's behalf; returns its path.

    Every process must call it: each writes its own RNG state into the temporary folder, and the main
    process renames the folder only once all of them are done.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")
    if accelerator.is_main_process:  # leftovers of saves that were killed
        for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # the other processes' random_states_<rank>.pkl are written
    if accelerator.is_main_process:
        save_extra_state(tmp, extra_state)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)  # the atomic step: the folder is complete or absent
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    if total_limit is None or total_limit < 1:
        return
    for path in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(path, ignore_errors=True)


def save_extra_state(folder: str, state: dict) -> None:
    """Tensors go to safetensors, everything else (numbers, lists, nested dicts of them) to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, "", tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, f"{EDDPM_STATE}.safetensors"))
    with open(os.path.join(folder, f"{EDDPM_STATE}.json"), "w") as fh:
        json.dump(plain, fh)


def load_extra_state(folder: str) -> dict:
    tensors = load_file(os.path.join(folder, f"{EDDPM_STATE}.safetensors"))
    with open(os.path.join(folder, f"{EDDPM_STATE}.json")) as fh:
        plain = json.load(fh)
    return _join(plain, tensors)


def _split(obj, prefix: str, tensors: dict):
    """Replace every tensor in a nested dict/list by a reference into `tensors`; returns the plain copy."""
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
