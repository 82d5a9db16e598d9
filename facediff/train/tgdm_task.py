"""TGDM as a trainer ``Task``: the denoiser (models.tgdm), the gated loss of Eq. 18-21
(losses.tgdm) and a DDPM / DDIM preview sampler.

Batches (data_pipelines.loaders with ``coeff_field`` set): the target I_d is
``bkg_image`` with its 3DMM coefficients ``coeffs``.

* ``reenact`` (TGDM 4.3; needs ``pair_field``): the source I_s is ``source_image`` of the
  same group (video), rho_hat = {alpha_s, beta_d, delta_s, gamma_s, p_d, omega_d}
  (TGDM 4.2, ``facediff.render.reenact``) from ``source_coeffs`` and ``coeffs``.
* ``swap`` (TGDM 4.4): self-reconstruction of I_s = ``bkg_image`` from its masked copy
  (``bkg_mask``, 1 = face; the dataset's mask should be TGDM's "Small" one), its identity
  embedding ``id[config.data.id_fields[0]]`` and rho = its own coefficients.

I_3d is rendered inside the loss from rho_hat with ``facediff.render`` (pure jnp, no
gradient needed) at the training image size: no renders are stored. The morphable model
is a frozen input: ``config.model.bfm_path`` (a ``BFM_model_front.mat``), or, when empty,
the one data_pipelines.synthetic_3dmm stores in ``config.data.path``. rho is fed to the
network in TGDM's 261 layout (``facediff.render.coeffs``; a D3DFR vector has zero gaze).

Frozen: ``{"lpips": LPIPS-VGG params, "bfm": MorphableModel}``. LPIPS's linear heads are
the real ones packaged with the lpips wheel; its VGG16 trunk comes from
``config.model.lpips_vgg16`` (a torchvision ``vgg16`` state dict) or, when empty (tiny;
no VGG16 weights are reachable offline), is randomly initialised with
``config.model.lpips_seed``: then the perceptual term is a random-feature distance, not
LPIPS.

Evaluation (``eval_fn``, the trainer's periodic one with ``config.train.eval_every`` >
0): on one fixed batch, images sampled with ``config.model.eval_sample_method`` /
``eval_sample_steps`` (DDIM) against the targets I_d: ``mse``, ``psnr``, ``ssim`` and
``lpips`` (``facediff.metrics``; LPIPS with the task's frozen LPIPS params, so with the
random trunk of the tiny configs it is that random-feature distance).

Model state: ``{"gate": int32}``, 0 at start; ``update_model_state`` switches it on once
a step's ``l_simple`` is below ``config.model.gate_threshold`` (0.05, TGDM 5.1) and never
off; it is checkpointed with the train state.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facediff import metrics
from facediff.convert import lpips as lpips_convert
from facediff.diffusion import make_schedule, sample
from facediff.losses import tgdm as tgdm_losses
from facediff.models import lpips as lpips_model
from facediff.models import tgdm
from facediff.render import bfm, coeffs, renderer
from facediff.train.task import Task

BFM_FILE = "BFM_model_front.mat"


def model_config(config) -> tgdm.TGDMConfig:
  """TGDMConfig from ``config.model.tgdm`` (fields of TGDMConfig) and the data size."""
  mc = config.model
  fields = dict(mc.tgdm)
  fields.update(mode=str(mc.mode), image_size=int(config.data.image_size))
  if mc.mode == "swap":
    fields["id_dim"] = int(config.data.id_dims[0])
  return tgdm.TGDMConfig(**fields)


def load_morphable_model(config) -> bfm.MorphableModel:
  path = str(config.model.get("bfm_path", "") or "")
  if not path:
    path = os.path.join(str(config.data.path), BFM_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"config.model.bfm_path is empty and {path} does not exist: pass the BFM "
        f"(BFM_model_front.mat) or use a data_pipelines.synthetic_3dmm dataset"
      )
  return bfm.load_bfm(path)


def load_lpips(config) -> dict[str, Any]:
  """LPIPS-VGG params: the packaged real heads with a torchvision VGG16 trunk
  (``model.lpips_vgg16``) or a random trunk (empty path)."""
  mc = config.model
  cfg = lpips_model.LPIPSConfig()
  trunk = str(mc.get("lpips_vgg16", "") or "")
  if trunk:
    return lpips_convert.load_params(trunk, None, cfg)
  import torch  # noqa: PLC0415  (reads the heads' .pth)

  heads_path = lpips_convert.default_heads_path()
  heads = lpips_convert.heads_torch_to_flax(
    torch.load(heads_path, map_location="cpu", weights_only=True), cfg, heads_path
  )
  init = jax.jit(lambda k: nn.unbox(lpips_model.init_params(cfg, k)))
  params = dict(jax.tree.map(np.asarray, init(jax.random.key(int(mc.lpips_seed)))))
  params.update({k: {"kernel": np.asarray(v["kernel"], np.float32)} for k, v in heads.items()})
  return params


def render_i3d(model: bfm.MorphableModel, c: coeffs.Coeffs, image_size: int, window: int):
  """I_3d (TGDM Eq. 8) in [-1, 1] (the renderer's [0, 1] lit albedo; -1 off the face)."""
  out = renderer.render(model, c, image_size=image_size, window=window)
  return jax.lax.stop_gradient(jnp.clip(out.image, 0.0, 1.0) * 2.0 - 1.0)


def make_condition(config, cfg: tgdm.TGDMConfig, model, batch) -> tuple[jax.Array, dict]:
  """(target I_d, cond for models.tgdm.apply) from a loader batch."""
  layout = str(config.data.get("coeff_layout", "d3dfr"))
  window = int(config.model.get("render_window", 8))
  target = batch["bkg_image"]
  tgt = coeffs.split(batch["coeffs"].astype(jnp.float32), layout)
  if cfg.mode == "reenact":
    rho_hat = coeffs.reenact(coeffs.split(batch["source_coeffs"].astype(jnp.float32), layout), tgt)
    cond = {"source": batch["source_image"]}
  else:
    rho_hat = tgt
    id_field = config.data.id_fields[0]
    cond = {"source": target, "source_mask": batch["bkg_mask"], "id": batch["id"][id_field]}
  cond["rho"] = coeffs.join(rho_hat, "tgdm")
  cond["i3d"] = render_i3d(model, rho_hat, cfg.image_size, window)
  return target, cond


def check_config(config) -> tgdm.TGDMConfig:
  """The denoiser's config, after the checks that need no data or weights (a bad mode,
  missing fields): raises ValueError naming the field."""
  mc = config.model
  if mc.mode not in tgdm.MODES:
    raise ValueError(f"config.model.mode={mc.mode!r}: one of {tgdm.MODES}")
  if not config.data.get("coeff_field", ""):
    raise ValueError("TGDM needs config.data.coeff_field (the 3DMM coefficients)")
  if mc.mode == "reenact" and not config.data.get("pair_field", ""):
    raise ValueError("TGDM reenact needs config.data.pair_field (source from the same group)")
  return model_config(config)


def make_task(config) -> Task:
  mc = config.model
  cfg = check_config(config)
  schedule = make_schedule(str(mc.schedule), int(mc.num_train_timesteps))
  threshold = float(mc.gate_threshold)
  lambdas = dict(
    lambda_simple=float(mc.lambda_simple),
    lambda_rec=float(mc.lambda_rec),
    lambda_p=float(mc.lambda_p),
  )
  frozen = {"lpips": load_lpips(config), "bfm": load_morphable_model(config)}

  def init(key):
    return tgdm.init_params(cfg, key)

  def loss_fn(params, frozen, batch, rng, model_state):
    target, cond = make_condition(config, cfg, frozen["bfm"], batch)

    def eps_fn(x, t, c):
      return tgdm.apply(cfg, params, x, t, c)

    return tgdm_losses.tgdm_loss(
      eps_fn,
      schedule,
      target,
      cond,
      rng,
      gate=model_state["gate"],
      lpips_params=frozen["lpips"],
      **lambdas,
    )

  def generate(params, frozen, batch, rng, method, num_steps):
    target, cond = make_condition(config, cfg, frozen["bfm"], batch)
    k_noise, k_steps = jax.random.split(rng)
    noise = jax.random.normal(k_noise, target.shape, jnp.float32)
    out = sample(
      lambda x, t, c: tgdm.apply(cfg, params, x, t, c),
      schedule,
      noise,
      method=str(method),
      num_steps=None if num_steps is None else int(num_steps),
      key=k_steps,
      cond=cond,
    )
    return target, jnp.clip(out, -1.0, 1.0)

  def sample_fn(params, frozen, batch, rng):
    return generate(params, frozen, batch, rng, mc.sample_method, mc.sample_steps)[1]

  def eval_fn(params, frozen, batch, rng):
    target, images = generate(
      params,
      frozen,
      batch,
      rng,
      mc.get("eval_sample_method", "ddim"),
      mc.get("eval_sample_steps", 50),
    )
    per = metrics.image_metrics(images, target, lpips_params=frozen["lpips"])
    w = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones(target.shape[:1])
    return {k.lower(): jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0) for k, v in per.items()}

  def init_model_state():
    return {"gate": jnp.zeros((), jnp.int32)}

  def update_model_state(model_state, metrics):
    return {"gate": tgdm_losses.update_gate(model_state["gate"], metrics["l_simple"], threshold)}

  return Task(
    name=f"tgdm_{cfg.mode}",
    init=init,
    loss_fn=loss_fn,
    sample_fn=sample_fn,
    eval_fn=eval_fn,
    frozen=frozen,
    init_model_state=init_model_state,
    update_model_state=update_model_state,
  )
