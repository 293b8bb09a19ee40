"""Writes assets/reference/trainer.json: AdamW, EMA and learning-rate schedules by PyTorch and
diffusers, for the trainer's tests.

    venv/bin/python scripts/reference/trainer_fixtures.py

- `adamw`: torch.optim.AdamW (foreach=False) on a 7-element parameter for 4 steps with given
  gradients; lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.1 and 0 (Adam).
- `ema_decay`: diffusers.training_utils.EMAModel.get_decay(step) for several settings.
- `ema_steps`: EMAModel.step on a parameter over 4 updates (the shadow after each).
- `lr`: diffusers.optimization.get_scheduler("cosine" / "constant_with_warmup") multipliers.
- `losses`: l1_loss, mse_loss and huber_loss(delta=0.5) on given vectors.
"""
import json
import os

import torch
import diffusers
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main():
    g = torch.Generator().manual_seed(11)
    p0 = torch.randn(7, generator=g)
    grads = [torch.randn(7, generator=g) for _ in range(4)]
    out = {"meta": {"generator": "scripts/reference/trainer_fixtures.py", "torch": torch.__version__,
                    "diffusers": diffusers.__version__}}

    out["adamw"] = []
    for wd in (0.1, 0.0):
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False)
        after = []
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
            after.append(p.detach().tolist())
        out["adamw"].append({"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": wd,
                             "param": p0.tolist(), "grads": [x.tolist() for x in grads], "after": after})

    out["ema_decay"] = []
    for kw in (dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4),
               dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, min_decay=0.5),
               dict(decay=0.995, use_ema_warmup=True, inv_gamma=2.0, power=0.5, update_after_step=5),
               dict(decay=0.999, use_ema_warmup=False)):
        ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], **kw)
        steps = [0, 1, 2, 3, 6, 10, 100, 1000, 10000, 100000]
        out["ema_decay"].append({"settings": kw, "steps": steps, "decay": [ema.get_decay(s) for s in steps]})

    p = torch.nn.Parameter(p0.clone())
    ema = EMAModel([p], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    shadows = []
    for gr in grads:
        with torch.no_grad():
            p.add_(gr)
        ema.step([p])
        shadows.append(ema.shadow_params[0].tolist())
    out["ema_steps"] = {"settings": {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75},
                        "param": p0.tolist(), "increments": [x.tolist() for x in grads], "shadow": shadows}

    out["lr"] = []
    for name in ("cosine", "constant_with_warmup"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, optimizer=opt, num_warmup_steps=10, num_training_steps=100)
        lrs = []
        for _ in range(101):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out["lr"].append({"name": name, "warmup": 10, "total": 100, "multipliers": lrs})

    a, b = torch.randn(12, generator=g), torch.randn(12, generator=g) * 0.3
    out["losses"] = {"pred": a.tolist(), "target": b.tolist(),
                     "l1": torch.nn.functional.l1_loss(a, b).item(),
                     "l2": torch.nn.functional.mse_loss(a, b).item(),
                     "huber_delta": 0.5,
                     "huber": torch.nn.functional.huber_loss(a, b, delta=0.5).item()}
    with open(os.path.join(ROOT, "assets", "reference", "trainer.json"), "w") as f:
        json.dump(out, f)
    print("wrote trainer.json")


if __name__ == "__main__":
    main()
