"""Diffusion core: noise schedules, samplers as compiled programs, x0 estimators."""

from facediff.diffusion.estimators import (
  ESTIMATORS,
  X0Estimate,
  estimate_x0,
  improved_midpoint_x0,
  midpoint_x0,
  one_step_x0,
)
from facediff.diffusion.samplers import (
  METHODS,
  compile_sampler,
  guided_eps_fn,
  make_timesteps,
  num_denoiser_calls,
  sample,
)
from facediff.diffusion.schedules import (
  NoiseSchedule,
  make_schedule,
  posterior_chain,
  posterior_mean,
  posterior_variance,
  predict_eps,
  predict_x0,
  q_sample,
  schedule_from_betas,
)

__all__ = [
  "ESTIMATORS",
  "METHODS",
  "NoiseSchedule",
  "X0Estimate",
  "compile_sampler",
  "estimate_x0",
  "guided_eps_fn",
  "improved_midpoint_x0",
  "make_schedule",
  "make_timesteps",
  "midpoint_x0",
  "num_denoiser_calls",
  "one_step_x0",
  "posterior_chain",
  "posterior_mean",
  "posterior_variance",
  "predict_eps",
  "predict_x0",
  "q_sample",
  "sample",
  "schedule_from_betas",
]
