"""The final network as a file that loads with nothing but torch.

:func:`export_model` traces the eval-mode network with ``torch.export`` (batch size left
dynamic) and saves the program with ``torch.export.save``. Loading needs no code of this
project, pruned or not, masked or not::

    import torch
    net = torch.export.load("model.pt2").module()
    logits = net(images)          # float32, (N, C, H, W), normalised as in training

The file holds the graph and the weights; ``exported.json`` beside it records the input
shape it was traced with and how to load it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.export import Dim

EXPORT_FILE = "exported.pt2"
INPUT_NOTE = "exported.json"


def export_model(model: nn.Module, input_shape: Sequence[int], directory: str | Path,
                 max_batch: int = 4096) -> Path:
    """Export ``model`` (a CPU, eval-mode copy of it) to ``directory/exported.pt2``.

    ``input_shape`` is one input's (C, H, W). Any batch from 1 to ``max_batch`` works.
    Returns the path. Also writes ``exported.json`` (input shape, dtype, how to load).
    """
    net = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = torch.randn((2, *input_shape))  # 2, not 1: batch 1 would be specialised
    program = torch.export.export(net, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EXPORT_FILE
    torch.export.save(program, path)
    (directory / INPUT_NOTE).write_text(json.dumps({
        "input_shape": ["batch", *map(int, input_shape)], "dtype": "float32", "max_batch": max_batch,
        "load": "torch.export.load('exported.pt2').module()(images)",
    }, indent=1))
    return path


def load_exported(path: str | Path) -> nn.Module:
    """The callable module of an exported file (what a user without this project does)."""
    return torch.export.load(str(path)).module()
