"""Forward throughput of the MIMO-UNet variants (model only, no I/O).

    .venv/bin/python bench/model.py                      # CPU: fp32 at 256x256 and 1280x720
    .venv/bin/python bench/model.py --sizes 256x256 --batches 1,4 --repeat 3

On CUDA it also measures, at each size, fp32 vs bf16/fp16, channels_last and torch.compile,
and the authors' way (fp32, batch 1, eager, synchronised per image) as the baseline in the same
run, printing each figure's ratio to that baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from deblur.model import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], object], images: int, device: torch.device, repeat: int,
            warmup: int = 1) -> float:
    """Median images/s of ``step`` (which processes ``images`` images) over ``repeat`` runs."""
    for _ in range(warmup):
        step()
    _sync(device)
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_variant(name: str, height: int, width: int, batch: int, device: torch.device,
                  dtype: torch.dtype, channels_last: bool, compile_: bool, repeat: int) -> float:
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(device, dtype, memory_format=memory)
    forward: Callable[[torch.Tensor], object] = model
    if compile_:
        forward = torch.compile(model, mode="max-autotune")
    x = torch.rand(batch, 3, height, width, device=device, dtype=dtype).contiguous(
        memory_format=memory)

    def step() -> object:
        with torch.inference_mode():
            return forward(x)[2]

    return measure(step, batch, device, repeat, warmup=3 if compile_ else 1)


def authors_way(name: str, height: int, width: int, device: torch.device, repeat: int) -> float:
    """fp32, batch 1, eager, synchronised after every image (as their eval.py times it)."""
    model = create_model(name).to(device)
    x = torch.rand(1, 3, height, width, device=device)
    count = 4

    def step() -> None:
        for _ in range(count):
            with torch.no_grad():
                model(x)[2]
            _sync(device)

    return measure(step, count, device, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mimo-unet,mimo-unet-plus")
    parser.add_argument("--sizes", default="256x256,1280x720", help="WxH list")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or \
        platform.machine()
    print(f"# device: {device} ({where}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| model | size | batch | precision | layout | compile | images/s | vs authors' way |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            base = authors_way(name, height, width, device, args.repeat)
            print(f"| {name} | {size} | 1 | fp32 | NCHW | eager (authors' way) | {base:.2f} | "
                  f"1.00x |", flush=True)
            configs = [(torch.float32, False, False)]
            if device.type == "cuda":
                configs += [(torch.bfloat16, False, False), (torch.float16, False, False),
                            (torch.bfloat16, True, False), (torch.bfloat16, True, True)]
            for batch in (int(b) for b in args.batches.split(",")):
                for dtype, cl, comp in configs:
                    rate = bench_variant(name, height, width, batch, device, dtype, cl, comp,
                                         args.repeat)
                    print(f"| {name} | {size} | {batch} | {str(dtype).split('.')[-1]} | "
                          f"{'NHWC' if cl else 'NCHW'} | {'max-autotune' if comp else 'eager'}"
                          f" | {rate:.2f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
