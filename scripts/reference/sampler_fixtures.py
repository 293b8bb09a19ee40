"""Writes the sampler fixtures with diffusers' DDPMScheduler and DDIMScheduler.

    venv/bin/python scripts/reference/sampler_fixtures.py

Outputs (float32, NCHW flattened, shapes beside them):
- assets/reference/samplers.json
  - `ddim_timesteps`: set_timesteps for T in {1000, 300}, 50 and 10 steps, every spacing,
    steps_offset 0 and 1.
  - `ddim_steps`: DDIMScheduler.step with pinned `variance_noise`, eta 0 and 1, every
    prediction type, clip on and off, set_alpha_to_one on and off.
  - `ddpm_steps`: DDPMScheduler.step with the step noise pinned, fixed_small and fixed_large,
    every prediction type, and a 10-step schedule (prev_t = the next timestep in the list).
  Each step is run twice: as diffusers runs it (float32), and with the same diffusers code on
  float64 tensors and a float64 schedule (`*_f64`). At small t diffusers' float32 `1 - abar`
  cancels and moves its result by up to ~2e-4; the float64 run is the exact value.
  - `ddim_dummy_loop`: diffusers' own `test_full_loop_no_noise`: 10 steps, eta 0, the dummy
    model `x * t / (t + 1)` on `arange(4*3*8*8)/N`; sum |x| and mean |x|, and the result.
- assets/reference/unet/ddim_pipeline/: a DDIMPipeline run of the legacy_tiny U-Net from
  given initial noise, eta 0, 20 steps: `noise`, `output` (the last prev_sample) and
  `images` ((x / 2 + 0.5).clamp(0, 1)), with the scheduler_config.json the pipeline used.
  Why legacy_tiny: a 20-step DDIM run amplifies float rounding through an untrained U-Net;
  diffusers' own float32 and float64 runs differ by 2.3e-3 with diffusers_tiny (so no float32
  implementation can be held to 1e-3 there) and by 3.3e-4 with legacy_tiny.
"""
import json
import os

import numpy as np
import torch
import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
REF = os.path.join(ROOT, "assets", "reference")


def flat(t):
    return [float(np.float32(v)) for v in t.detach().reshape(-1).tolist()]


def to_f64(s, T):
    """The same scheduler on a float64 schedule (linear 1e-4..0.02 here)."""
    b = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    s.betas = b
    s.alphas = 1.0 - b
    s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = s.one if s.config.set_alpha_to_one else s.alphas_cumprod[0]
    return s


def exact(v):
    return [float(x) for x in v.detach().reshape(-1).tolist()]


def main():
    g = torch.Generator().manual_seed(4321)
    shape = (2, 1, 4, 4)
    sample = torch.randn(shape, generator=g)
    model_output = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    out = {
        "meta": {
            "generator": "scripts/reference/sampler_fixtures.py",
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
        },
        "shape": list(shape),
        "sample": flat(sample),
        "model_output": flat(model_output),
        "noise": flat(noise),
    }

    out["ddim_timesteps"] = []
    for T in (1000, 300):
        for n in (50, 10):
            for spacing in ("leading", "trailing", "linspace"):
                for offset in (0, 1):
                    s = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                    s.set_timesteps(n)
                    out["ddim_timesteps"].append({
                        "num_train_timesteps": T, "num_inference_steps": n, "timestep_spacing": spacing,
                        "steps_offset": offset, "timesteps": s.timesteps.tolist(),
                    })

    out["ddim_steps"] = []
    for prediction in ("epsilon", "sample", "v_prediction"):
        for clip in (False, True):
            for set_alpha_to_one in (True, False):
                cfg = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                           prediction_type=prediction, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
                s = DDIMScheduler(**cfg)
                s.set_timesteps(50)
                s64 = to_f64(DDIMScheduler(**cfg), 1000)
                s64.set_timesteps(50)
                for t in (961, 501, 21, 1):
                    for eta in (0.0, 1.0):
                        r = s.step(model_output, t, sample, eta=eta, variance_noise=noise)
                        r64 = s64.step(model_output.double(), t, sample.double(), eta=eta,
                                       variance_noise=noise.double())
                        out["ddim_steps"].append({
                            "config": cfg, "num_inference_steps": 50, "t": t, "eta": eta,
                            "prev_sample": flat(r.prev_sample),
                            "pred_original_sample": flat(r.pred_original_sample),
                            "prev_sample_f64": exact(r64.prev_sample),
                            "pred_original_sample_f64": exact(r64.pred_original_sample),
                        })

    pinned = {"noise": noise}
    ddpm_module.randn_tensor = lambda *a, **k: pinned["noise"].clone()
    out["ddpm_steps"] = []
    for variance_type in ("fixed_small", "fixed_large"):
        for prediction in ("epsilon", "sample", "v_prediction"):
            for n in (None, 10):
                cfg = dict(num_train_timesteps=300, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                           clip_sample=True, variance_type=variance_type, prediction_type=prediction)
                s = DDPMScheduler(**cfg)
                s64 = to_f64(DDPMScheduler(**cfg), 300)
                if n is not None:
                    s.set_timesteps(n)
                    s64.set_timesteps(n)
                ts = (299, 150, 1, 0) if n is None else tuple(int(t) for t in s.timesteps[[0, 5, 9]])
                for t in ts:
                    pinned["noise"] = noise
                    r = s.step(model_output, t, sample)
                    pinned["noise"] = noise.double()
                    r64 = s64.step(model_output.double(), t, sample.double())
                    out["ddpm_steps"].append({
                        "config": cfg, "num_inference_steps": n, "t": t,
                        "prev_sample": flat(r.prev_sample),
                        "pred_original_sample": flat(r.pred_original_sample),
                        "prev_sample_f64": exact(r64.prev_sample),
                        "pred_original_sample_f64": exact(r64.pred_original_sample),
                    })

    # diffusers' tests/schedulers/test_scheduler_ddim.py::test_full_loop_no_noise
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True)
    n_el = 4 * 3 * 8 * 8
    x = (torch.arange(n_el).reshape(3, 8, 8, 4) / n_el).permute(3, 0, 1, 2)
    s.set_timesteps(10)
    for t in s.timesteps:
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype)
        x = s.step(x * tt / (tt + 1), t, x, 0.0).prev_sample
    out["ddim_dummy_loop"] = {
        "num_inference_steps": 10, "eta": 0.0, "timesteps": s.timesteps.tolist(),
        "sum_abs": float(x.abs().sum()), "mean_abs": float(x.abs().mean()),
        "shape": list(x.shape), "result": flat(x),
    }
    with open(os.path.join(REF, "samplers.json"), "w") as f:
        json.dump(out, f)
    print("dummy loop", out["ddim_dummy_loop"]["sum_abs"], out["ddim_dummy_loop"]["mean_abs"])

    unet = UNet2DModel.from_pretrained(os.path.join(REF, "unet", "legacy_tiny")).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    init = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(99))
    pipe.scheduler.set_timesteps(20)
    x = init.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    images = (x / 2 + 0.5).clamp(0, 1)
    folder = os.path.join(REF, "unet", "ddim_pipeline")
    os.makedirs(folder, exist_ok=True)
    pipe.scheduler.save_config(folder)
    save_file({"noise": init.contiguous(), "output": x.contiguous(), "images": images.contiguous()},
              os.path.join(folder, "io.safetensors"))
    print("ddim pipeline", tuple(x.shape), float(x.abs().mean()))


if __name__ == "__main__":
    main()
