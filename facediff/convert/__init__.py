"""Weight import / export between PyTorch checkpoints (diffusers, CompVis) and facediff."""
