"""The MIMO-UNet training loss (Cho et al., ICCV 2021, eq. 6-8), written from the paper.

The network returns images at 1/4, 1/2 and full scale (``MIMOUNet.forward``); each is compared
with the sharp image downscaled to its size (bilinear, as the authors' training code does):

    L = sum_k L1(out_k, sharp_k) + 0.1 * sum_k L1(FFT(out_k), FFT(sharp_k))

The FFT term is the L1 distance of the real and imaginary parts of the 2-D FFT; it penalises
the missing high frequencies that a pixel L1 alone lets a network leave blurry. The loss is
computed in fp32 even under autocast: cuFFT in fp16 only takes power-of-two sizes, and the
sums would lose the small differences late in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FFT_WEIGHT = 0.1


def targets(sharp: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The sharp batch at the network's output scales, coarsest first (1/4, 1/2, 1)."""
    # Each scale straight from the full image (scale_factor 0.25, not 0.5 twice), as the
    # authors' code does; the two differ because bilinear without antialias subsamples.
    return [F.interpolate(sharp, scale_factor=0.5 ** k, mode="bilinear", align_corners=False)
            for k in range(count - 1, 0, -1)] + [sharp]


def fft_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    a, b = torch.fft.fft2(output), torch.fft.fft2(target)
    return F.l1_loss(torch.view_as_real(a), torch.view_as_real(b))


def mimo_loss(outputs: list[torch.Tensor], sharp: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """(total loss, its parts as floats) for the network's multi-scale outputs."""
    sharp = sharp.float()
    content = sharp.new_zeros(())
    frequency = sharp.new_zeros(())
    for out, target in zip(outputs, targets(sharp, len(outputs))):
        out = out.float()
        content = content + F.l1_loss(out, target)
        frequency = frequency + fft_l1(out, target)
    total = content + FFT_WEIGHT * frequency
    return total, {"content": float(content.detach()), "fft": float(frequency.detach())}
