"""Makes preresnet_slimming.pt: what the authors' resprune.py decides and computes on their
pre-activation ResNet with seeded weights. Not run by the suite; it contains none of the
authors' code: it reads their files.

    git -C <network-slimming checkout> show b395dc07521cbc38f741d971a18fe3f6423c9ab1:resprune.py > /tmp/ns/resprune.py
    git -C <network-slimming checkout> show b395dc07521cbc38f741d971a18fe3f6423c9ab1:models/preresnet.py > /tmp/ns/preresnet.py
    git -C <network-slimming checkout> show b395dc07521cbc38f741d971a18fe3f6423c9ab1:models/channel_selection.py > /tmp/ns/channel_selection.py
    sed -i 's/from .channel_selection/from channel_selection/' /tmp/ns/preresnet.py
    cd /tmp/ns && python <project>/tests/methods/reference/make_preresnet_reference.py <project>/tests/methods/reference

resprune.py's lines from ``total = 0`` to ``pruned_ratio = pruned/total`` (the threshold and
the masks; ``.cuda()`` removed: CPU) and from ``old_modules = list(model.modules())`` to the
``torch.save`` (copying the kept weights into ``resnet(depth, cfg=cfg)``) run unchanged.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, ".")
from channel_selection import channel_selection  # noqa: E402  (the authors')
from preresnet import resnet  # noqa: E402  (the authors')

out_dir = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("ref_test", out_dir.parent / "test_reference_preresnet.py")
ref_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref_test)

lines = Path("resprune.py").read_text().splitlines()


def between(start: str, end: str) -> str:
    i = next(k for k, line in enumerate(lines) if line.startswith(start))
    j = next(k for k, line in enumerate(lines) if k > i and line.startswith(end))
    return "\n".join(lines[i:j]).replace(".cuda()", "")


thresholds = between("total = 0", "pruned_ratio = pruned/total")
copy_weights = between("old_modules = list(model.modules())", "torch.save(")
cases = []
for depth, percent, seed in ((20, 0.4, 0), (20, 0.6, 1), (164, 0.4, 2)):
    model = resnet(depth=depth, dataset="cifar10")
    ref_test.fill(model, seed)
    scope = {"model": model, "torch": torch, "nn": nn, "np": np, "args": type("A", (), {"percent": percent})}
    exec(thresholds, scope)
    cfg = scope["cfg"]
    newmodel = resnet(depth=depth, dataset="cifar10", cfg=cfg)
    scope.update(newmodel=newmodel, channel_selection=channel_selection)
    exec(copy_weights, scope)
    newmodel.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        logits = newmodel(images)
    kept = [torch.nonzero(m).flatten().tolist() for m in scope["cfg_mask"]]
    cases.append({"depth": depth, "percent": percent, "seed": seed, "threshold": float(scope["thre"]), "cfg": cfg,
                  "kept": kept, "images": images, "logits": logits,
                  "parameters": sum(p.numel() for n, p in newmodel.named_parameters() if not n.endswith("indexes"))})
    print(depth, percent, seed, "pruned", float(scope["pruned"]) / scope["total"], "params", cases[-1]["parameters"])
torch.save({"repository": "Eric-mingjie/network-slimming", "commit": "b395dc07521cbc38f741d971a18fe3f6423c9ab1",
            "cases": cases}, out_dir / "preresnet_slimming.pt")
