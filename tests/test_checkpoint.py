"""eddpm.checkpoint: safetensors + JSON state, the manifest, damaged and foreign checkpoints, the folder lock."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from eddpm import checkpoint as ckpt
from eddpm.policy import MaskPolicy


class MainProcess:
    """The two things save_checkpoint asks of an accelerate.Accelerator, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


def trained_state() -> dict:
    """A state like train.py's: a model, AdamW with int-keyed state and tuple betas, an LR schedule, a policy."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    policy = MaskPolicy(torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    draw = policy.draw(6, gen)
    policy.update(torch.rand(6, generator=gen, dtype=torch.float64), draw["masks"], 0.5, timesteps=draw["timesteps"])
    return {"unet": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
            "ema": {"decay": 0.999, "shadow_params": [p.detach().clone() for p in model.parameters()]},
            "policy": policy.state_dict(), "counters": {"global_step": 2, "nonfinite_total": 1}}


def assert_equal_nested(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            assert_equal_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{path}.{i}")
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def test_state_round_trips_exactly_without_pickles(tmp_path):
    state = trained_state()
    ckpt.write_state(str(tmp_path / "c"), state)
    names = sorted(os.listdir(tmp_path / "c"))
    # parts without tensors (the LR schedule, the counters) live in state.json alone
    assert names == ["ema.safetensors", "manifest.json", "optimizer.safetensors", "policy.safetensors",
                     "state.json", "unet.safetensors"], names
    ckpt.verify_checkpoint(str(tmp_path / "c"))
    loaded = ckpt.load_state(str(tmp_path / "c"))
    betas = state["optimizer"]["param_groups"][0].pop("betas")  # a tuple comes back as a list
    assert loaded["optimizer"]["param_groups"][0].pop("betas") == list(betas)
    assert_equal_nested(state, loaded)


def test_a_restored_policy_and_optimizer_take_the_same_next_step(tmp_path):
    policy = MaskPolicy(torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    for keep in (0.5, 0.3):
        draw = policy.draw(6, gen)
        policy.update(torch.rand(6, generator=gen, dtype=torch.float64), draw["masks"], keep, draw["timesteps"])
    ckpt.write_state(str(tmp_path), {"policy": policy.state_dict()})
    restored = MaskPolicy(torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))
    restored.load_state_dict(ckpt.load_state(str(tmp_path))["policy"])
    draw = policy.draw(6, gen)
    losses = torch.rand(6, generator=gen, dtype=torch.float64)
    policy.update(losses, draw["masks"], 0.2, draw["timesteps"])
    restored.update(losses, draw["masks"], 0.2, draw["timesteps"])
    assert torch.equal(restored.scores, policy.scores)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), "has {size} bytes, the manifest says"),
    (lambda f: f.unlink(), "is missing"),
    (lambda f: f.write_bytes(b""), "has 0 bytes"),
    (lambda f: f.write_bytes(bytes(len(f.read_bytes()))), "does not match its checksum"),
])
def test_a_damaged_file_is_named(tmp_path, damage, message):
    folder = tmp_path / "checkpoint-3"
    ckpt.write_state(str(folder), trained_state())
    target = folder / "optimizer.safetensors"
    size = target.stat().st_size
    damage(target)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors") as info:
        ckpt.verify_checkpoint(str(folder))
    assert message.format(size=size - 10) in str(info.value)


def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (2, 4, 6):
        ckpt.write_state(str(tmp_path / f"checkpoint-{step}"), {"counters": {"global_step": step}})
    (tmp_path / "checkpoint-6" / "state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "random_states_0.pkl").write_bytes(b"\x80\x04.")
    (tmp_path / "checkpoint-8").mkdir()  # no manifest: an interrupted save, ignored silently
    said = []
    assert ckpt.resolve_resume(str(tmp_path), "latest", say=said.append) == str(tmp_path / "checkpoint-2")
    assert len(said) == 2 and "checkpoint-6: state.json" in said[0] and "random_states_0.pkl" in said[1]
    with pytest.raises(ckpt.CheckpointError, match="random_states_0.pkl"):
        ckpt.resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-4"))
    assert ckpt.resolve_resume(str(tmp_path / "empty"), "latest") is None


def test_a_full_disk_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt.write_state(str(tmp_path / "checkpoint-1"), {"counters": {"global_step": 1}})
    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(ckpt.CheckpointError, match="no space left on the device while writing .*checkpoint-2"):
        ckpt.save_checkpoint(MainProcess(), str(tmp_path), 2, {"unet": {"w": torch.ones(3)}}, total_limit=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_save_checkpoint_prunes_and_replaces_atomically(tmp_path):
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(MainProcess(), str(tmp_path), step, {"counters": {"step": step}}, total_limit=2)
    assert path == str(tmp_path / "checkpoint-3")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    manifest = json.loads((tmp_path / "checkpoint-3" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.json"}


def test_the_output_lock_admits_one_run(tmp_path):
    first = ckpt.OutputLock(str(tmp_path)).acquire()
    with pytest.raises(ckpt.CheckpointError, match="another run is using"):
        ckpt.OutputLock(str(tmp_path)).acquire()
    first.release()
    ckpt.OutputLock(str(tmp_path)).acquire().release()  # free again


def test_8bit_adamw_state_with_shared_maps_saves_and_resumes_exactly(tmp_path):
    """bitsandbytes' AdamW8bit (the iclight preset's optimizer) gives every large tensor the same quantisation
    maps, which save_file refuses as shared memory; the checkpoint stores copies and resumes the same step."""
    bnb = pytest.importorskip("bitsandbytes")

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(80, 80), torch.nn.Linear(80, 80))  # 6400 >= 4096: 8-bit
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)

    def step(model, optimizer, seed):
        model(torch.randn(4, 80, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = model_and_optimizer()
    step(model, optimizer, 1)
    maps = {s["qmap1"].data_ptr() for s in optimizer.state.values() if "qmap1" in s}
    assert len(maps) == 1  # shared by both weight matrices
    ckpt.write_state(str(tmp_path), {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    ckpt.verify_checkpoint(str(tmp_path))
    restored_model, restored = model_and_optimizer()
    state = ckpt.load_state(str(tmp_path))
    restored_model.load_state_dict(state["model"])
    restored.load_state_dict(state["optimizer"])
    step(model, optimizer, 2)
    step(restored_model, restored, 2)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)
