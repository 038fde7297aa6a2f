"""Training task of the residual diffusion codec (Brenig & Timofte, poster loss).

Per example (the train loop vmaps ``loss_fn`` over examples, each with its own key):

* draw a quality index ``q ~ U{0..Q-1}`` (one lambda-conditioned model for all rates);
* run the gained hyperprior: ``x̂_base``, ``ŷ``, likelihoods (``mixed`` quantisation:
  noise for the rate, straight-through rounding for the decoder, Minnen & Singh 2020);
* diffuse the scaled residual ``r₀ = s · (x − sg(x̂_base))`` to a random timestep
  ``t ~ U{0..999}`` of the cosine schedule, ``r_t = √ᾱ_t r₀ + √(1−ᾱ_t) ε``, and let the
  refiner predict ``r̂₀`` (x0-prediction); the refined image is ``x̂ = x̂_base + r̂₀ / s``;
* loss (the poster's ``λ·bits + (1−ρ)·MSE + ρ·LPIPS + decoder MSE``)::

      L = λ_q · bpp + MSE(x, x̂_base) + (1 − ρ) · MSE(x, x̂) + ρ · κ · LPIPS(x, x̂)

  with MSE on the [0, 1] scale and ``λ_q = 1 / (255² · λᶜ_q)``, so that the base term
  ``λ_q · bpp + MSE`` is CompressAI's ``bpp + λᶜ · 255² · MSE`` up to a constant factor
  (``λᶜ`` from CompressAI's quality table). ``κ = 1 / (255² · 0.075 · 2⁻⁵)`` puts LPIPS on
  the MSE scale with HiFiC's balance (Mentzer et al. 2020, sec. 4: ``k_M = 0.075·2⁻⁵`` on
  MSE in [0, 255]² units, ``k_P = 1``). LPIPS is AlexNet v0.1 with the real weights.

The target ``r₀`` uses a stopped gradient of ``x̂_base`` (the target must not move to meet the
prediction); the base still receives the refiner's gradients through the conditioning and
through ``x̂ = x̂_base + r̂₀ / s``, so encoder, decoder and UNet train together. The
"enhancement" mode of the poster (base frozen, only the refiner trains) is the config
argument ``enhance`` (``optimizer.train_only = ["refiner"]``). ``refine=False`` (config
argument ``base``) trains the gained hyperprior alone (``λ_q · bpp + MSE(x, x̂_base)``,
the refiner frozen and not run): the cheap first stage of a staged CPU schedule whose
result initialises the joint or enhancement stage (``config.init_from``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from diffjax.diffusion.parameterization import add_noise, expand_to
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.entropy.models import bits
from diffjax.train.rate_distortion import RateDistortionTask

# HiFiC's MSE/LPIPS balance expressed for MSE on the [0, 1] scale (see the module docstring).
LPIPS_TO_MSE = 1.0 / (255.0 ** 2 * 0.075 * 2.0 ** -5)


class ResidualTask(RateDistortionTask):
    """Joint training of :class:`~diffjax.models.refiner.ResidualCodecModel`.

    ``lmbdas``: CompressAI-style ``λᶜ`` per quality (ascending = larger files);
    ``rho``: perceptual weight ρ; ``lpips_net``: ``"alex"`` or ``"vgg"`` (``rho = 0`` skips
    LPIPS). Model keyword arguments (``N``, ``M``, ``refiner_channels``, ...) pass through.
    The entropy-bottleneck quantiles keep the ``"aux"`` optimizer label of
    :class:`RateDistortionTask` (CompressAI's auxiliary optimiser).
    """

    def __init__(self, lmbdas: Sequence[float] = (0.0018, 0.0050, 0.0130, 0.0483),
                 rho: float = 0.5, lpips_net: str = "alex", aux_weight: float = 1.0,
                 refine: bool = True, **model_kwargs):
        from diffjax.models.refiner import SCHEDULER_CONFIG, ResidualCodecModel

        self.lmbdas = tuple(float(v) for v in lmbdas)
        model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
        self.model = ResidualCodecModel(num_qualities=len(self.lmbdas), **model_kwargs)
        self.rho = float(rho)
        self.refine = bool(refine)
        self.aux_weight = float(aux_weight)
        self.lpips_net = lpips_net
        self.schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
        self.lpips_params = None
        if self.rho > 0 and self.refine:
            from diffjax.metrics.perceptual import load_lpips_params

            self.lpips_params = load_lpips_params(lpips_net)

    def init_params(self, rng, batch_spec: Mapping[str, Any]):
        x = jnp.zeros((1,) + tuple(batch_spec["image"].shape[1:]), jnp.float32)
        rng, noise = jax.random.split(rng)
        return self.model.init({"params": rng, "noise": noise}, x, jnp.zeros((1,), jnp.int32),
                               train=False)["params"]

    def loss_fn(self, params, batch, rng, step):
        from diffjax.metrics.perceptual import lpips_distance

        x = batch["image"].astype(jnp.float32)
        b, h, w, _ = x.shape
        k_q, k_noise, k_t, k_eps = jax.random.split(rng, 4)
        q = jax.random.randint(k_q, (b,), 0, len(self.lmbdas))
        out = self.model.apply({"params": params}, x, q, train=True, rngs={"noise": k_noise})
        bpp = bits(out["likelihoods"], per_example=True) / (h * w)
        x_base = out["x_base"].astype(jnp.float32)
        mse_base = jnp.mean(jnp.square(x - x_base), axis=(1, 2, 3))

        lam = 1.0 / (255.0 ** 2 * jnp.asarray(self.lmbdas, jnp.float32)[q])
        aux = self.model.apply({"params": params}, method="aux_loss")
        psnr = lambda m: -10.0 * jnp.log10(jnp.maximum(jnp.mean(m), 1e-10))  # noqa: E731
        metrics = {"bpp": jnp.mean(bpp), "mse_base": jnp.mean(mse_base),
                   "psnr_base": psnr(mse_base), "aux_loss": aux}
        if not self.refine:  # base stage: the gained hyperprior alone (refiner untouched)
            loss = jnp.mean(lam * bpp + mse_base)
            metrics["rd_loss"] = loss
            return (loss + self.aux_weight * aux / 1000.0) * 1000.0, metrics

        s = self.model.residual_scale
        r0 = s * (x - jax.lax.stop_gradient(x_base))
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        a_bar = self.schedule.alpha_bar(t)
        eps = jax.random.normal(k_eps, r0.shape, jnp.float32)
        r_t = add_noise(r0, eps, expand_to(jnp.sqrt(a_bar), r0), expand_to(jnp.sqrt(1 - a_bar), r0))
        r_hat = self.model.apply({"params": params}, r_t, t.astype(jnp.float32), x_base,
                                 out["y_cond"], q, method="denoise")
        x_ref = x_base + r_hat / s
        mse_ref = jnp.mean(jnp.square(x - x_ref), axis=(1, 2, 3))
        lp = (lpips_distance(self.lpips_params, x_ref, x, net=self.lpips_net)
              if self.lpips_params is not None else jnp.zeros((b,)))

        per_example = (lam * bpp + mse_base + (1 - self.rho) * mse_ref
                       + self.rho * LPIPS_TO_MSE * lp)
        loss = jnp.mean(per_example)
        metrics.update(mse_refined=jnp.mean(mse_ref), psnr_refined=psnr(mse_ref),
                       lpips_refined=jnp.mean(lp), rd_loss=loss)
        # The loss is scaled by 255² λᶜ-free units; multiply by a constant so its size (and
        # Adam-independent things such as gradient clipping) resembles the hyperprior's.
        return (loss + self.aux_weight * aux / 1000.0) * 1000.0, metrics
