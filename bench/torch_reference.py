"""The seed's SimpleUnet in PyTorch, timed the way `ddpm-bench` times ours.

One configuration and one kind of step per process; prints one JSON line with the same keys
as `ddpm-bench`. A training step: draw x_0, timesteps and noise, noise x_0, predict the noise in
training mode, L1 loss, backward, an Adam step (lr 1e-3). A sampling step: one forward pass in
eval mode under no_grad plus one DDPM ancestral update (posterior variance). The model is the
seed tutorial's, written out here by us.

    python bench/torch_reference.py --config small --mode train --steps 5
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, in_ch, out_ch, time_emb_dim, up=False):
        super().__init__()
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        if up:
            self.conv1 = nn.Conv2d(2 * in_ch, out_ch, 3, padding=1)
            self.transform = nn.ConvTranspose2d(out_ch, out_ch, 4, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.transform = nn.Conv2d(out_ch, out_ch, 4, 2, 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bnorm1 = nn.BatchNorm2d(out_ch)
        self.bnorm2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x, t):
        h = self.bnorm1(self.relu(self.conv1(x)))
        time_emb = self.relu(self.time_mlp(t))[(...,) + (None,) * 2]
        h = h + time_emb
        h = self.bnorm2(self.relu(self.conv2(h)))
        return self.transform(h)


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=time.device) * -scale)
        args = time[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class SimpleUnet(nn.Module):
    def __init__(self, image_channels, down_channels, time_emb_dim=32):
        super().__init__()
        up_channels = down_channels[::-1]
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(time_emb_dim),
            nn.Linear(time_emb_dim, time_emb_dim),
            nn.ReLU(),
        )
        self.conv0 = nn.Conv2d(image_channels, down_channels[0], 3, padding=1)
        self.downs = nn.ModuleList(
            Block(down_channels[i], down_channels[i + 1], time_emb_dim)
            for i in range(len(down_channels) - 1)
        )
        self.ups = nn.ModuleList(
            Block(up_channels[i], up_channels[i + 1], time_emb_dim, up=True)
            for i in range(len(up_channels) - 1)
        )
        self.output = nn.Conv2d(up_channels[-1], image_channels, 1)

    def forward(self, x, timestep):
        t = self.time_mlp(timestep)
        x = self.conv0(x)
        residuals = []
        for down in self.downs:
            x = down(x, t)
            residuals.append(x)
        for up in self.ups:
            x = torch.cat((x, residuals.pop()), dim=1)
            x = up(x, t)
        return self.output(x)


CONFIGS = {
    # name: (image channels, down channels, size, batch)
    "small": (1, (32, 64, 128, 256), 32, 64),
    "seed": (3, (64, 128, 256, 512, 1024), 64, 8),
}


def forward_macs(c, down, size, t=32):
    conv = lambda cin, cout, k, out: out * out * cin * cout * k * k
    macs = conv(c, down[0], 3, size) + t * t
    r = size
    for i, o in zip(down, down[1:]):
        macs += conv(i, o, 3, r) + conv(o, o, 3, r) + t * o
        r //= 2
        macs += conv(o, o, 4, r)
    up = down[::-1]
    for i, o in zip(up, up[1:]):
        macs += conv(2 * i, o, 3, r) + conv(o, o, 3, r) + t * o
        macs += conv(o, o, 4, r)
        r *= 2
    return macs + conv(up[-1], c, 1, r)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", choices=CONFIGS, required=True)
    p.add_argument("--mode", choices=("train", "sample"), required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(0)
    c, down, s, b = CONFIGS[a.config]
    model = SimpleUnet(c, list(down))
    T = 300
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = F.pad(abar[:-1], (1, 0), value=1.0)
    post_var = (betas * (1 - abar_prev) / (1 - abar)).float()
    sqrt_ab, sqrt_1mab = abar.sqrt().float(), (1 - abar).sqrt().float()
    recip_sqrt_alpha = (1 / alphas.sqrt()).float()
    eps_coef = (betas / (1 - abar).sqrt()).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(b, c, s, s)
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        if a.mode == "train":
            model.train()
            x0 = torch.randn(b, c, s, s)
            t = torch.randint(0, T, (b,))
            noise = torch.randn_like(x0)
            x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
            loss = F.l1_loss(model(x_t, t), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        else:
            model.eval()
            ti = T - 1 - i % T
            with torch.no_grad():
                t = torch.full((b,), ti, dtype=torch.long)
                eps = model(x, t)
                mean = recip_sqrt_alpha[ti] * (x - eps_coef[ti] * eps)
                x = mean + post_var[ti].sqrt() * torch.randn_like(x) if ti > 0 else mean
                x[0, 0, 0, 0].item()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    times_sorted = sorted(times)
    n = len(times_sorted)
    med = times_sorted[n // 2] if n % 2 else (times_sorted[n // 2 - 1] + times_sorted[n // 2]) / 2
    flop = 2 * forward_macs(c, down, s) * (3 if a.mode == "train" else 1) * b
    print(json.dumps({
        "impl": "torch",
        "torch_version": torch.__version__,
        "config": a.config,
        "mode": a.mode,
        "batch": b,
        "threads": torch.get_num_threads(),
        "step_s": med,
        "steps_s": times,
        "images_per_s": b / med,
        "gflop": flop / 1e9,
        "gflop_per_s": flop / 1e9 / med,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
