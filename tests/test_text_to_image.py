"""Text-to-image on tiny random SD weights: determinism, batching, PNGs, CLI, and
equality with diffusers' StableDiffusionPipeline (PNDM, classifier-free guidance)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

import _tiny_sd as tiny_sd  # noqa: E402

from facediff.convert import pipeline as diffusers_io  # noqa: E402
from facediff.models.stable_diffusion import SDModels  # noqa: E402
from facediff.pipelines import text_to_image as t2i_lib  # noqa: E402

PROMPTS = ["a photo of a cat", "old man smiling"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  pipe = tiny_sd.make_tiny_sd_folder(root / "sd", seed=1)
  models = diffusers_io.load_pretrained(root / "sd")
  return root / "sd", pipe, t2i_lib.TextToImage(models)


def test_same_key_same_images_batch_and_png(tiny, tmp_path):
  _, _, t2i = tiny
  kw = dict(height=16, width=16, num_steps=4, guidance_scale=7.5)
  a = t2i(PROMPTS, jax.random.key(0), **kw)
  b = t2i(PROMPTS, jax.random.key(0), **kw)
  c = t2i(PROMPTS, jax.random.key(1), **kw)
  assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c.astype(int)).max() > 10
  assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 0  # two prompts, two images
  # The key path is the latents path with latents = normal(key, latent shape).
  lat = jax.random.normal(jax.random.key(0), t2i.latent_shape(2, 16, 16))
  f = t2i.from_latents(PROMPTS, lat, num_steps=4, guidance_scale=7.5)
  np.testing.assert_array_equal(a, np.round(f * 255).astype(np.uint8))
  paths = t2i_lib.save_png(a, tmp_path / "png", prefix="cat")
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["cat_0000.png", "cat_0001.png"]
  for p, im in zip(paths, a, strict=True):
    np.testing.assert_array_equal(np.asarray(PIL.open(p).convert("RGB")), im)


def test_one_program_per_shape(tiny):
  _, _, t2i = tiny
  lowered = t2i.lowered(2, height=16, width=16, num_steps=3)
  text = lowered.as_text()
  # one program: the sampler's scan (a while loop) sits inside it, with the VAE after it
  assert "while" in text
  assert lowered.out_info.shape == (2, 16, 16, 3)


def _diffusers_images(pipe, latents, steps, guidance):
  gen_out = pipe(
    PROMPTS,
    height=16,
    width=16,
    num_inference_steps=steps,
    guidance_scale=guidance,
    latents=tiny_sd.nchw(latents),
    output_type="np",
  )
  return gen_out.images


@pytest.mark.parametrize("steps,guidance", [(4, 7.5), (3, 1.0)], ids=["guided", "unguided"])
def test_matches_diffusers_pipeline(tiny, steps, guidance):
  """Same tiny weights, same initial latents: facediff equals StableDiffusionPipeline.

  Tolerance 1e-4 on [0, 1] images: every stage agrees with its torch twin to ~1e-6
  (CLIP, UNet, VAE are float32 with float32 matmuls on both sides) and PNDM's update is a
  fixed linear combination, so errors stay at float32 rounding level over the steps
  (measured ~1e-6 after 50 steps); 1e-4 is far below one uint8 level (1/255 = 4e-3).
  """
  _, pipe, t2i = tiny
  latents = np.random.default_rng(steps).normal(size=(2, 8, 8, 4)).astype(np.float32)
  ours = t2i.from_latents(PROMPTS, latents, num_steps=steps, guidance_scale=guidance)
  ref = _diffusers_images(pipe, latents, steps, guidance)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_matches_diffusers_pipeline_50_steps(tiny):
  _, pipe, t2i = tiny
  latents = np.random.default_rng(50).normal(size=(2, 8, 8, 4)).astype(np.float32)
  ours = t2i.from_latents(PROMPTS, latents, num_steps=50, guidance_scale=7.5)
  np.testing.assert_allclose(ours, _diffusers_images(pipe, latents, 50, 7.5), atol=1e-4, rtol=0)


def test_cli_writes_pngs(tiny, tmp_path):
  """Same shapes and settings as the first test: the CLI reuses its compiled program."""
  folder, _, t2i = tiny
  paths = t2i_lib.main(
    [
      "--model",
      str(folder),
      "--prompt",
      "a photo of a dog",
      "--prompt",
      "old man",
      "--out",
      str(tmp_path / "out"),
      "--steps",
      "4",
      "--height",
      "16",
      "--width",
      "16",
      "--seed",
      "3",
    ]
  )
  assert len(paths) == 2
  ref = t2i(["a photo of a dog", "old man"], jax.random.key(3), height=16, width=16, num_steps=4)
  for p, r in zip(paths, ref, strict=True):
    np.testing.assert_array_equal(np.asarray(PIL.open(p)), r)


def test_bad_sizes_and_missing_tokenizer(tiny):
  _, _, t2i = tiny
  with pytest.raises(ValueError, match="multiples"):
    t2i(PROMPTS, jax.random.key(0), height=15, width=16, num_steps=2)
  models = SDModels(
    t2i.models.unet_config,
    t2i.models.vae_config,
    t2i.models.text_config,
    t2i.models.params,
    tokenizer_path=None,
  )
  with pytest.raises(ValueError, match="tokenizer"):
    t2i_lib.TextToImage(models)


def test_sharded_equals_unsharded(tiny):
  """On a (data=2, fsdp=4) mesh of the 8 virtual CPU devices: FSDP params, batch split
  over both axes; the images equal the single-device ones."""
  from facediff import partitioning

  folder, _, t2i = tiny
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
  sharded = t2i_lib.TextToImage(t2i.models, mesh=mesh)
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)]
  assert any("fsdp" in str(s) for s in specs)  # parameters really are sharded
  prompts = PROMPTS + ["a dog", "a face"]
  latents = np.random.default_rng(5).normal(size=(4, 8, 8, 4)).astype(np.float32)
  a = t2i.from_latents(prompts, latents, num_steps=3, guidance_scale=7.5)
  b = sharded.from_latents(prompts, latents, num_steps=3, guidance_scale=7.5)
  np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sd14_program_lowers():
  """The SD-1.4-sized program (512x512, 50 PNDM steps, guidance) traces and lowers from
  abstract params, with no weights loaded."""
  import flax.linen as nn

  from facediff.models.clip import CLIPTextConfig
  from facediff.models.unet import UNetConfig
  from facediff.models.vae import VAEConfig

  spec = t2i_lib._Spec(
    CLIPTextConfig.sd14(), UNetConfig.sd14(), VAEConfig.sd14(), t2i_lib.SamplerSettings()
  )
  params = nn.unbox(t2i_lib.abstract_params(spec))
  lowered = t2i_lib.lower(spec, params, 2, height=512, width=512, num_steps=50)
  assert lowered.out_info.shape == (2, 512, 512, 3)
