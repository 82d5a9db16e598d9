"""Flax Linen networks of facediff (NHWC): shared layers, the SD-1.x UNet, VAE, CLIP."""
