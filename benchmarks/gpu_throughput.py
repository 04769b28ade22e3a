"""GPU training throughput of ResNet-50 at 160 px (bf16 autocast, channels_last, SGD), and
WE's share of an ImageNet epoch at that speed.

Images are random tensors already on the GPU, so this measures the model step (the
ceiling the FFCV loader has to feed), not data loading. WE is timed on the same model
after training steps, with a realistic tail of weak filters. Needs only torch and
torchvision (it runs on a lent GPU machine with nothing else installed).

    python benchmarks/gpu_throughput.py --batch-size 256 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from we_dist.evolution import WEConfig, WeightEvolution  # noqa: E402
from we_dist.models import create_model  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def weaken_tail(model: torch.nn.Module, fraction: float = 0.05, seed: int = 0) -> None:
    """Scale a random ``fraction`` of conv filters and BN channels by 1e-4..1e-1 (log-uniform),
    the long tail of weak filters a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                n = m.weight.shape[0]
                weak = torch.rand(n, generator=g) < fraction
                scale = 10 ** (-4 + 3 * torch.rand(n, generator=g))
                factor = torch.where(weak, scale, torch.ones(n)).to(m.weight.device)
                m.weight.mul_(factor.view(-1, *([1] * (m.weight.dim() - 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--we-calls", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = create_model("resnet50", 1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    x = torch.randn(args.batch_size, 3, args.res, args.res, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    imgs = args.batch_size / step_s

    weaken_tail(model)
    we = WeightEvolution(WEConfig.imagenet())
    we_times = []
    for i in range(args.we_calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        we.step(model, epoch=10 + i)
        torch.cuda.synchronize()
        we_times.append(time.perf_counter() - t0)
    we_s = statistics.median(we_times[1:] if len(we_times) > 1 else we_times)
    epoch_s = IMAGENET_TRAIN_IMAGES / imgs

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| ResNet-50 train step, batch {args.batch_size} at {args.res} px, bf16 + channels_last (median of {args.steps}) | {step_s * 1000:.1f} ms |")
    print(f"| training throughput | {imgs:,.0f} images/s |")
    print(f"| ImageNet epoch at that speed (1,281,167 images) | {epoch_s:.0f} s |")
    print(f"| one WE call on the trained ResNet-50 (median of {len(we_times) - 1}) | {we_s * 1000:.2f} ms |")
    print(f"| WE share of the epoch (one call per epoch) | {we_s / epoch_s * 100:.4f} % |")


if __name__ == "__main__":
    main()
