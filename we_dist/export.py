"""The final network as a file that loads with nothing but torch.

:func:`export_model` traces the eval-mode network with ``torch.export`` (batch size left
dynamic) and saves the program with ``torch.export.save``. Loading needs no code of this
project, pruned or not, masked or not::

    import torch
    net = torch.export.load("model.pt2").module()
    logits = net(images)          # float32, (N, C, H, W), normalised as in training

The file holds the graph and the weights; ``exported.json`` beside it records the input
shape it was traced with, how to load it, and which network it is (``"network"``: its
parameters, nonzero parameters and MACs, and, as the caller says, its epoch and whether it is
the run's ``"last"`` or ``"best"`` epoch's network).

Networks trained with masks or ternary weights (:mod:`we_dist.methods.masked`) are exported
as what they compute: :func:`deployable` replaces each such layer by a plain conv/linear
layer holding its effective weight (``weight * mask``, or ``alpha * codes``), so the file
holds neither scores nor full-precision shadows and loads like any other. The ternary
method also writes ``exported_2bit.pt`` beside it (its ``export_artifacts``): every ternary weight packed at 2
bits (four per byte) with its alpha, every other tensor in float32
(:func:`pack_2bit`; :func:`load_2bit` unpacks it into a plain state dict that the
exported module, or the project's model, loads)::

    net = torch.export.load("exported.pt2").module()
    net.load_state_dict(load_2bit("exported_2bit.pt"))   # the same network, from 2-bit codes
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.export import Dim

EXPORT_FILE = "exported.pt2"
INPUT_NOTE = "exported.json"
PACKED_FILE = "exported_2bit.pt"
PACKED_FORMAT = "we_dist.ternary_2bit"


def deployable(model: nn.Module) -> nn.Module:
    """``model`` as it is deployed: every layer with a ``deploy()`` method (masked and
    ternary layers) replaced by the plain layer it returns, which computes the same outputs.

    Returns ``model`` itself when there is no such layer, else a modified deep copy
    (``model`` is never changed).
    """
    names = [n for n, m in model.named_modules() if n and callable(getattr(m, "deploy", None))]
    if not names:
        return model
    net = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        if not hasattr(parent, child):  # inside a layer that was already replaced
            continue
        setattr(parent, child, getattr(parent, child).deploy())
    return net


def export_model(model: nn.Module, input_shape: Sequence[int], directory: str | Path,
                 max_batch: int = 4096, *, network: Mapping[str, Any] | None = None) -> Path:
    """Export ``model`` (a CPU, eval-mode copy of it) to ``directory/exported.pt2``.

    ``input_shape`` is one input's (C, H, W). Any batch from 1 to ``max_batch`` works.
    Returns the path. Also writes ``exported.json`` (input shape, dtype, how to load, and
    ``"network"``: what the caller says the exported network is, e.g. its epoch (0-based),
    ``"selected"`` (``"last"`` or ``"best"``), params and MACs (:mod:`we_dist.accounting`, a
    layer above this one, counts them)); a method adds its own files beside them
    (``Method.export_artifacts``: the ternary method writes ``exported_2bit.pt`` with
    :func:`write_2bit`). Masked and ternary layers are exported as plain layers (:func:`deployable`).
    """
    net = deployable(copy.deepcopy(model).cpu().float().eval()).to(memory_format=torch.contiguous_format)
    example = torch.randn((2, *input_shape))  # 2, not 1: batch 1 would be specialised
    program = torch.export.export(net, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EXPORT_FILE
    torch.export.save(program, path)
    (directory / INPUT_NOTE).write_text(json.dumps({
        "input_shape": ["batch", *map(int, input_shape)], "dtype": "float32", "max_batch": max_batch,
        "load": "torch.export.load('exported.pt2').module()(images)",
        **({"network": dict(network)} if network else {}),
    }, indent=1))
    return path


def load_exported(path: str | Path) -> nn.Module:
    """The callable module of an exported file (what a user without this project does)."""
    return torch.export.load(str(path)).module()


# --- ternary weights packed at 2 bits -------------------------------------------------------
# Code of each weight, 2 bits: 0 -> 0, 1 -> +1, 2 -> -1 (3 unused); four weights per byte,
# the first in the lowest bits. Alpha (per layer or per filter) stays float32.


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (any shape, values in {-1, 0, +1}) as 2-bit fields, four per uint8."""
    flat = codes.reshape(-1).to(torch.int16)
    if bool(((flat < -1) | (flat > 1)).any()):
        raise ValueError("ternary codes must be -1, 0 or +1")
    two_bit = torch.where(flat < 0, torch.full_like(flat, 2), flat).to(torch.uint8)
    pad = (-two_bit.numel()) % 4
    two_bit = torch.cat([two_bit, two_bit.new_zeros(pad)]).view(-1, 4)
    return (two_bit[:, 0] | (two_bit[:, 1] << 2) | (two_bit[:, 2] << 4) | (two_bit[:, 3] << 6)).contiguous()


def unpack_codes(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    fields = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:n].to(torch.int8)
    if bool((fields == 3).any()):
        raise ValueError("corrupt 2-bit codes: field value 3 does not occur in a ternary network")
    return torch.where(fields == 2, torch.full_like(fields, -1), fields).view(*[int(d) for d in shape])


@torch.no_grad()
def pack_2bit(model: nn.Module) -> dict:
    """The network with its ternary weights packed at 2 bits: plain data for ``torch.save``.

    ``{"format", "version", "packed": {state-dict key: {"codes", "shape", "alpha"}},
    "tensors": {every other state-dict key: tensor}, "packed_bytes", "float32_bytes"}``;
    the keys are those of :func:`deployable` (model)'s state dict. ``packed_bytes`` counts
    the bytes of the tensors stored (codes, alphas, everything else in its dtype);
    ``float32_bytes`` what the same network takes with every float weight in float32.
    Raises ``FloatingPointError`` if any tensor is not finite (nothing is written then).
    """
    packed: dict[str, dict] = {}
    skip: set[str] = set()
    for name, m in model.named_modules():
        if callable(getattr(m, "codes_and_scale", None)):
            codes, alpha = m.codes_and_scale()
            key = f"{name}.weight" if name else "weight"
            packed[key] = {"codes": pack_codes(codes.cpu()), "shape": list(codes.shape),
                           "alpha": alpha.detach().float().cpu().contiguous()}
            skip.add(key)
    plain = deployable(model).state_dict()
    tensors = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu()
               for k, v in plain.items() if k not in skip}
    for k, t in [*tensors.items(), *((k, e["alpha"]) for k, e in packed.items())]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"2-bit export: {k} is not finite")
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    stored += sum(e["codes"].numel() + e["alpha"].numel() * 4 for e in packed.values())
    float32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in plain.values())
    return {"format": PACKED_FORMAT, "version": 1, "packed": packed, "tensors": tensors,
            "packed_bytes": int(stored), "float32_bytes": int(float32)}


def write_2bit(model: nn.Module, path: str | Path) -> Path:
    """:func:`pack_2bit` of ``model``, saved at ``path`` (a ``torch.save`` file)."""
    payload = pack_2bit(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_2bit(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain float32 state dict of a 2-bit file: each ternary weight is ``codes * alpha``
    (the formula the ternary layers use, so the weights are bit-identical)."""
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path} is not a {PACKED_FORMAT} file")
    out = dict(data["tensors"])
    for key, entry in data["packed"].items():
        codes = unpack_codes(entry["codes"], entry["shape"])
        out[key] = (codes.to(torch.float32) * entry["alpha"].to(torch.float32)).contiguous()
    return out
