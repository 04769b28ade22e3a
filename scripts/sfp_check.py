"""Soft filter pruning without DDP, Ray or FFCV: the small CNN on scikit-learn digits in plain PyTorch,
12 epochs of 12 steps, with and without zeroing 30% of each conv layer's filters after every epoch
(and once more with BatchNorm statistics recomputed after each zeroing). It validates right
after each zeroing, which the training loop does not (it validates before the method's epoch-end
hook): the numbers it prints are those of the just-zeroed network, where a zeroed filter's
BatchNorm shift still feeds a constant forward (RESULTS.md, soft filter pruning). Prints (mean
train loss, val top-1) per epoch.

    .venv/bin/python scripts/sfp_check.py
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from we_dist.models import create_model
from we_dist.methods.soft_pruning import soft_prune
torch.manual_seed(0); torch.set_num_threads(1)
d=load_digits(); X=torch.tensor(d.images,dtype=torch.float32)[:,None]/16; X=F.interpolate(X,size=32).repeat(1,3,1,1); X=(X-X.mean())/X.std(); y=torch.tensor(d.target)
Xtr,ytr,Xva,yva=X[:1437],y[:1437],X[1437:],y[1437:]
def run(rate, bn_recal=False):
    torch.manual_seed(0); m=create_model("small_cnn",num_classes=10)
    opt=torch.optim.SGD(m.parameters(),lr=0.1,momentum=0.9,nesterov=True,weight_decay=5e-4)
    out=[]
    for ep in range(12):
        lr=0.1 if ep<6 else 0.01 if ep<9 else 0.001
        for g in opt.param_groups: g['lr']=lr
        m.train(); perm=torch.randperm(1437); tl=0
        for i in range(0,1437,128):
            idx=perm[i:i+128]; loss=F.cross_entropy(m(Xtr[idx]),ytr[idx]); opt.zero_grad(); loss.backward(); opt.step(); tl+=loss.item()
        if rate: soft_prune(m,rate)
        if bn_recal:
            m.train()
            with torch.no_grad():
                for i in range(0,1437,128): m(Xtr[i:i+128])
        m.eval()
        with torch.no_grad(): acc=(m(Xva).argmax(1)==yva).float().mean().item()
        out.append((round(tl/12,2),round(acc,3)))
    return out
print("none", run(0))
print("sfp0.3", run(0.3))
print("sfp0.3+bnrecal", run(0.3,True))
