"""Loads a folder written by ddpm's `save_pretrained` with diffusers and compares outputs.

    venv/bin/python scripts/reference/check_diffusers_load.py DIR

DIR holds config.json, diffusion_pytorch_model.safetensors and io.safetensors (`sample`,
`timesteps`, `class_labels` for a class-conditional model, and ddpm's `output`). Prints the largest absolute difference; exits 1 above 1e-4.
"""
import sys

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file


def main(folder):
    model = UNet2DModel.from_pretrained(folder).eval()
    io = load_file(f"{folder}/io.safetensors")
    with torch.no_grad():
        out = model(io["sample"], io["timesteps"], class_labels=io.get("class_labels")).sample
    diff = (out - io["output"]).abs().max().item()
    params = sum(p.numel() for p in model.parameters())
    print(f"{folder}: {params} parameters, output {tuple(out.shape)}, max |diff| {diff:.3e}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
