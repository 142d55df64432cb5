"""BriaRMBG: the background remover of briaai/RMBG-1.4, which IC-Light uses to matte the foreground.

RMBG-1.4 is BRIA AI's training of IS-Net (Qin et al., "Highly Accurate Dichotomous Image Segmentation",
ECCV 2022). IS-Net is a U^2-Net (Qin et al., Pattern Recognition 2020): a U-Net whose every stage is itself
a small U-Net with a residual connection, a "residual U-block" (RSU). This file is written from the
state-dict layout (key names and shapes) of the published weights, so that they load with strict=True.

Licence: this code is Apache-2.0 like the rest of the repository, but the RMBG-1.4 WEIGHTS are released by
BRIA AI under a NON-COMMERCIAL licence; commercial use needs an agreement with BRIA. BiRefNet (MIT) is the
usual commercial-safe alternative.

Shapes (B batch; any H, W: every 2x pool rounds up, and each upsampling is bilinear to the size of the map
it is concatenated with, so odd sizes work; k-th level below is H / 2**k rounded up):
    x                        [B, in_ch, H, W]        IC-Light feeds pixels / 127 - 1
    conv_in (stride 2)       [B, 64, H/2, W/2]
    encoder stage1..stage6   64, 128, 256, 512, 512, 512 channels at H/2 .. H/64
    decoder stage5d..stage1d 512, 256, 128, 64, 64 channels at H/32 .. H/2
    side_outputs             6 x [B, out_ch, H, W]   sigmoid probabilities, finest first: side_outputs[0]
                             comes from stage1d (H/2), the last one from stage6 (H/64)
    features                 outputs of [stage1d, stage2d, stage3d, stage4d, stage5d, stage6], finest first

Usage:
    net = BriaRMBG.from_pretrained("briaai/RMBG-1.4")  # reads config.json and model.safetensors, eval mode
    side_outputs, features = net(x)
    alpha = side_outputs[0]                            # [B, 1, H, W] in [0, 1]
"""

import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from torch import nn


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x max-pool that rounds the size up, so an odd last row or column is kept."""
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


def _upsample_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of `x` to the spatial size of `like` (align_corners=False, as upstream)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """ReLU(BatchNorm(3x3 conv)), optionally dilated, padded so that the spatial size is kept."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block RSU-L (U^2-Net, Fig. 2): out = U(h) + h with h = rebnconvin(x).

    U has `height` levels: rebnconv1 .. rebnconv{L} on the way down and rebnconv{L-1}d .. rebnconv1d on the
    way up; decoder unit i reads [deeper output, output of level i] concatenated along channels.

    - Plain RSU-L (L = 4..7): a 2x max-pool after levels 1 .. L-2; the bottom level L is a dilation-2 conv at
      the resolution of level L-1; going up, each deeper output is resized bilinearly to its skip.
    - dilated=True is RSU-4F, used where maps are already small: no pooling at all, dilations 1, 2, 4, 8 on
      the way down and the same dilations mirrored on the way up, so the resolution never changes.

    Shapes: [B, in_ch, h, w] -> [B, out_ch, h, w].
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False):
        super().__init__()
        self.height = height
        self.dilated = dilated
        # Dilation of levels 1..L; decoder unit i uses the dilation of level i.
        dilations = [2**i for i in range(height)] if dilated else [1] * (height - 1) + [2]

        self.rebnconvin = REBNCONV(in_ch, out_ch)
        for level in range(1, height + 1):
            level_in = out_ch if level == 1 else mid_ch
            self.add_module(f"rebnconv{level}", REBNCONV(level_in, mid_ch, dilations[level - 1]))
        for level in range(height - 1, 0, -1):
            level_out = out_ch if level == 1 else mid_ch
            self.add_module(f"rebnconv{level}d", REBNCONV(2 * mid_ch, level_out, dilations[level - 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.rebnconvin(x)  # [B, out_ch, h, w]
        skips = []  # outputs of levels 1 .. L-1, finest first
        hx = residual
        for level in range(1, self.height):
            hx = getattr(self, f"rebnconv{level}")(hx)
            skips.append(hx)
            if not self.dilated and level < self.height - 1:
                hx = _pool(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)  # bottom, same size as level L-1

        for level in range(self.height - 1, 0, -1):
            skip = skips[level - 1]
            if hx.shape[-2:] != skip.shape[-2:]:  # a same-size bilinear resize is the identity
                hx = _upsample_like(hx, skip)
            hx = getattr(self, f"rebnconv{level}d")(torch.cat([hx, skip], dim=1))  # [B, 2*mid, ...] in
        return hx + residual


class BriaRMBG(nn.Module, PyTorchModelHubMixin):
    """RMBG-1.4 / IS-Net: six RSU encoder stages, five RSU decoder stages, six sigmoid side outputs.

    `in_ch` and `out_ch` are the hub config (briaai/RMBG-1.4 stores {"in_ch": 3, "out_ch": 1}); build with
    `BriaRMBG(**config)`. `save_pretrained` writes config.json and model.safetensors; `from_pretrained`
    reads only safetensors and loads strictly unless told `strict=False`.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 1):
        super().__init__()
        # Channel counts (height, in, mid, out) read off rmbg14_state_dict.json. The stride-2 stem is not
        # followed by a pool: IS-Net's pool_in exists upstream but is unused (and has no weights).
        self.conv_in = nn.Conv2d(in_ch, 64, 3, stride=2, padding=1)
        self.stage1 = RSU(7, 64, 32, 64)
        self.stage2 = RSU(6, 64, 32, 128)
        self.stage3 = RSU(5, 128, 64, 256)
        self.stage4 = RSU(4, 256, 128, 512)
        self.stage5 = RSU(4, 512, 256, 512, dilated=True)
        self.stage6 = RSU(4, 512, 256, 512, dilated=True)
        # Each decoder stage reads [upsampled deeper output, encoder output], hence the summed input widths.
        self.stage5d = RSU(4, 1024, 256, 512, dilated=True)
        self.stage4d = RSU(4, 1024, 128, 256)
        self.stage3d = RSU(5, 512, 64, 128)
        self.stage2d = RSU(6, 256, 32, 64)
        self.stage1d = RSU(7, 128, 16, 64)
        # One mask logit per decoder output; side6 reads the bottleneck stage6 directly.
        self.side1 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side2 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side3 = nn.Conv2d(128, out_ch, 3, padding=1)
        self.side4 = nn.Conv2d(256, out_ch, 3, padding=1)
        self.side5 = nn.Conv2d(512, out_ch, 3, padding=1)
        self.side6 = nn.Conv2d(512, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """x [B, in_ch, H, W] -> (6 side outputs [B, out_ch, H, W] in [0, 1], 6 features), finest first."""
        encoder = [self.stage1, self.stage2, self.stage3, self.stage4, self.stage5, self.stage6]
        decoder = [self.stage5d, self.stage4d, self.stage3d, self.stage2d, self.stage1d]
        sides = [self.side1, self.side2, self.side3, self.side4, self.side5, self.side6]

        hx = self.conv_in(x)  # [B, 64, H/2, W/2]
        skips = []  # stage k output at H / 2**k
        for k, stage in enumerate(encoder, start=1):
            if k > 1:
                hx = _pool(hx)
            hx = stage(hx)
            skips.append(hx)

        features = [hx]  # coarsest first while decoding: stage6, stage5d, ..., stage1d
        for stage, skip in zip(decoder, reversed(skips[:-1])):
            hx = stage(torch.cat([_upsample_like(hx, skip), skip], dim=1))
            features.append(hx)
        features.reverse()  # finest first: [stage1d, stage2d, stage3d, stage4d, stage5d, stage6]

        # Resize the logits, then the sigmoid, as upstream does.
        side_outputs = [torch.sigmoid(_upsample_like(side(f), x)) for side, f in zip(sides, features)]
        return side_outputs, features

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> "BriaRMBG":
        """Called by `from_pretrained`: build from the config, load model.safetensors, move, eval mode."""
        model = cls(**model_kwargs)
        weights_file = _safetensors_file(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        # load_state_dict(strict=True) names every missing or unexpected key and every shape mismatch.
        model.load_state_dict(safetensors.torch.load_file(weights_file), strict=strict)
        return model.to(map_location).eval()


def _safetensors_file(model_id: str, **hub_kwargs) -> str:
    """Path of model.safetensors in a local folder or a hub repo; refuses pickled checkpoints."""
    filename = constants.SAFETENSORS_SINGLE_FILE
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if path.is_file():
            return str(path)
        raise FileNotFoundError(_no_safetensors_message(model_id))
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except RemoteEntryNotFoundError as err:
        raise FileNotFoundError(_no_safetensors_message(model_id)) from err


def _no_safetensors_message(model_id: str) -> str:
    return (
        f"{model_id} has no {constants.SAFETENSORS_SINGLE_FILE}. BriaRMBG loads safetensors only and never "
        f"unpickles {constants.PYTORCH_WEIGHTS_NAME} or .pth files (unpickling can run arbitrary code). "
        'Convert a checkpoint you trust once, for example: python -c "import torch, safetensors.torch as st; '
        "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\""
    )
