"""Regenerate ``thinet.pt`` and ``twn.pt`` from the authors' code (never run by the suite).

It contains none of the authors' code: it reads their files from a directory given on the
command line (see README.md for the ``git show`` lines that put them there) and runs them.

* ThiNet (Roll920/ThiNet_Code, ``ThiNet_ICCV/compress_model.py``): the function
  ``value_sum(x, y, compress_rate)`` (greedy selection and least-squares scaling) is cut out of
  the file and executed. Two mechanical changes make the Python 2 text run on Python 3 with
  NumPy 2: its one ``print '...' % ...`` statement gets parentheses, and ``np`` is NumPy with
  ``mat = asmatrix`` put back (NumPy 1.x defined ``np.mat`` as exactly that alias; 2.0 removed it).
* TWN (fengfu-chris/caffe-twns, ``src/caffe/util/math_functions.cpp`` and
  ``src/caffe/blob.cpp``): their ``caffe_cpu_ternary<float>`` is cut out of the file and compiled
  unchanged with g++; ``Blob::set_delta`` and the CPU branch of ``Blob::ternarize_data`` (delta
  from ``asum``, alpha from two ``dot`` products, both BLAS calls in float) are transcribed line
  by line in the small driver below, with float loops for ``cblas_sasum`` / ``cblas_sdot``.

Usage: ``python make_reference_thinet_twn.py <dir with their files> <output dir>``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy
import torch

THINET_CASES = [  # (name, samples N, channels C, their compress_rate = fraction KEPT, seed)
    ("n200_c16_keep0.5", 200, 16, 0.5, 0),
    ("n300_c32_keep0.3", 300, 32, 0.3, 1),
    ("n150_c10_keep0.7", 150, 10, 0.7, 2),
    ("n300_c48_keep0.5", 300, 48, 0.5, 3),
    ("n100_c8_keep0.25", 100, 8, 0.25, 4),
    ("n400_c24_keep0.6", 400, 24, 0.6, 5),
]

TWN_CASES = [  # (name, weight shape, seed, distribution)
    ("conv_16x3x3x3", (16, 3, 3, 3), 10, "normal"),
    ("conv_32x16x3x3", (32, 16, 3, 3), 11, "normal"),
    ("conv_64x32x1x1", (64, 32, 1, 1), 12, "normal"),
    ("linear_10x64", (10, 64), 13, "normal"),
    ("conv_8x8x3x3_laplace", (8, 8, 3, 3), 14, "laplace"),
    ("conv_24x24x3x3_uniform", (24, 24, 3, 3), 15, "uniform"),
]


def thinet_inputs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel contributions ``x`` (N x C, each channel its own scale, a few weak) and the
    layer's output ``y = sum_c x_c`` plus a little noise (N x 1): float64 holding float32
    values, so that the stored float32 copies are the inputs exactly."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.05
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * scale + 0.3 * torch.randn(n, 1, generator=g,
                                                                                        dtype=torch.float64)
    y = x.sum(1, keepdim=True) + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x.float().double(), y.float().double()


def twn_weight(shape: tuple[int, ...], seed: int, kind: str) -> torch.Tensor:
    """A float32 weight of ``shape`` from ``kind`` (normal, laplace, uniform)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "normal":
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    elif kind == "laplace":
        w = -0.1 * torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
    else:
        w = (u * 2 - 1) * 0.2
    return w.float()


def run_thinet(source: Path) -> dict:
    text = source.read_text()
    start = text.index("def value_sum(")
    end = text.index("\ndef ", start + 1)
    func = text[start:end]
    func = re.sub(r"^(\s*)print (['\"].*)$", r"\1print(\2)", func, flags=re.M)   # Python 2 -> 3
    np_shim = types.ModuleType("numpy_with_mat")
    np_shim.__dict__.update(numpy.__dict__)
    np_shim.mat = numpy.asmatrix
    namespace = {"np": np_shim, "time": time}
    exec(compile(func, str(source) + ":value_sum", "exec"), namespace)
    cases = []
    for name, n, c, rate, seed in THINET_CASES:
        x, y = thinet_inputs(n, c, seed)
        index, w = namespace["value_sum"](x.numpy(), y.numpy(), rate)
        cases.append({"name": name, "x": x.float(), "y": y.float(), "compress_rate": rate,
                      "kept": torch.as_tensor(numpy.asarray(index), dtype=torch.long),
                      "w": torch.as_tensor(numpy.asarray(w), dtype=torch.float64).reshape(-1)})
    return {"cases": cases}


DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <cmath>
// The authors' caffe_cpu_ternary<float> (math_functions.cpp), pasted unchanged below:
template <typename Dtype> void caffe_cpu_ternary(const int N, const Dtype delta, const Dtype* X, Dtype* Y);
template<>
%(ternary)s
static int TERNARY_DELTA = 7;                       // binary.cpp: extern int TERNARY_DELTA = 7;
static float sasum(int n, const float* x) { float s = 0; for (int i = 0; i < n; i++) s += std::fabs(x[i]); return s; }
static float sdot(int n, const float* x, const float* y) { float s = 0; for (int i = 0; i < n; i++) s += x[i] * y[i]; return s; }
int main(int argc, char** argv) {
  FILE* f = std::fopen(argv[1], "rb"); int n; std::fread(&n, sizeof(int), 1, f);
  float* data = new float[n]; std::fread(data, sizeof(float), n, f); std::fclose(f);
  float* binary = new float[n];
  // Blob::set_delta()
  float scale_factor = TERNARY_DELTA * 1.0 / 10;
  float delta = (float) scale_factor * sasum(n, data) / n;
  delta = (delta <= 100) ? delta : 100;
  delta = (delta >= -100) ? delta : -100;
  // Blob::ternarize_data, HEAD_AT_CPU
  float alpha = 1;
  caffe_cpu_ternary<float>(n, delta, data, binary);
  alpha = sdot(n, binary, data);
  alpha /= sdot(n, binary, binary);
  std::printf("%%.9g %%.9g\n", delta, alpha);
  for (int i = 0; i < n; i++) std::printf("%%d\n", (int) binary[i]);
  return 0;
}
"""


def run_twn(math_functions: Path, work: Path) -> dict:
    text = math_functions.read_text()
    start = text.index("void caffe_cpu_ternary<float>(")
    end = text.index("}\n", text.index("}", start) + 1) + 2       # the loop's brace, then the function's
    (work / "twn_driver.cpp").write_text(DRIVER % {"ternary": text[start:end]})
    subprocess.run(["g++", "-O0", "-o", str(work / "twn_driver"), str(work / "twn_driver.cpp")], check=True)
    cases = []
    for name, shape, seed, kind in TWN_CASES:
        w = twn_weight(shape, seed, kind)
        raw = work / f"{name}.bin"
        flat = w.reshape(-1).numpy()
        raw.write_bytes(numpy.int32(flat.size).tobytes() + flat.astype(numpy.float32).tobytes())
        out = subprocess.run([str(work / "twn_driver"), str(raw)], check=True, capture_output=True, text=True).stdout
        lines = out.split()
        delta, alpha = float(lines[0]), float(lines[1])
        codes = torch.tensor([int(v) for v in lines[2:]], dtype=torch.int8).reshape(shape)
        cases.append({"name": name, "weight": w, "delta": delta, "alpha": alpha, "codes": codes})
    return {"cases": cases}


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.save(run_thinet(src / "compress_model.py"), out / "thinet.pt")
    torch.save(run_twn(src / "math_functions.cpp", src), out / "twn.pt")


if __name__ == "__main__":
    main()
