"""Pure loss functions: DiffSFSR (Eq. 3-7), LPIPS, and their building blocks."""
