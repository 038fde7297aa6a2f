"""Training task of the residual diffusion codec (Brenig & Timofte, poster loss).

Per example (the train loop vmaps ``loss_fn`` over examples, each with its own key):

* draw a quality index ``q ~ U{0..Q-1}`` (one lambda-conditioned model for all rates), or
  from ``quality_weights`` (normalised) to spend more of a stage on some rate points;
* run the gained hyperprior: ``x̂_base``, ``ŷ``, likelihoods (``mixed`` quantisation:
  noise for the rate, straight-through rounding for the decoder, Minnen & Singh 2020);
* diffuse the scaled residual ``r₀ = s · (x − sg(x̂_base))`` to a random timestep
  ``t ~ U{0..999}`` of the cosine schedule, ``r_t = √ᾱ_t r₀ + √(1−ᾱ_t) ε``, and let the
  refiner predict ``r̂₀`` (x0-prediction); the refined image is ``x̂ = x̂_base + r̂₀ / s``;
  or, with ``sampler_steps = K > 0`` ("sampler in the loop"), train the refiner on the
  inputs the decoder really gives it: draw a step ``k ~ U{0..K−1}`` of the decoder's
  K-step deterministic DDIM, run its first ``k`` steps from ``r_T ~ N(0, I)`` with the
  refiner itself (no gradient), and apply the loss below to the refiner's ``r̂₀`` at step
  ``k`` (the last step's ``r̂₀`` is the decoded residual). The uniform-``t`` loss trains
  ``r̂₀`` as a posterior mean, which DDIM's update assumes; with a mostly perceptual loss
  (large ρ) the prediction is no longer that mean, and a refiner trained only on noised
  ground truth degrades over several decoding steps. Training on its own sampler
  trajectory removes that mismatch for the step count the files ask for;
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
import numpy as np

from diffjax.diffusion.parameterization import add_noise, expand_to
from diffjax.diffusion.samplers import get_sampler, make_plan
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.entropy.models import bits
from diffjax.errors import InputError
from diffjax.train.rate_distortion import RateDistortionTask

# HiFiC's MSE/LPIPS balance expressed for MSE on the [0, 1] scale (see the module docstring).
LPIPS_TO_MSE = 1.0 / (255.0 ** 2 * 0.075 * 2.0 ** -5)


def _quality_probs(weights, num_qualities):
    """Normalised sampling probabilities per quality, or ``None`` for uniform sampling."""
    if weights is None:
        return None
    w = [float(v) for v in weights]
    if len(w) != num_qualities or min(w) < 0 or sum(w) <= 0:
        raise InputError(f"quality_weights must give {num_qualities} non-negative weights "
                         f"(one per lambda) with a positive sum, got {list(weights)!r}")
    return jnp.asarray([v / sum(w) for v in w], jnp.float32)


class ResidualTask(RateDistortionTask):
    """Joint training of :class:`~diffjax.models.refiner.ResidualCodecModel`.

    ``lmbdas``: CompressAI-style ``λᶜ`` per quality (ascending = larger files);
    ``rho``: perceptual weight ρ; ``lpips_net``: ``"alex"`` or ``"vgg"`` (``rho = 0`` skips
    LPIPS); ``sampler_steps``: 0 = the uniform-timestep denoising loss, ``K`` = train on the
    decoder's own K-step DDIM trajectory (module docstring); ``quality_weights``: relative
    sampling weight per quality (``None`` = uniform). Model keyword arguments
    (``N``, ``M``, ``refiner_channels``, ...) pass through.
    The entropy-bottleneck quantiles keep the ``"aux"`` optimizer label of
    :class:`RateDistortionTask` (CompressAI's auxiliary optimiser).
    """

    def __init__(self, lmbdas: Sequence[float] = (0.0018, 0.0050, 0.0130, 0.0483),
                 rho: float = 0.5, lpips_net: str = "alex", aux_weight: float = 1.0,
                 refine: bool = True, sampler_steps: int = 0,
                 quality_weights: Sequence[float] | None = None, **model_kwargs):
        from diffjax.models.refiner import SCHEDULER_CONFIG, ResidualCodecModel

        self.lmbdas = tuple(float(v) for v in lmbdas)
        self.quality_probs = _quality_probs(quality_weights, len(self.lmbdas))
        model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
        self.model = ResidualCodecModel(num_qualities=len(self.lmbdas), **model_kwargs)
        self.rho = float(rho)
        self.refine = bool(refine)
        self.aux_weight = float(aux_weight)
        self.lpips_net = lpips_net
        self.schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
        self.sampler_steps = int(sampler_steps)
        if self.sampler_steps < 0:
            raise InputError(f"sampler_steps must be >= 0, got {sampler_steps!r}")
        self.plan = (make_plan(SCHEDULER_CONFIG, "ddim", self.sampler_steps)
                     if self.sampler_steps else None)
        self.lpips_params = None
        if self.rho > 0 and self.refine:
            from diffjax.metrics.perceptual import load_lpips_params

            self.lpips_params = load_lpips_params(lpips_net)

    codec_name = "residual"

    def codec_kwargs(self) -> dict:
        from diffjax.codecs.residual import DEFAULT_STEPS

        return {**self.model.config(), "steps": DEFAULT_STEPS}

    def provenance(self) -> dict:
        return {"lmbdas": list(self.lmbdas), "rho": self.rho}

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
        q = self.draw_quality(k_q, b)
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
        denoise = lambda r, t: self.model.apply(  # noqa: E731
            {"params": params}, r, t, x_base, out["y_cond"], q, method="denoise")
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
        if self.plan is not None:
            r_t, t = self._sampler_state(params, denoise, eps, k_t, b)
        else:
            r0 = s * (x - jax.lax.stop_gradient(x_base))
            t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
            a_bar = self.schedule.alpha_bar(t)
            r_t = add_noise(r0, eps, expand_to(jnp.sqrt(a_bar), r0),
                            expand_to(jnp.sqrt(1 - a_bar), r0))
        r_hat = denoise(r_t, t.astype(jnp.float32))
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

    def draw_quality(self, key, b):
        """``b`` quality indices: uniform, or distributed as ``quality_weights``."""
        if self.quality_probs is None:
            return jax.random.randint(key, (b,), 0, len(self.lmbdas))
        return jax.random.choice(key, len(self.lmbdas), (b,), p=self.quality_probs)

    def _sampler_state(self, params, denoise, noise, key, b):
        """``(r, timesteps)`` entering a random step ``k ~ U{0..K−1}`` of the decoder's
        deterministic DDIM, reached from ``r_T = noise`` by running the refiner without
        gradient (what :class:`~diffjax.codecs.residual.ResidualCodec` decodes with K steps)."""
        plan, sampler = self.plan, get_sampler("ddim")
        tab = plan.arrays()
        k = jax.random.randint(key, (b,), 0, plan.num_steps)
        r = noise
        for i in range(plan.num_steps - 1):
            t_i = jnp.full((b,), tab["timesteps"][i], jnp.float32)
            out = jax.lax.stop_gradient(denoise(r, t_i))
            r_next, _, _ = sampler.step(plan, tab, i, r, out, (), None, True, 0.0)
            r = jnp.where(expand_to(i < k, r), r_next, r)
        return jax.lax.stop_gradient(r), tab["timesteps"][k]


def add_rate_point(model, lmbda: float, end: str = "low"):
    """A copy of ``model`` with one more rate point below (``end="low"``) or above the others.

    The new gain rows continue the two nearest rows geometrically (log-linear
    extrapolation, as Cui et al. 2021 interpolate gains between trained rates), and the
    refiner's quality one-hot input channel copies the nearest quality's weights, so the
    new point starts as a sensible codec and fine-tuning with ``lmbda`` (CompressAI's
    ``λᶜ`` of the new point) only has to refine it. Existing points keep their parameters;
    with ``end="low"`` their quality indices move up by one.
    """
    from diffjax.codecs.pretrained import LoadedModel, _device, _to_numpy

    if end not in ("low", "high"):
        raise ValueError(f"end must be 'low' or 'high', not {end!r}")
    if model.num_qualities < 2:
        raise ValueError("extrapolating a gain needs a model with at least two rate points")
    lmbdas = [float(v) for v in model.info.get("lmbdas", ())]
    if len(lmbdas) != model.num_qualities:
        raise ValueError(f"model.json lists {len(lmbdas)} lambdas for "
                         f"{model.num_qualities} qualities")
    low = end == "low"
    if (low and not lmbda < lmbdas[0]) or (not low and not lmbda > lmbdas[-1]):
        raise ValueError(f"lambda {lmbda} is not {'below' if low else 'above'} the model's "
                         f"range {lmbdas[0]}..{lmbdas[-1]}")
    params = _to_numpy(model.params)

    def extend(rows: np.ndarray) -> np.ndarray:
        logs = np.log(rows)
        new = 2 * logs[0] - logs[1] if low else 2 * logs[-1] - logs[-2]
        stacked = [new[None], logs] if low else [logs, new[None]]
        return np.exp(np.concatenate(stacked)).astype(np.float32)

    params["gain"] = extend(params["gain"])
    params["inv_gain"] = extend(params["inv_gain"])
    kernel = params["refiner"]["unet"]["conv_in"]["kernel"]  # [..., in, out], one-hot last
    q = model.num_qualities
    head, onehot = kernel[..., :-q, :], kernel[..., -q:, :]
    new = onehot[..., :1, :] if low else onehot[..., -1:, :]
    params["refiner"]["unet"]["conv_in"]["kernel"] = np.concatenate(
        [head, new, onehot] if low else [head, onehot, new], axis=-2)
    config = {**model.config, "num_qualities": q + 1}
    info = {**model.info, "lmbdas": [lmbda] + lmbdas if low else lmbdas + [lmbda]}
    return LoadedModel("residual", config, _device(params), info, model.source)
