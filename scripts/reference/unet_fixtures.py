"""Writes the U-Net fixtures under assets/reference/unet/ with diffusers' UNet2DModel.

    python -m venv venv && venv/bin/pip install diffusers torch safetensors numpy
    venv/bin/python scripts/reference/unet_fixtures.py [NAME ...]

With names, only those fixtures are written (the others keep their committed bits).

Each fixture folder holds config.json, diffusion_pytorch_model.safetensors (where small enough
to commit) and io.safetensors with `sample`, `timesteps` and the model's `output`.

- legacy_tiny: attention weights under the old names (query, key, value, proj_attn), as
  google/ddpm-cifar10-32 stores them; downsample_padding 0; single-head attention
  (attention_head_dim null); flip_sin_to_cos false, freq_shift 1; norm_eps 1e-6;
  two resnets per block; mid_block_scale_factor sqrt(2).
- multihead_tiny: three levels, six heads of 4 channels, no mid-block attention, an explicit
  time_embedding_dim, center_input_sample, a non-square input, dropout (inactive in eval).
- class_tiny: class-conditional (num_class_embeds 5, a learned class embedding added to the
  time embedding); io.safetensors adds `class_labels`, and `guided_output`, classifier-free
  guidance with scale 2.5 and class 4 as "no class" (uncond + 2.5 (cond - uncond)), as
  ddpm_unet::Guided computes it.
- ddpm_cifar10: google/ddpm-cifar10-32's architecture. Its 35.7M weights are too large to
  commit, so they follow a formula the Rust test recomputes (`formula_weights` below), and
  io.safetensors also stores the parameter count.
"""
import json
import math
import os
import sys

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "assets", "reference", "unet")

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def randomize_(model, seed):
    """Random weights everywhere, norms included, so a loader that drops one fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def formula_weights(model):
    """value[i] = scale * sin(0.37 i + phase(name)), phase = (sum of the name's bytes) / 1000;
    scale = 1/sqrt(fan_in) for matrices and kernels, 0.1 for biases; norm scales 1 + 0.1 sin."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            phase = sum(name.encode()) / 1000.0
            i = torch.arange(p.numel(), dtype=torch.float64)
            s = torch.sin(0.37 * i + phase)
            if p.dim() >= 2:
                v = s / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * s
            else:
                v = 0.1 * s
            p.copy_(v.reshape(p.shape).to(torch.float32))


def write(name, model, sample, timesteps, legacy=False, weights=True, extra=None, class_labels=None):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    model.eval()
    with torch.no_grad():
        output = model(sample, timesteps, class_labels=class_labels).sample
    config = dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config = {"_class_name": "UNet2DModel", "_diffusers_version": __import__("diffusers").__version__, **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if weights:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if legacy:
            renamed = {}
            for k, v in state.items():
                for new, old in LEGACY.items():
                    if f".{new}." in k:
                        k = k.replace(f".{new}.", f".{old}.")
                        break
                renamed[k] = v
            state = renamed
        save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    io = {"sample": sample.contiguous(), "timesteps": timesteps.contiguous(), "output": output.contiguous()}
    io.update(extra or {})
    save_file(io, os.path.join(folder, "io.safetensors"))
    print(name, "params", sum(p.numel() for p in model.parameters()), "output", tuple(output.shape))


def main():
    wanted = set(sys.argv[1:])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    if not wanted or "class_tiny" in wanted:
        write_class_tiny()
    if wanted and wanted != {"class_tiny"}:
        unknown = wanted - {"class_tiny"}
        sys.exit(f"only class_tiny can be written alone, not {sorted(unknown)}")
    if wanted:
        return

    legacy = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=8, mid_block_scale_factor=math.sqrt(2),
    )
    randomize_(legacy, 1)
    write("legacy_tiny", legacy, torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 950]), legacy=True)

    multi = UNet2DModel(
        sample_size=8, in_channels=2, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16, 24),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
        norm_num_groups=4, add_attention=False, time_embedding_dim=48, center_input_sample=True,
        dropout=0.1,
    )
    randomize_(multi, 2)
    write("multihead_tiny", multi, torch.rand(3, 2, 8, 16, generator=g), torch.tensor([0, 17, 999]))

    cifar = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        norm_eps=1e-6, norm_num_groups=32,
    )
    formula_weights(cifar)
    params = sum(p.numel() for p in cifar.parameters())
    write("ddpm_cifar10", cifar, torch.randn(1, 3, 32, 32, generator=g), torch.tensor([500]),
          weights=False, extra={"num_parameters": torch.tensor([params], dtype=torch.int64)})


def write_class_tiny():
    g = torch.Generator().manual_seed(11)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False,
        num_class_embeds=5,
    )
    randomize_(model, 3)
    sample = torch.randn(4, 1, 8, 8, generator=g)
    timesteps = torch.tensor([0, 250, 600, 999])
    labels = torch.tensor([0, 3, 1, 3])
    model.eval()
    with torch.no_grad():
        cond = model(sample, timesteps, class_labels=labels).sample
        uncond = model(sample, timesteps, class_labels=torch.full_like(labels, 4)).sample
    guided = uncond + 2.5 * (cond - uncond)
    write("class_tiny", model, sample, timesteps, class_labels=labels,
          extra={"class_labels": labels, "guided_output": guided.contiguous()})


if __name__ == "__main__":
    sys.exit(main())
