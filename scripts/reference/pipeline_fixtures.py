"""Writes assets/reference/unet/ddpm_pipeline_tiny/ with diffusers' own DDPMPipeline.save_pretrained:
the diffusers_tiny UNet2DModel and a DDPMScheduler, in diffusers' pipeline layout
(model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors,
scheduler/scheduler_config.json).

    python -m venv venv && venv/bin/pip install diffusers torch safetensors numpy
    venv/bin/python scripts/reference/pipeline_fixtures.py
"""
import json
import os

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "reference", "unet")


def main():
    unet = UNet2DModel.from_pretrained(os.path.join(ROOT, "diffusers_tiny"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=True)
    out = os.path.join(ROOT, "ddpm_pipeline_tiny")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    # diffusers records where the model was loaded from; keep no machine's path in the repo.
    config_path = os.path.join(out, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["_name_or_path"] = "diffusers_tiny"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
