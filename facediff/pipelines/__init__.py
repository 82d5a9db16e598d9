"""End-to-end inference pipelines (text-to-image with Stable Diffusion weights)."""
