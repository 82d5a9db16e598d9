"""Pure loss functions (DiffSFSR Eq. 3-7, LPIPS) and the face crops their encoders read."""
