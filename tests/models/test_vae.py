"""AutoencoderKL beyond parity: bf16 compute, the posterior, latent scaling, input errors.

Parity with diffusers through the file converter is in ``tests/convert/test_parity.py``.
"""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "convert"))
import _sd_reference as ref  # noqa: E402
from diffjax import InputError  # noqa: E402
from diffjax.convert import convert_diffusers_state_dict  # noqa: E402
from diffjax.models.vae import AutoencoderKL, DiagonalGaussian  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    model = ref.build_vae(ref.TINY_VAE, seed=13)
    return model, convert_diffusers_state_dict(dict(model.config), model.state_dict())


def _rel(got, want):
    got = np.asarray(got, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_bf16_encode_and_decode_within_2pct_of_fp32(vae):
    """Each half in bf16 (fp32 params; norms, softmax and the posterior in fp32) against the
    fp32 reference on the same input, and no worse than diffusers' own bf16."""
    model, params = vae
    x = ref.vae_input(ref.TINY_VAE)
    module = AutoencoderKL.from_config(ref.TINY_VAE, dtype=jnp.bfloat16)
    with torch.no_grad():
        want_mean = model.encode(ref.nchw(x)).latent_dist.mean
        want_image = ref.nhwc(model.decode(want_mean).sample)
        torch_bf16 = ref.build_vae(ref.TINY_VAE, seed=13).to(torch.bfloat16)
        torch_mean = ref.nhwc(torch_bf16.encode(ref.nchw(x).bfloat16()).latent_dist.mean.float())
        torch_image = ref.nhwc(torch_bf16.decode(want_mean.bfloat16()).sample.float())
    want_mean = ref.nhwc(want_mean)

    def halves(p, x, z):
        post = module.apply({"params": p}, x, method="encode")
        return post.mean, module.apply({"params": p}, z, method="decode")

    mean, image = jax.jit(halves)(params, x, want_mean)
    assert mean.dtype == jnp.float32  # the posterior is always float32
    assert image.dtype == jnp.bfloat16
    for name, got, want, theirs in (("encode", mean, want_mean, torch_mean),
                                    ("decode", image, want_image, torch_image)):
        rel, rel_torch = _rel(got, want), _rel(theirs, want)
        print(f"bf16 VAE {name}: relative L2 error {rel:.2e} (diffusers bf16: {rel_torch:.2e})")
        assert rel <= 2e-2, name
        assert rel <= 1.1 * rel_torch, name


def test_posterior_matches_diffusers_distribution():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    moments = rng.standard_normal((2, 8, 5, 5)).astype(np.float32) * 20  # exercises the clamp
    theirs = DiagonalGaussianDistribution(torch.from_numpy(moments))
    mean, logvar = np.split(moments.transpose(0, 2, 3, 1), 2, axis=-1)
    ours = DiagonalGaussian(mean=jnp.asarray(mean), logvar=jnp.clip(logvar, -30.0, 20.0))
    np.testing.assert_allclose(ours.std, ref.nhwc(theirs.std), rtol=1e-6)
    np.testing.assert_allclose(ours.kl(), theirs.kl().numpy(), rtol=1e-5)
    sample = ours.sample(jax.random.PRNGKey(0))
    assert sample.shape == mean.shape
    z = (sample - ours.mean) / ours.std
    assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1) < 0.2


def test_latent_scaling_from_config():
    sdxl = AutoencoderKL.from_config({**ref.TINY_VAE, "scaling_factor": 0.13025, "shift_factor": 0.1})
    z = jnp.linspace(-3, 3, 8).reshape(1, 1, 2, 4)
    np.testing.assert_allclose(sdxl.scale_latents(z), (z - 0.1) * 0.13025, rtol=1e-6)
    np.testing.assert_allclose(sdxl.unscale_latents(sdxl.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
    assert AutoencoderKL.from_config(ref.TINY_VAE).scaling_factor == 0.18215


def test_bad_inputs_are_clear_errors(vae):
    _, params = vae
    module = AutoencoderKL.from_config(ref.TINY_VAE)
    with pytest.raises(InputError, match="not a multiple"):
        module.apply({"params": params}, jnp.zeros((1, 15, 16, 3)), method="encode")
    with pytest.raises(InputError, match="channels"):
        module.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), method="encode")
    with pytest.raises(InputError, match="latents have"):
        module.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method="decode")
    with pytest.raises(InputError, match="PRNG key"):
        module.apply({"params": params}, jnp.zeros((1, 16, 16, 3)), sample_posterior=True)
