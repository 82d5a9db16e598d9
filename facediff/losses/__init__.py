"""Training losses as pure functions over params and batches (eps MSE, identity, LPIPS, ...)."""
