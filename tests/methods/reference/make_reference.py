"""Generator of reference/slimming.pt and reference/soft_pruning.pt. NOT run by the test suite.

It runs the authors' own selection code on seeded inputs and saves what it decides
(also l1_filter.pt and edge_popup.pt). Their code is
not in this file: it is read at run time from their files, which must sit in the working
directory (see README.md for the repositories, commits and the exact commands):

  resprune.py                  Eric-mingjie/network-slimming: the lines from ``total = 0`` to the
                               print after ``pruned_ratio``, executed unchanged but for
                               ``.float().cuda()`` -> ``.float()`` (CPU)
  pruning_train.py             he-y/soft-filter-pruning: ``class Mask`` executed unchanged, and the
                               epoch loop's masking condition, read by a regular expression
  pruning_cifar10_resnet.py    he-y/soft-filter-pruning: ``class Mask`` executed unchanged
  sfp_models/resnet.py, res_utils.py (empty __init__.py): their CIFAR ResNet-20, for its layer order
  res56prune.py, res110prune.py Eric-mingjie/rethinking-network-pruning cifar/l1-norm-pruning: the
                               lines from ``skip = {`` to ``newmodel = resnet(``, executed unchanged;
                               l1_models/resnet.py (empty __init__.py) their ResNet
  conv_type.py                 allenai/hidden-networks utils/conv_type.py: ``class GetSubnet``,
                               executed unchanged

Usage: python make_reference.py OUT_DIR
"""
import argparse, json, re, sys, types
import numpy as np
import torch
import torch.nn as nn
import torchvision

OUT = sys.argv[1]
SLIM_REPO = ("Eric-mingjie/network-slimming", "b395dc07521cbc38f741d971a18fe3f6423c9ab1")
SFP_REPO = ("he-y/soft-filter-pruning", "919c3998eeff06cf9f15f7c6087b5c283a5ac6dc")


def between(path, start, end):
    text = open(path).read()
    a = text.index(start)
    b = text.index(end, a)
    return text[a:b]


# ---------------- Network Slimming: resprune.py, "total = 0" .. "pruned_ratio = pruned/total" ------
SLIM_CODE = between("resprune.py", "total = 0\n", "print('Pre-processing Successful!')")
# The one change for a CPU-only, current torch: the mask is not moved to CUDA.
SLIM_CODE_RUN = SLIM_CODE.replace(".float().cuda()", ".float()")
assert SLIM_CODE_RUN.count(".cuda()") == 0


def authors_slimming(model, percent):
    ns = {"torch": torch, "nn": nn, "model": model, "args": argparse.Namespace(percent=percent), "print": lambda *a, **k: None}
    exec(SLIM_CODE_RUN, ns)
    return float(ns["thre"]), [m.bool().logical_not().nonzero().flatten().tolist() for m in ns["cfg_mask"]]


def bn_stack(sizes):
    return nn.Sequential(*[nn.BatchNorm2d(n) for n in sizes])


def fill_gammas(model, seed, residual_scale=None, residual=()):
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, m in enumerate(bns):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
            if residual_scale is not None and i in residual:
                m.weight.mul_(residual_scale)
    return [m.weight.detach().clone() for m in bns]


RESNET20 = [16] + [16, 16] * 3 + [32, 32] * 3 + [64, 64] * 3     # stem bn1, then each block's bn1, bn2
RESNET20_STREAM = [0] + [2 * b + 2 for b in range(9)]             # stem bn1 and every block's bn2

slim_cases = {}
for name, arch, percent, seed, scale in [
        ("resnet20_p50", "cifar_resnet20", 0.5, 0, None),
        ("resnet20_p50_small_stream", "cifar_resnet20", 0.5, 1, 0.5),
        ("resnet20_p30", "cifar_resnet20", 0.3, 2, None),
        ("resnet18_p40", "resnet18", 0.4, 3, None),
        ("vgg16_bn_p70", "vgg16_bn", 0.7, 4, None)]:
    if arch == "cifar_resnet20":
        model = bn_stack(RESNET20)
    elif arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = torchvision.models.vgg16_bn(num_classes=10)
    gammas = fill_gammas(model, seed, scale, RESNET20_STREAM if scale else ())
    thre, zeroed = authors_slimming(model, percent)
    slim_cases[name] = {"model": arch, "percent": percent, "seed": seed, "gammas": gammas,
                        "sizes": [g.numel() for g in gammas],
                        "threshold": thre, "zeroed": zeroed}
torch.save({"repository": SLIM_REPO[0], "commit": SLIM_REPO[1], "script": "resprune.py",
            "cases": slim_cases}, f"{OUT}/slimming.pt")
for k, v in slim_cases.items():
    n = sum(g.numel() for g in v["gammas"]); z = sum(len(x) for x in v["zeroed"])
    print("slim", k, n, z, int(n * v["percent"]) + 1, v["threshold"])


# ---------------- Soft filter pruning: the Mask classes and the epoch loop's condition ------------
def mask_class(path, args):
    src = between(path, "class Mask", "\nif __name__ == '__main__':") if "pruning_train" in path else \
        between(path, "class Mask", "\nif __name__ == '__main__':")
    ns = {"np": np, "torch": torch, "args": args, "print": lambda *a, **k: None}
    exec(src, ns)
    return ns["Mask"]


def fill_convs(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))


def run_mask(Mask, model, rate):
    m = Mask(model)
    m.init_length()
    m.model = model
    m.init_mask(rate)
    m.do_mask()
    names = [n for n, _ in model.named_parameters()]
    zeroed = {}
    convs = [[n, list(w.shape)] for n, w in model.named_parameters() if w.dim() == 4]
    for index in m.mask_index:
        w = list(model.parameters())[index]
        dead = (w.detach().flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
        zeroed[names[index]] = dead
    return zeroed, convs


sfp_cases = {}
# ImageNet ResNet-18, pruning_train.py (scripts/train-resnet18-prune.sh: --rate 0.7 --layer_begin 0
# --layer_end 57 --layer_inter 3), skip_downsample 1 (the default) and 0.
for skip in (1, 0):
    args = argparse.Namespace(arch="resnet18", layer_begin=0, layer_end=57, layer_inter=3, skip_downsample=skip,
                              use_cuda=False)
    model = torchvision.models.resnet18(num_classes=10)
    fill_convs(model, 10)
    zeroed, convs = run_mask(mask_class("pruning_train.py", args), model, 0.7)
    sfp_cases[f"resnet18_skip{skip}"] = {"model": "resnet18", "seed": 10, "authors_rate": 0.7,
                                         "skip_downsample": bool(skip), "convs": convs, "zeroed": zeroed}
# CIFAR ResNet-20, pruning_cifar10_resnet.py (scripts/cifar10_resnet.sh with layer_end 54 for resnet20).
sys.path.insert(0, ".")
sfp_models = __import__("sfp_models.resnet", fromlist=["resnet20"])
args = argparse.Namespace(arch="resnet20", layer_begin=0, layer_end=54, layer_inter=3, use_cuda=False)
for rate in (0.7, 0.6):
    model = sfp_models.resnet20(10)
    fill_convs(model, 11)
    zeroed, convs = run_mask(mask_class("pruning_cifar10_resnet.py", args), model, rate)
    sfp_cases[f"resnet20_rate{rate}"] = {"model": "cifar_resnet20", "seed": 11, "authors_rate": rate,
                                         "skip_downsample": True, "convs": convs, "zeroed": zeroed}

# The epoch loop (both scripts): one call before training, then after epoch e when
# (epoch % args.epoch_prune == 0 or epoch == args.epochs - 1).
loop_src = open("pruning_train.py").read()
cond = re.search(r"if \((epoch % args\.epoch_prune == 0 or epoch == args\.epochs - 1)\):", loop_src).group(1)
schedules = []
for epochs, k in [(5, 1), (10, 3), (7, 2), (6, 4), (4, 10)]:
    a = argparse.Namespace(epochs=epochs, epoch_prune=k, start_epoch=0)
    calls = ["before"] + [e for e in range(a.start_epoch, a.epochs) if eval(cond, {"args": a, "epoch": e})]
    schedules.append({"epochs": epochs, "epoch_prune": k, "calls": calls})
torch.save({"repository": SFP_REPO[0], "commit": SFP_REPO[1],
            "scripts": ["pruning_train.py", "pruning_cifar10_resnet.py"],
            "cases": sfp_cases, "schedules": schedules}, f"{OUT}/soft_pruning.pt")
for k, v in sfp_cases.items():
    print("sfp", k, sum(len(x) for x in v["zeroed"].values()), len(v["zeroed"]))
print(schedules)


# ---------------- L1-norm filter pruning: rethinking-network-pruning cifar/l1-norm-pruning ---------
L1_REPO = ("Eric-mingjie/rethinking-network-pruning", "2ac473d70a09810df888e932bb394f225f9ed2d1")
l1_models = __import__("l1_models.resnet", fromlist=["resnet"])
l1_cases = {}
for script, depth in (("res56prune.py", 56), ("res110prune.py", 110)):
    code = between(script, "skip = {", "newmodel = resnet(")
    for v in ("A", "B"):
        model = l1_models.resnet(depth=depth, dataset="cifar10")
        fill_convs(model, 20 + depth)
        ns = {"torch": torch, "nn": nn, "np": np, "model": model, "args": argparse.Namespace(v=v)}
        exec(code, ns)
        convs = [[n, list(m.weight.shape)] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        # cfg_mask has an entry for each conv the loop looks at: a skipped layer or an even one.
        looked = [lid for lid in range(1, len(convs) + 1) if lid in ns["skip"][v] or lid % 2 == 0]
        assert len(looked) == len(ns["cfg_mask"])
        removed = {convs[lid - 1][0]: (mask == 0).nonzero().flatten().tolist() for lid, mask in zip(looked, ns["cfg_mask"])}
        l1_cases[f"resnet{depth}_{v}"] = {"model": f"cifar_resnet{depth}", "seed": 20 + depth, "v": v,
                                          "skip": ns["skip"][v], "prune_prob": ns["prune_prob"][v],
                                          "convs": convs, "removed": removed}
torch.save({"repository": L1_REPO[0], "commit": L1_REPO[1],
            "scripts": ["cifar/l1-norm-pruning/res56prune.py", "cifar/l1-norm-pruning/res110prune.py"],
            "cases": l1_cases}, f"{OUT}/l1_filter.pt")
for k, v in l1_cases.items():
    print("l1", k, sum(len(x) for x in v["removed"].values()))


# ---------------- edge-popup: hidden-networks utils/conv_type.py GetSubnet -------------------------
EP_REPO = ("allenai/hidden-networks", "dddf2d093de568fc76d460a77fa2650e56e79c1a")
ns = {"torch": torch, "autograd": torch.autograd}
exec(between("conv_type.py", "class GetSubnet", "# Not learning weights, finding subnet"), ns)
GetSubnet = ns["GetSubnet"]
ep_cases = []
g = torch.Generator().manual_seed(30)
for shape in [(16, 3, 3, 3), (10,), (7, 5), (8, 4, 3, 3), (10, 64)]:
    for k in (0.5, 0.33, 0.1, 0.7, 0.05):
        scores = torch.randn(shape, generator=g).requires_grad_(True)
        out = GetSubnet.apply(scores.abs(), k)              # SubnetConv: GetSubnet.apply(self.clamped_scores, ...)
        grad = torch.randn(shape, generator=g)
        out.backward(grad)
        ep_cases.append({"shape": list(shape), "k": k, "scores": scores.detach().clone(),
                         "mask": out.detach().bool(), "upstream": grad, "score_grad": scores.grad.clone()})
torch.save({"repository": EP_REPO[0], "commit": EP_REPO[1], "script": "utils/conv_type.py (GetSubnet, SubnetConv)",
            "cases": ep_cases}, f"{OUT}/edge_popup.pt")
print("ep", [(c["shape"], c["k"], int(c["mask"].sum())) for c in ep_cases][:10])
