"""MIMO-UNet: multi-input multi-output U-Net for single image deblurring.

Paper: Cho, Ji, Hong, Jung, Ko, "Rethinking Coarse-to-Fine Approach in Single Image
Deblurring", ICCV 2021 (arXiv:2108.05054). Upstream code and released weights:
https://github.com/chosj95/MIMO-UNet (MIT licence). Written here from the paper and that code;
module and parameter names follow upstream exactly (``Encoder.0.layers.0.main.0.main.0.weight``
…) so its checkpoints (MIMO-UNet.pkl, MIMO-UNetPlus.pkl, the RealBlur MIMO-UNet+) load with
``strict=True``.

Shape of the network (paper Fig. 3), three scales s1 (full), s2 (1/2), s3 (1/4):

    input x ──────────────────────────────────────────────────────────────────────┐
      │ feat_extract[0]  Encoder[0] (EB1) ─ res1 ─┐                                  │
      │ feat_extract[1]↓ FAM2(·, SCM2(x/2)) EB2 ─ res2 ─┐  AFFs: fuse res1,res2,z     │
      │ feat_extract[2]↓ FAM1(·, SCM1(x/4)) EB3 ─ z ────┘  at scales 1 and 2         │
      │ Decoder[0] (DB3) → ConvsOut[0] + x/4  = out[0]  (1/4 scale)                  │
      │ feat_extract[3]↑ ⊕ AFF2 → Convs[0] → DB2 → ConvsOut[1] + x/2 = out[1]        │
      └ feat_extract[4]↑ ⊕ AFF1 → Convs[1] → DB1 → feat_extract[5] + x = out[2] ◄────┘

The full-resolution ``out[2]`` is the deblurred image. Inputs are RGB in [0, 1], no
normalisation; H and W must be multiples of 4 (two stride-2 stages). MIMO-UNet+ is the same
network with 20 residual blocks per stage instead of 8 and channel dropout after the AFFs
(inactive in ``eval()``). MIMO-UNet++ is MIMO-UNet+ with a geometric self-ensemble at test time
(see ``SelfEnsemble``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = 32  # fixed in the paper; every released checkpoint uses it


@dataclass(frozen=True)
class MIMOUNetConfig:
    """Architecture hyper-parameters of one variant."""

    num_res: int = 8
    """Residual blocks in each encoder and decoder block (8: MIMO-UNet, 20: MIMO-UNet+)."""
    dropout: float = 0.0
    """Channel dropout after the AFF fusion (0.1 in MIMO-UNet+); identity in eval()."""


class BasicConv(nn.Module):
    """Conv (or transposed conv) with 'same'-style padding and an optional ReLU.

    Held in ``.main`` (an inner Sequential) to keep upstream's key names: ``….main.0.weight``.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1,
                 relu: bool = True, transpose: bool = False) -> None:
        super().__init__()
        if transpose:
            # k=4, s=2, p=1 doubles H and W exactly.
            conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=stride,
                                                 padding=kernel_size // 2 - 1)
        else:
            conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2)
        layers = [conv, nn.ReLU(inplace=True)] if relu else [conv]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class ResBlock(nn.Module):
    """conv3x3-ReLU-conv3x3 with an identity skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(channels, channels, 3, relu=True),
            BasicConv(channels, channels, 3, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x


class ResStage(nn.Module):
    """``num_res`` residual blocks: upstream's EBlock and DBlock (identical but for the name)."""

    def __init__(self, channels: int, num_res: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[ResBlock(channels) for _ in range(num_res)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SCM(nn.Module):
    """Shallow convolutional module: features from a downscaled input (paper Sec. 3.1).

    The raw image is concatenated back to the features so the stage keeps the pixels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(3, channels // 4, 3, relu=True),
            BasicConv(channels // 4, channels // 2, 1, relu=True),
            BasicConv(channels // 2, channels // 2, 3, relu=True),
            BasicConv(channels // 2, channels - 3, 1, relu=True),
        )
        self.conv = BasicConv(channels, channels, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, self.main(x)], dim=1))


class FAM(nn.Module):
    """Feature attention module: SCM features gate the encoder features (x1 + conv(x1*x2))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.merge = BasicConv(channels, channels, 3, relu=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 + self.merge(x1 * x2)


class AFF(nn.Module):
    """Asymmetric feature fusion: all three encoder scales, resized, fused for one decoder."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            BasicConv(c_in, c_out, 1, relu=True),
            BasicConv(c_out, c_out, 3, relu=False),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x1, x2, x4], dim=1))


def _half(x: torch.Tensor) -> torch.Tensor:
    # Upstream uses F.interpolate's default (nearest) for every rescale; keep it for parity.
    return F.interpolate(x, scale_factor=0.5)


def _double(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2)


class MIMOUNet(nn.Module):
    """MIMO-UNet; returns the outputs at 1/4, 1/2 and full scale (the last is the result).

    Args:
        config: number of residual blocks per stage and dropout (see ``MIMOUNetConfig``).
    """

    def __init__(self, config: MIMOUNetConfig = MIMOUNetConfig()) -> None:
        super().__init__()
        self.config = config
        c, n = BASE_CHANNELS, config.num_res
        self.Encoder = nn.ModuleList([ResStage(c, n), ResStage(c * 2, n), ResStage(c * 4, n)])
        self.feat_extract = nn.ModuleList([
            BasicConv(3, c, 3, relu=True),
            BasicConv(c, c * 2, 3, stride=2, relu=True),
            BasicConv(c * 2, c * 4, 3, stride=2, relu=True),
            BasicConv(c * 4, c * 2, 4, stride=2, relu=True, transpose=True),
            BasicConv(c * 2, c, 4, stride=2, relu=True, transpose=True),
            BasicConv(c, 3, 3, relu=False),
        ])
        self.Decoder = nn.ModuleList([ResStage(c * 4, n), ResStage(c * 2, n), ResStage(c, n)])
        self.Convs = nn.ModuleList([
            BasicConv(c * 4, c * 2, 1, relu=True),
            BasicConv(c * 2, c, 1, relu=True),
        ])
        self.ConvsOut = nn.ModuleList([
            BasicConv(c * 4, 3, 3, relu=False),
            BasicConv(c * 2, 3, 3, relu=False),
        ])
        # c*7 = c (scale 1) + 2c (scale 2) + 4c (scale 3) concatenated.
        self.AFFs = nn.ModuleList([AFF(c * 7, c), AFF(c * 7, c * 2)])
        self.FAM1 = FAM(c * 4)
        self.SCM1 = SCM(c * 4)
        self.FAM2 = FAM(c * 2)
        self.SCM2 = SCM(c * 2)
        self.drop1 = nn.Dropout2d(config.dropout)
        self.drop2 = nn.Dropout2d(config.dropout)

    def encode(self, x: torch.Tensor, x_2: torch.Tensor, x_4: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder with the multi-input SCM/FAM injections; returns the three scale features."""
        res1 = self.Encoder[0](self.feat_extract[0](x))
        z = self.FAM2(self.feat_extract[1](res1), self.SCM2(x_2))
        res2 = self.Encoder[1](z)
        z = self.FAM1(self.feat_extract[2](res2), self.SCM1(x_4))
        return res1, res2, self.Encoder[2](z)

    def fuse(self, res1: torch.Tensor, res2: torch.Tensor, z: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """AFF: each decoder skip sees all three encoder scales."""
        z42 = _double(z)
        fused2 = self.AFFs[1](_half(res1), res2, z42)
        fused1 = self.AFFs[0](res1, _double(res2), _double(z42))
        return self.drop1(fused1), self.drop2(fused2)

    def decode(self, z: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor,
               x: torch.Tensor, x_2: torch.Tensor, x_4: torch.Tensor) -> list[torch.Tensor]:
        """Decoder with an image output at every scale (multi-output)."""
        z = self.Decoder[0](z)
        out4 = self.ConvsOut[0](z) + x_4
        z = self.Convs[0](torch.cat([self.feat_extract[3](z), skip2], dim=1))
        z = self.Decoder[1](z)
        out2 = self.ConvsOut[1](z) + x_2
        z = self.Convs[1](torch.cat([self.feat_extract[4](z), skip1], dim=1))
        z = self.Decoder[2](z)
        return [out4, out2, self.feat_extract[5](z) + x]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x_2 = _half(x)
        x_4 = _half(x_2)
        res1, res2, z = self.encode(x, x_2, x_4)
        skip1, skip2 = self.fuse(res1, res2, z)
        return self.decode(z, skip1, skip2, x, x_2, x_4)


class SelfEnsemble(nn.Module):
    """Geometric self-ensemble (MIMO-UNet++): the mean over the 8 flips/transposes.

    Each of the 8 dihedral transforms is applied to the input, the network run, the inverse
    transform applied to every output, and the outputs averaged scale by scale. The wrapped
    net's parameters keep their own names (no prefix): ``state_dict`` is the inner net's.
    """

    def __init__(self, net: MIMOUNet) -> None:
        super().__init__()
        self.net = net

    @staticmethod
    def transform(x: torch.Tensor, index: int) -> torch.Tensor:
        """index bits: 1 = flip W, 2 = flip H, 4 = transpose H/W (applied last)."""
        if index & 1:
            x = x.flip(-1)
        if index & 2:
            x = x.flip(-2)
        if index & 4:
            x = x.transpose(-1, -2)
        return x

    @staticmethod
    def inverse(x: torch.Tensor, index: int) -> torch.Tensor:
        if index & 4:
            x = x.transpose(-1, -2)
        if index & 2:
            x = x.flip(-2)
        if index & 1:
            x = x.flip(-1)
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sums: list[torch.Tensor] | None = None
        for index in range(8):
            outs = [self.inverse(o, index) for o in self.net(self.transform(x, index))]
            sums = outs if sums is None else [s + o for s, o in zip(sums, outs)]
        assert sums is not None
        return [s / 8 for s in sums]

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
