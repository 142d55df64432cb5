"""BriaRMBG: the exact RMBG-1.4 state-dict layout, the forward wiring against an independent recursive
reference, side-output order (finest first), any input size, and the hub save/load round trip."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from eddpm.briarmbg import RSU, BriaRMBG

NUM_TENSORS = 798
NUM_ELEMENTS = 44_075_702
# sha256 of "\n".join(f"{key} {shape}") over the sorted keys of rmbg14_state_dict.json (shape as a JSON
# list), so the layout is pinned even where that file is not available.
LAYOUT_SHA256 = "8773b40fd3f99ed98c8b617a40bfd2a01077fe4d96d893ca57d7c607b3798aa6"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The real RMBG-1.4 checkpoint's keys and shapes (docs/iclight-facts.md, "Models and files").
LAYOUT_JSON = REPO_ROOT / "tests" / "data" / "rmbg14_state_dict.json"

# Independent description of IS-Net, used to re-derive the layout and the forward pass:
# stage -> (RSU height, in, mid, out, dilated), as listed in U^2-Net / IS-Net.
STAGES = {
    "stage1": (7, 64, 32, 64, False),
    "stage2": (6, 64, 32, 128, False),
    "stage3": (5, 128, 64, 256, False),
    "stage4": (4, 256, 128, 512, False),
    "stage5": (4, 512, 256, 512, True),
    "stage6": (4, 512, 256, 512, True),
    "stage5d": (4, 1024, 256, 512, True),
    "stage4d": (4, 1024, 128, 256, False),
    "stage3d": (5, 512, 64, 128, False),
    "stage2d": (6, 256, 32, 64, False),
    "stage1d": (7, 128, 16, 64, False),
}
SIDE_IN_CHANNELS = [64, 64, 128, 256, 512, 512]  # side1 .. side6


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def net():
    """Eval-mode BriaRMBG with non-trivial batch-norm statistics (so BN is not the identity); read only."""
    torch.manual_seed(0)
    model = BriaRMBG().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=generator))
                module.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def layout(state_dict) -> dict[str, list[int]]:
    return {key: list(tensor.shape) for key, tensor in state_dict.items()}


def layout_difference(got: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = [
        f"{k}: got {got[k]}, expected {expected[k]}"
        for k in sorted(set(got) & set(expected))
        if got[k] != expected[k]
    ]
    return f"missing {missing[:20]} ({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)}), wrong shape {wrong_shape[:20]} ({len(wrong_shape)})"


def expected_layout() -> dict[str, list[int]]:
    """Key -> shape re-derived from the STAGES table (not from eddpm/briarmbg.py)."""
    shapes = {"conv_in.weight": [64, 3, 3, 3], "conv_in.bias": [64]}

    def rebnconv(prefix, c_in, c_out):
        shapes[f"{prefix}.conv_s1.weight"] = [c_out, c_in, 3, 3]
        for name in ("conv_s1.bias", "bn_s1.weight", "bn_s1.bias", "bn_s1.running_mean", "bn_s1.running_var"):
            shapes[f"{prefix}.{name}"] = [c_out]
        shapes[f"{prefix}.bn_s1.num_batches_tracked"] = []

    for stage, (height, c_in, mid, out, _) in STAGES.items():
        rebnconv(f"{stage}.rebnconvin", c_in, out)
        for level in range(1, height + 1):
            rebnconv(f"{stage}.rebnconv{level}", out if level == 1 else mid, mid)
        for level in range(1, height):
            rebnconv(f"{stage}.rebnconv{level}d", 2 * mid, out if level == 1 else mid)
    for i, channels in enumerate(SIDE_IN_CHANNELS, start=1):
        shapes[f"side{i}.weight"] = [1, channels, 3, 3]
        shapes[f"side{i}.bias"] = [1]
    return shapes


def layout_sha256(shapes: dict) -> str:
    listing = "\n".join(f"{key} {list(shape)}" for key, shape in sorted(shapes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def test_state_dict_layout_matches_rmbg14(net):
    got = layout(net.state_dict())
    expected = expected_layout()
    assert got == expected, layout_difference(got, expected)
    assert len(got) == NUM_TENSORS
    assert sum(math.prod(shape) for shape in got.values()) == NUM_ELEMENTS
    assert layout_sha256(got) == LAYOUT_SHA256


def test_state_dict_layout_matches_reference_json(net):
    reference = json.loads(LAYOUT_JSON.read_text())
    expected = reference["state_dict_shapes"]
    got = layout(net.state_dict())
    assert got == expected, layout_difference(got, expected)
    assert reference["num_tensors"] == len(got) == NUM_TENSORS
    assert reference["num_elements"] == sum(t.numel() for t in net.state_dict().values()) == NUM_ELEMENTS
    assert layout_sha256(expected) == LAYOUT_SHA256


def random_state_dict(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.tensor(7)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in shapes.items()
    }


def test_strict_load_of_a_state_dict_with_the_rmbg14_shapes():
    state_dict = random_state_dict(expected_layout(), seed=0)
    model = BriaRMBG()
    model.load_state_dict(state_dict, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())

    del state_dict["stage3d.rebnconv2d.bn_s1.running_var"]
    with pytest.raises(RuntimeError, match="stage3d.rebnconv2d.bn_s1.running_var"):
        model.load_state_dict(state_dict, strict=True)


# --- Independent reference forward: the RSU written recursively (level i wraps level i+1), with dilations,
# pooling and upsampling taken from the paper's description rather than from eddpm/briarmbg.py.


def ref_rebnconv(unit, x, dilation):
    bn = unit.bn_s1
    h = F.conv2d(x, unit.conv_s1.weight, unit.conv_s1.bias, padding=dilation, dilation=dilation)
    return F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def ref_resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def ref_rsu(block, x, height, dilated):
    def dilation(level):
        return 2 ** (level - 1) if dilated else (2 if level == height else 1)

    def u(h, level):  # level `level` and everything below it
        hx = ref_rebnconv(getattr(block, f"rebnconv{level}"), h, dilation(level))
        if level == height - 1:
            inner = ref_rebnconv(getattr(block, f"rebnconv{height}"), hx, dilation(height))
        elif dilated:
            inner = u(hx, level + 1)
        else:
            pooled = F.max_pool2d(hx, 2, 2, ceil_mode=True)
            inner = ref_resize(u(pooled, level + 1), hx.shape[-2:])
        return ref_rebnconv(getattr(block, f"rebnconv{level}d"), torch.cat([inner, hx], 1), dilation(level))

    h = ref_rebnconv(block.rebnconvin, x, 1)
    return u(h, 1) + h


def ref_forward(model, x):
    def stage(name, h):
        height, _, _, _, dilated = STAGES[name]
        return ref_rsu(getattr(model, name), h, height, dilated)

    h = F.conv2d(x, model.conv_in.weight, model.conv_in.bias, stride=2, padding=1)
    encoded = []
    for k in range(1, 7):
        h = stage(f"stage{k}", h if k == 1 else F.max_pool2d(h, 2, 2, ceil_mode=True))
        encoded.append(h)
    decoded = {6: encoded[5]}
    for k in range(5, 0, -1):
        up = ref_resize(decoded[k + 1], encoded[k - 1].shape[-2:])
        decoded[k] = stage(f"stage{k}d", torch.cat([up, encoded[k - 1]], 1))
    logits = [getattr(model, f"side{k}")(decoded[k]) for k in range(1, 7)]
    return [torch.sigmoid(ref_resize(d, x.shape[-2:])) for d in logits], [decoded[k] for k in range(1, 7)]


@pytest.mark.parametrize("height, width", [(64, 64), (96, 64)])
def test_forward_matches_recursive_reference(net, height, width):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
    with torch.no_grad():
        side_outputs, features = net(x)
        ref_sides, ref_features = ref_forward(net, x)
    assert len(side_outputs) == len(features) == 6
    for i, (got, ref) in enumerate(zip(side_outputs + features, ref_sides + ref_features)):
        assert got.shape == ref.shape, (i, got.shape, ref.shape)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("height, width", [(64, 64), (96, 64)])
def test_side_outputs_are_probabilities_at_input_size_finest_first(net, height, width):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [
        net.stage1d.register_forward_hook(lambda m, i, o: seen.__setitem__("stage1d", o)),
        net.side1.register_forward_hook(lambda m, i, o: seen.__setitem__("side1", (i[0], o))),
    ]
    try:
        with torch.no_grad():
            side_outputs, features = net(x)
    finally:
        for hook in hooks:
            hook.remove()

    for i, side in enumerate(side_outputs):
        assert side.shape == (2, 1, height, width), (i, side.shape)
        assert 0.0 <= side.min() and side.max() <= 1.0, (i, side.min().item(), side.max().item())
    # Feature k (1-based) is at H / 2**k rounded up: finest first, and side k reads feature k.
    for k, (feature, channels) in enumerate(zip(features, SIDE_IN_CHANNELS), start=1):
        expected = (2, channels, math.ceil(height / 2**k), math.ceil(width / 2**k))
        assert tuple(feature.shape) == expected, (k, tuple(feature.shape), expected)
    # The first side output comes from the top decoder stage (stage1d) through side1.
    side1_input, side1_logit = seen["side1"]
    assert side1_input is seen["stage1d"] and features[0] is seen["stage1d"]
    torch.testing.assert_close(side_outputs[0], torch.sigmoid(ref_resize(side1_logit, (height, width))))
    assert not torch.allclose(side_outputs[0], side_outputs[-1])


@settings(max_examples=6, deadline=None)
@given(height=st.integers(1, 80), width=st.integers(1, 80))
def test_any_input_size(net, height, width):
    with torch.no_grad():
        side_outputs, features = net(torch.zeros(1, 3, height, width))
    assert all(side.shape == (1, 1, height, width) for side in side_outputs)
    assert features[-1].shape[-2:] == (math.ceil(height / 64), math.ceil(width / 64))


def test_rsu_keeps_size_and_maps_channels():
    block = RSU(5, 8, 4, 6).eval()
    assert block(torch.randn(1, 8, 13, 7)).shape == (1, 6, 13, 7)
    dilated = RSU(4, 8, 4, 6, dilated=True).eval()
    assert [getattr(dilated, f"rebnconv{i}").conv_s1.dilation for i in (1, 2, 3, 4)] == [
        (1, 1),
        (2, 2),
        (4, 4),
        (8, 8),
    ]
    assert dilated(torch.randn(1, 8, 5, 3)).shape == (1, 6, 5, 3)


def test_save_pretrained_from_pretrained_round_trip(net, tmp_path):
    net.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"in_ch": 3, "out_ch": 1}
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()

    loaded = BriaRMBG.from_pretrained(tmp_path)
    assert not loaded.training
    expected, got = net.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [
        k for k in expected if not torch.equal(expected[k], got[k])
    ][:10]

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (sides, features), (loaded_sides, loaded_features) = net(x), loaded(x)
    for i, (a, b) in enumerate(zip(sides + features, loaded_sides + loaded_features)):
        assert torch.equal(a, b), f"output {i} differs by {(a - b).abs().max().item()}"


def test_from_pretrained_config_sets_channels(tmp_path):
    BriaRMBG(in_ch=4, out_ch=2).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"in_ch": 4, "out_ch": 2}
    loaded = BriaRMBG.from_pretrained(tmp_path)
    assert loaded.conv_in.weight.shape == (64, 4, 3, 3) and loaded.side6.weight.shape == (2, 512, 3, 3)


def test_from_pretrained_is_strict_by_default(net, tmp_path):
    state_dict = {k: v.contiguous() for k, v in net.state_dict().items() if k != "side3.bias"}
    save_file(state_dict, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"in_ch": 3, "out_ch": 1}))
    with pytest.raises(RuntimeError, match="side3.bias"):
        BriaRMBG.from_pretrained(tmp_path)
    assert BriaRMBG.from_pretrained(tmp_path, strict=False).side3.bias.shape == (1,)


def test_from_pretrained_refuses_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"in_ch": 3, "out_ch": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        BriaRMBG.from_pretrained(tmp_path)


def test_top_level_briarmbg_re_exports_the_package_class():
    """`from briarmbg import BriaRMBG` keeps working for users; it is the package's class, not a copy."""
    import briarmbg

    assert briarmbg.BriaRMBG is BriaRMBG and briarmbg.__all__ == ["BriaRMBG"]


def test_no_package_module_imports_the_top_level_briarmbg():
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "eddpm").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno}" for name in names if name == "briarmbg"]
    assert not offenders, f"eddpm/ must import eddpm.briarmbg, not the top-level re-export: {offenders}"
