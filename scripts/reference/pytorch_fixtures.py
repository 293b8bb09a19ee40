"""Writes PyTorch-format and half-precision copies of two committed U-Net fixtures, so the
Rust tests read files PyTorch itself wrote:

    python -m venv venv && venv/bin/pip install torch safetensors numpy
    venv/bin/python scripts/reference/pytorch_fixtures.py

- assets/reference/unet/seed_small/model.pt: `torch.save(state_dict)` of the seed's SimpleUnet
  fixture, as the seed tutorial saves its model (the zip format of torch >= 1.6).
- assets/reference/unet/diffusers_tiny_bin/: the diffusers_tiny UNet2DModel folder with its
  weights as diffusion_pytorch_model.bin (`save_pretrained(safe_serialization=False)` writes
  that file with torch.save), and no safetensors file.
- assets/reference/unet/diffusers_tiny/diffusion_pytorch_model.fp16.safetensors and
  .bf16.safetensors: the same weights cast as `variant="fp16"` files are.

The tensors are the committed safetensors ones, so each copy must load to the same values
(exactly in f32; rounded as PyTorch rounds for f16 and bf16).
"""
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "reference", "unet")


def main():
    seed = load_file(os.path.join(ROOT, "seed_small", "model.safetensors"))
    torch.save(seed, os.path.join(ROOT, "seed_small", "model.pt"))

    tiny = os.path.join(ROOT, "diffusers_tiny")
    weights = load_file(os.path.join(tiny, "diffusion_pytorch_model.safetensors"))
    out = os.path.join(ROOT, "diffusers_tiny_bin")
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(tiny, "config.json"), out)
    torch.save(weights, os.path.join(out, "diffusion_pytorch_model.bin"))
    for name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        half = {k: v.to(dtype) for k, v in weights.items()}
        save_file(half, os.path.join(tiny, f"diffusion_pytorch_model.{name}.safetensors"),
                  metadata={"format": "pt"})
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
