"""Model registry: variants are short functions over one class, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deblur.errors import ModelError
from deblur.model.mimo_unet import MIMOUNet, MIMOUNetConfig, SelfEnsemble

STRIDE = 4
"""H and W of a network input must be multiples of this (two stride-2 stages)."""


def mimo_unet() -> nn.Module:
    """MIMO-UNet: 8 residual blocks per stage (6.8 M parameters)."""
    return MIMOUNet(MIMOUNetConfig(num_res=8))


def mimo_unet_plus() -> nn.Module:
    """MIMO-UNet+: 20 residual blocks per stage and channel dropout in training (16.1 M)."""
    return MIMOUNet(MIMOUNetConfig(num_res=20, dropout=0.1))


def mimo_unet_plusplus() -> nn.Module:
    """MIMO-UNet++: MIMO-UNet+ weights run as an 8-way geometric self-ensemble."""
    return SelfEnsemble(mimo_unet_plus())  # type: ignore[arg-type]


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mimo-unet": mimo_unet,
    "mimo-unet-plus": mimo_unet_plus,
    "mimo-unet-plusplus": mimo_unet_plusplus,
}


def create_model(name: str) -> nn.Module:
    """Build a registered model in eval() mode (dropout off), weights random."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None
    return factory().eval()
