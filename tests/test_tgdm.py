"""TGDM (Xu et al., "Multimodal-driven Talking Face Generation via a Unified
Diffusion-based Generator"): AdaIN (Eq. 17) and TexAtt (Eq. 15-16) against the equations
written out step by step in numpy."""

import flax.linen as nn
import jax
import numpy as np

from facediff.models import layers


def _np(tree):
  return jax.tree.map(np.asarray, nn.unbox(tree))


# ---- layers ----


def test_texatt_matches_equation_15_16_step_by_step():
  rng = np.random.default_rng(0)
  f_d = rng.normal(size=(2, 4, 5, 16)).astype(np.float32)
  f_s = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)  # other size and width than F_d
  mod = layers.TexAtt()
  params = _np(mod.init(jax.random.key(0), f_d, f_s)["params"])
  assert params["query"]["kernel"].shape == (1, 1, 16, 4)  # C/4
  assert params["key"]["kernel"].shape == (1, 1, 8, 4)
  assert params["out"]["kernel"].shape == (1, 1, 4, 16)
  assert params["tau"].shape == () and params["tau"] == 0.0
  params["tau"] = np.float32(0.7)
  for name in ("query", "key", "value", "out"):
    params[name]["bias"] = rng.normal(size=params[name]["bias"].shape).astype(np.float32)
  out = np.asarray(mod.apply({"params": params}, f_d, f_s))

  def conv1x1(x, p):
    return np.einsum("bhwc,cd->bhwd", x.astype(np.float64), p["kernel"][0, 0]) + p["bias"]

  want = np.zeros(f_d.shape)
  for b in range(2):
    q = conv1x1(f_d, params["query"])[b].reshape(20, 4)  # Q_d: (H W, C/4)
    k = conv1x1(f_s, params["key"])[b].reshape(9, 4)
    v = conv1x1(f_s, params["value"])[b].reshape(9, 4)
    logits = q @ k.T  # Eq. 15: no temperature
    m = np.exp(logits - logits.max(1, keepdims=True))
    m /= m.sum(1, keepdims=True)
    f_sd = (m @ v).reshape(1, 4, 5, 4)
    want[b] = 0.7 * conv1x1(f_sd, params["out"])[0] + f_d[b]  # Eq. 16
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


def test_texatt_with_zero_tau_is_the_identity():
  rng = np.random.default_rng(1)
  f_d = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  f_s = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  mod = layers.TexAtt()
  params = mod.init(jax.random.key(1), f_d, f_s)["params"]  # tau = 0 at init
  out = mod.apply({"params": params}, f_d, f_s)
  np.testing.assert_array_equal(np.asarray(out), f_d)


def test_adain_matches_equation_17():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(3, 5, 4, 6)) * 2 + 1).astype(np.float32)
  cond = rng.normal(size=(3, 10)).astype(np.float32)
  mod = layers.AdaIN(eps=1e-5)
  params = _np(mod.init(jax.random.key(2), x, cond)["params"])
  np.testing.assert_array_equal(params["scale"]["bias"], np.ones(6))  # starts near plain IN
  params["scale"]["bias"] = rng.normal(size=6).astype(np.float32)
  params["shift"]["bias"] = rng.normal(size=6).astype(np.float32)
  out = np.asarray(mod.apply({"params": params}, x, cond))

  xd = x.astype(np.float64)
  mu = xd.mean(axis=(1, 2), keepdims=True)
  sigma = np.sqrt(xd.var(axis=(1, 2), keepdims=True) + 1e-5)
  sigma_c = cond @ params["scale"]["kernel"] + params["scale"]["bias"]  # sigma_c(C)
  mu_c = cond @ params["shift"]["kernel"] + params["shift"]["bias"]  # mu_c(C)
  want = sigma_c[:, None, None] * (xd - mu) / sigma + mu_c[:, None, None]
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
  # The normalised features are per example and channel: a per-(example, channel) affine
  # change of x leaves the output unchanged.
  shifted = x * np.float32(3.0) + rng.normal(size=(3, 1, 1, 6)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(mod.apply({"params": params}, shifted, cond)), out, atol=1e-4
  )
