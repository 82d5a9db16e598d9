"""Pure loss functions (DiffSFSR Eq. 3-7, LPIPS) and the differentiable face crops their frozen encoders read."""
