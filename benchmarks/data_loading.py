"""FFCV (we_dist.data) vs torchvision ImageFolder + DataLoader on the same JPEGs.

Generates an ImageFolder tree of JPEGs at ImageNet-like sizes (about 500x375 on average),
converts it to a .beton with `we_dist.data.convert`, then times training epochs of both
loaders, alternating between them so that load from other processes on a shared machine
hits both alike. Both produce the same thing: normalised float32 NCHW batches of
random-resized crops (scale 0.08-1) with horizontal flips at --res px, using the same
number of workers (FFCV threads vs DataLoader worker processes). The first epoch of each
is a warm-up (FFCV's JIT compilation, worker start, page cache) and is not counted.

    .venv/bin/python benchmarks/data_loading.py                 # defaults: ~2-4 minutes
    .venv/bin/python benchmarks/data_loading.py --num-images 5000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from we_dist.config import DataConfig  # noqa: E402
from we_dist.data import check_beton, make_train_loader  # noqa: E402
from we_dist.data.convert import write_imagefolder, write_synthetic_jpegs  # noqa: E402


def prepare(data_dir: Path, num_images: int, classes: int, max_res: int, compress: float,
            quality: int, workers: int) -> tuple[Path, Path]:
    """The JPEG tree and its .beton, reused when a previous run made them with these settings."""
    settings = dict(num_images=num_images, classes=classes, max_res=max_res, compress=compress,
                    quality=quality, version=1)
    stamp = data_dir / "settings.json"
    jpegs, beton = data_dir / "jpegs", data_dir / "train.beton"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and beton.is_file():
        return jpegs, beton
    import shutil

    shutil.rmtree(data_dir, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_jpegs(jpegs, num_images, classes)
    print(f"wrote {num_images} JPEGs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    t = time.perf_counter()
    write_imagefolder(jpegs, beton, max_resolution=max_res, jpeg_quality=quality,
                      compress_probability=compress, workers=workers)
    print(f"converted to {beton} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    stamp.write_text(json.dumps(settings))
    return jpegs, beton


def torchvision_loader(jpegs: Path, res: int, batch_size: int, workers: int):
    """The usual baseline: PIL decoding in DataLoader worker processes."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(res, scale=(0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),  # uint8, like FFCV's output; float conversion below, in both
    ])
    ds = datasets.ImageFolder(str(jpegs), transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def timed_epoch(batches, normalise) -> tuple[float, int]:
    n = 0
    t = time.perf_counter()
    for images, labels in batches:
        images = normalise(images)
        n += images.shape[0]
    return time.perf_counter() - t, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--res", type=int, default=160, help="training crop size, px")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="FFCV threads = DataLoader processes")
    p.add_argument("--epochs", type=int, default=4, help="per loader, the first one not counted")
    p.add_argument("--max-resolution", type=int, default=512)
    p.add_argument("--compress-probability", type=float, default=0.5)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--data-dir", default="/tmp/we_dist_bench_data_loading")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is a warm-up)")

    torch.set_num_threads(1)  # the main process only converts batches, in both loaders
    jpegs, beton = prepare(Path(args.data_dir), args.num_images, args.classes, args.max_resolution,
                           args.compress_probability, args.jpeg_quality, args.workers)
    info = check_beton(beton)
    cfg = DataConfig(train_path=str(beton), batch_size=args.batch_size, loader_workers=args.workers,
                     min_res=args.res, max_res=args.res)
    ffcv = make_train_loader(cfg, distributed=False, seed=0, device=torch.device("cpu"))
    tv = torchvision_loader(jpegs, args.res, args.batch_size, args.workers)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    inv_std = 1 / torch.tensor(cfg.std).view(1, 3, 1, 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x.float().sub_(mean).mul_(inv_std)

    rates: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
    load_before = os.getloadavg()[0]
    for epoch in range(args.epochs):
        for name, run in (("ffcv", lambda: timed_epoch(ffcv, lambda x: x)),
                          ("torchvision", lambda: timed_epoch(tv, normalise))):
            seconds, n = run()
            print(f"epoch {epoch} {name:<11} {n / seconds:8.1f} img/s ({n} images, {seconds:.1f} s)"
                  f"{'  [warm-up]' if epoch == 0 else ''}", file=sys.stderr)
            if epoch:
                rates[name].append(n / seconds)
    load_after = os.getloadavg()[0]

    med = {k: statistics.median(v) for k, v in rates.items()}
    # Epochs of the two loaders run back to back, so each pair saw similar load from others.
    paired = statistics.median(f / t for f, t in zip(rates["ffcv"], rates["torchvision"]))
    print(f"\n{info.num_samples} JPEGs, {args.classes} classes, mean size ~500x375; .beton: longest side "
          f"<= {info.max_resolution}, {info.num_jpeg} JPEG / {info.num_samples - info.num_jpeg} raw, "
          f"{info.size_bytes / 2**20:.0f} MiB; {args.res} px random-resized crops + flip, batch "
          f"{args.batch_size}, {args.workers} workers each; {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} -> {load_after:.1f}; median of {args.epochs - 1} epochs after a warm-up\n")
    print("| loader | images/s (median) | min | max | vs torchvision (medians) | (paired epochs) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label in (("ffcv", "FFCV (we_dist.data)"), ("torchvision", "torchvision ImageFolder + DataLoader")):
        ratio = f"{paired:.2f}x" if name == "ffcv" else "1.00x"
        print(f"| {label} | {med[name]:.0f} | {min(rates[name]):.0f} | {max(rates[name]):.0f} | "
              f"{med[name] / med['torchvision']:.2f}x | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
