"""Training losses and the differentiable face crops their frozen encoders read."""
