"""Regenerate ``lasso.pt`` from the authors' code (never run by the suite).

It contains none of the authors' code: it reads their files from a directory given on the
command line (see README.md for the ``git show`` lines that put them there) and runs them.

yihui-he/channel-pruning at 4e1c4cc76e4a45401ae6cd821920650f9133812c, ``lib/decompose.py``:
the top-level functions ``dictionary`` (the channel selection: a scikit-learn ``Lasso`` on a
random subsample of the rows, its ``alpha`` doubled and then bisected until the number of
non-zero coefficients lies in ``[rank, rank + rank_tol * rank]``; then the least squares on
the kept channels over all rows) and ``fc_kernel`` (the least squares it calls, a scikit-learn
``LinearRegression``) are cut out of the file with ``ast`` (their source text exactly, no line
changed: it is Python 3 already) and executed. What they read from the rest of their
repository is given to them without editing any text of theirs:

* ``dcfgs`` / ``cfgs``: their ``lib/cfgs.py``, executed unchanged: the defaults ``train.py``
  runs with (``dic.rank_tol = 0.1``, ``dic.alter = 0``, ``autodet = False``, ``ls = 'linear'``,
  ``fc_ridge = 0``, ``solver = 'sklearn'``, ``alpha = 1e-3``). It imports ``easydict``, which
  is not installed here: a stand-in module whose ``EasyDict`` is a ``dict`` with attribute
  access (what easydict's is) takes its place;
* ``np``, ``Lasso``, ``LinearRegression``, ``MultiTaskLasso``, ``Ridge``: NumPy and
  scikit-learn. ``Lasso`` is a subclass that records every ``fit`` (alpha, the non-zero
  count, ``coef_``, and the first fit's inputs, checked against the recorded subsample) and
  stops a search that has not ended after ``MAX_FITS`` fits: their loops have no bound, and
  on one stored case they never end. The rest of their module's imports (``IPython``,
  ``lightning``, ``theanols``, ``Worker``, ``Timer``, ``PCA``, the since removed
  ``RandomizedLasso``) are not used on the path these settings take and are not provided.

Around each call, and not in their text: ``cfgs.alpha`` is reset to their default ``1e-3``
(``dictionary`` leaves its final alpha there as the next layer's starting bound; each case
here is a first layer), and ``np.random`` is seeded with the case's seed (their row subsample,
``np.random.randint(0, N, min(400, N // 20))``, is the first draw; ``Lasso(selection='random')``
draws from it too). The subsample is recorded by drawing it once from the same seed before
the call. scikit-learn's ``ConvergenceWarning`` is silenced.

Each case is run three times: (1) as in their code; (2) with ``fit_intercept=False`` in both
fits (their ``Lasso`` built with it by the subclass, their ``fc_kernel`` called with its own
``fit_intercept=False`` argument), which isolates what their intercepts change; (3) as (1) but
with a converged ``Lasso`` (``tol=1e-10``, ``max_iter=100000`` instead of the defaults
``1e-4``, 1000), which isolates what their solver's tolerance changes.

Usage: ``python make_reference_lasso.py <dir with decompose.py and cfgs.py> <output dir>``.
"""

from __future__ import annotations

import ast
import sys
import types
import warnings
from pathlib import Path

import numpy
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, LinearRegression, MultiTaskLasso, Ridge

CASES = [  # (name, rows N, channels c, outputs n, kernel k, kept (their rank), seed, filter-norm spread)
    ("n200_c8_o16_k1_keep4", 200, 8, 16, 1, 4, 1, 0.0),
    ("n200_c16_o16_k1_keep8", 200, 16, 16, 1, 8, 4, 0.5),
    ("n200_c6_o12_k3_keep3", 200, 6, 12, 3, 3, 2, 0.3),
    ("n200_c24_o16_k1_keep12", 200, 24, 16, 1, 12, 3, 0.5),
    ("n200_c8_o16_k3_keep4", 200, 8, 16, 3, 4, 4, 0.8),
    ("n200_c32_o12_k1_keep16", 200, 32, 12, 1, 16, 4, 0.3),
    ("n200_c40_o12_k1_keep20", 200, 40, 12, 1, 20, 1, 0.5),
    ("n200_c30_o12_k1_keep15", 200, 30, 12, 1, 15, 0, 0.5),
]


def case_inputs(n_rows: int, c: int, n: int, k: int, seed: int, spread: float):
    """The consumer's input patches ``x`` (N x c x k x k, after a ReLU as in their VGG path:
    not centred), its weight ``w`` (n x c x k x k, per-channel norms ``exp(spread * randn)``)
    and the target ``y`` (N x n: ``x w^T`` plus 10 % noise, the error of the layers pruned
    before). Channels correlate through a shared component; a few are weak. float64 holding
    float32 values, so that the stored float32 copies are the inputs exactly."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    scale = torch.rand(c, generator=g, dtype=f64) * 1.5 + 0.1
    shared = torch.randn(n_rows, 1, k, k, generator=g, dtype=f64)
    x = torch.relu(torch.randn(n_rows, c, k, k, generator=g, dtype=f64) * scale[:, None, None] + 0.6 * shared)
    norms = torch.exp(spread * torch.randn(c, generator=g, dtype=f64))
    w = torch.randn(n, c, k, k, generator=g, dtype=f64) * norms[None, :, None, None] / (c * k * k) ** 0.5
    x, w = x.float().double(), w.float().double()
    y = x.reshape(n_rows, -1) @ w.reshape(n, -1).T
    y = y + 0.1 * y.std() * torch.randn(n_rows, n, generator=g, dtype=f64)
    return x, w, y.float().double()


MAX_FITS = 100   # their search loops have no bound; stop a run that has not ended after this many fits


class Stuck(Exception):
    """Their alpha search did not end within MAX_FITS Lasso fits."""


def _easydict_stand_in() -> types.ModuleType:
    mod = types.ModuleType("easydict")

    class EasyDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as err:
                raise AttributeError(key) from err

        def __setattr__(self, key, value):
            self[key] = value

    mod.EasyDict = EasyDict
    return mod


def load_authors(source: Path) -> tuple[dict, types.ModuleType, list]:
    """Their ``cfgs`` module and a namespace holding their ``dictionary`` and ``fc_kernel``."""
    sys.modules.setdefault("easydict", _easydict_stand_in())
    cfgs = types.ModuleType("cfgs")
    exec(compile((source / "cfgs.py").read_text(), str(source / "cfgs.py"), "exec"), cfgs.__dict__)
    text = (source / "decompose.py").read_text()
    wanted = {"dictionary", "fc_kernel"}
    parts = [ast.get_source_segment(text, node) for node in ast.parse(text).body
             if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert len(parts) == 2, "dictionary / fc_kernel not found"
    fits: list = []
    seen: list = []      # the (Z, y) their first fit got: checked against the recorded subsample

    class RecordingLasso(Lasso):
        def fit(self, X, y, *args, **kwargs):          # noqa: N803 (scikit-learn's names)
            out = super().fit(X, y, *args, **kwargs)
            if not fits:
                seen[:] = [numpy.array(X), numpy.array(y)]
            fits.append((float(self.alpha), int((self.coef_ != 0).sum()), self.coef_.copy()))
            if len(fits) >= MAX_FITS:
                raise Stuck
            return out

    namespace = {"np": numpy, "LinearRegression": LinearRegression, "MultiTaskLasso": MultiTaskLasso,
                 "Ridge": Ridge, "dcfgs": cfgs.c, "cfgs": cfgs, "__name__": "decompose_excerpt"}
    exec(compile("\n\n".join(parts), str(source / "decompose.py") + ":dictionary,fc_kernel", "exec"), namespace)
    namespace["_their_fc_kernel"] = namespace["fc_kernel"]
    namespace["_RecordingLasso"] = RecordingLasso
    namespace["_seen"] = seen
    return namespace, cfgs, fits


def contributions(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, samples: torch.Tensor):
    """What ``dictionary`` regresses on: rows (sample, output), one column per input channel
    (its contribution ``x_c w_c^T``), and the target flattened the same way."""
    c, n = x.shape[1], w.shape[0]
    z = torch.einsum("sck,nck->snc", x[samples].reshape(len(samples), c, -1), w.reshape(n, c, -1))
    return z.reshape(-1, c), y[samples].reshape(-1)


def run(source: Path) -> dict:
    ns, cfgs, fits = load_authors(source)
    their_fc_kernel = ns["_their_fc_kernel"]
    cases = []
    for name, n_rows, c, n, k, rank, seed, spread in CASES:
        x, w, y = case_inputs(n_rows, c, n, k, seed, spread)
        numpy.random.seed(seed)
        samples = numpy.random.randint(0, n_rows, min(400, n_rows // 20))
        case = {"name": name, "x": x.float(), "w": w.float(), "y": y.float(), "rank": rank,
                "samples": torch.as_tensor(samples, dtype=torch.long)}
        for tag, intercept, tight in (("", True, False), ("noint_", False, False), ("tight_", True, True)):
            extra = {"fit_intercept": intercept, **({"tol": 1e-10, "max_iter": 100_000} if tight else {})}
            ns["Lasso"] = (lambda ex: (lambda **kw: ns["_RecordingLasso"](**ex, **kw)))(extra)
            ns["fc_kernel"] = (their_fc_kernel if intercept else
                               (lambda *a, **kw: their_fc_kernel(*a, fit_intercept=False, **kw)))
            cfgs.alpha = 1e-3                          # their default; dictionary() moves it
            fits.clear()
            numpy.random.seed(seed)
            try:
                idxs, new_w, new_b = ns["dictionary"](x.numpy().copy(), w.numpy().copy(), y.numpy().copy(),
                                                      rank=rank, B2=numpy.zeros(n))
            except Stuck:
                pass
            z, t = contributions(x, w, y, torch.as_tensor(samples))
            assert numpy.allclose(ns["_seen"][0], z.numpy(), rtol=1e-12, atol=1e-12), "subsample or layout differs"
            assert numpy.array_equal(ns["_seen"][1], t.numpy())
            if len(fits) >= MAX_FITS:
                case[tag + "stuck"] = True
                case[tag + "trace"] = [[a, m] for a, m, _ in fits]
                case[tag + "coef"] = torch.as_tensor(fits[-1][2], dtype=torch.float64)
                continue
            case[tag + "stuck"] = False
            kept = numpy.flatnonzero(idxs)
            assert fits[-1][1] == len(kept)
            case[tag + "kept"] = torch.as_tensor(kept, dtype=torch.long)
            case[tag + "weight"] = torch.tensor(numpy.array(new_w, dtype=numpy.float64))  # n x kept x k x k
            case[tag + "bias"] = torch.tensor(numpy.array(new_b, dtype=numpy.float64).reshape(-1))
            assert fits[-1][0] == cfgs.alpha
            case[tag + "alpha"] = float(cfgs.alpha)    # the alpha their search stopped at
            case[tag + "coef"] = torch.as_tensor(fits[-1][2], dtype=torch.float64)
            case[tag + "trace"] = [[a, m] for a, m, _ in fits]   # every Lasso fit: alpha, non-zeros
        cases.append(case)
        print(name, *(f"{tag or 'as is'}: " + ("stuck" if case[tag + "stuck"] else
                                                  f"kept {case[tag + 'kept'].tolist()} alpha {case[tag + 'alpha']:.6g}")
                       + f" ({len(case[tag + 'trace'])} fits)" for tag in ("", "noint_", "tight_")))
    return {"cases": cases, "sklearn": sklearn.__version__, "numpy": numpy.__version__}


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        torch.save(run(src), out / "lasso.pt")


if __name__ == "__main__":
    main()
