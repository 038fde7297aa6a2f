"""First stage of the measured foundation-codec instance: a latent denoiser for low noise.

The foundation latent codec (Relic et al., "Lossy Image Compression with Foundation
Diffusion Models", ECCV 2024; :mod:`diffjax.codecs.foundation`) runs only the *end* of the
denoising process of a frozen diffusion prior (2-7 % of it in the paper): the quantised
latent plays the part of a slightly noisy one. Without Stable Diffusion weights we train
that prior ourselves, on the latents of a frozen TAESD-family autoencoder (TAEF2: FLUX.2
latent space, 32 channels, /8), and only on the low noise levels the codec visits.

Training (:class:`LatentDenoiserTask`, one example per RNG key as in :mod:`diffjax.train.task`):

* ``y = (mode(E(x)) - shift) * scaling_factor`` -- exactly
  :meth:`diffjax.codecs.foundation.Backbone.encode`, with the encoder frozen (its weights
  are host constants of the task, not trained parameters, so the train state, the
  checkpoints and the export hold the denoiser alone);
* ``t ~ U(t_min, t_max)`` in continuous time (``t_min = 1 / N``, the first training step;
  ``t_max`` e.g. 0.25 of the 1000-step SD 2.1 schedule). The codec evaluates the denoiser at
  continuous ``t`` through the PCHIP-interpolated schedule (fractional timestep ``t N - 1``),
  so training samples the same continuum, not only the integer grid;
* ``y_t = alpha(t) y + sigma(t) eps`` and the weighted denoising loss of
  :func:`diffjax.diffusion.losses.denoising_loss` in the scheduler's ``prediction_type``
  (SD 2.1: ``v_prediction``), weighting min-SNR-5 by default (Hang et al. 2023; at these
  low noise levels it is a constant weight on the x0 error, which is what the codec's
  distortion sees);
* the UNet's cross-attention context is zeros ``[B, 1, cross_attention_dim]``
  (:meth:`Backbone.context` without a stored context), as the second stage uses it;
* batches are images (encoded in the step) or latents encoded once by the same frozen
  encoder (``{"latent"}`` batches of ``data.kind = "latents"``,
  :mod:`diffjax.input.latent_cache`). With ``t_max = 1`` this trains a whole latent
  diffusion model (``experiments/configs/ldm_taef2.py``).

Metrics: ``loss`` (weighted), ``mse`` (unweighted, in the target space), ``x0_mse`` (error
of the implied clean latent, converted exactly from the target-space error),
``x0_mse_identity`` (the expected x0 error ``1 / SNR`` of using ``y_t / alpha`` as is, i.e.
no denoiser: the baseline ``x0_mse`` must beat) and ``t``.

Export (:func:`export_denoiser`): a training workdir of ``experiments/train.py``
(``config.json`` + Orbax ``checkpoints/``) -> a diffjax model directory
(:func:`diffjax.convert.core.save_pretrained`), the ``task.kwargs.unet_path`` of
``experiments/configs/foundation_taef2.py``::

    python -m diffjax.codecs.latent_denoiser runs/taef2-denoiser runs/taef2-denoiser/export
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.foundation import Backbone, host_params
from diffjax.diffusion.losses import WEIGHTINGS, Weighting, denoising_loss
from diffjax.errors import CheckpointError, InputError
from diffjax.nn.layers import host_random_params
from diffjax.train.task import Task

TASK_NAME = "latent_denoiser"


def x0_error_factor(alpha, sigma, prediction_type: str):
    """``||x0 - x0_hat||^2 / ||target - output||^2`` at fixed ``x_t`` (exact, per example).

    eps: ``sigma^2 / alpha^2`` (``x0 = (x_t - sigma eps) / alpha``); x0: 1; v:
    ``sigma^2`` (``x0 = alpha x_t - sigma v``), see :mod:`diffjax.diffusion.parameterization`.
    """
    return {"epsilon": jnp.square(sigma / alpha), "sample": jnp.ones_like(alpha),
            "v_prediction": jnp.square(sigma)}[prediction_type]


def denoiser_unet_config(unet_config: Mapping, scheduler_config: Mapping) -> dict:
    """The UNet config with ``prediction_type`` set to the scheduler's (what it learns)."""
    from diffjax.diffusion.parameterization import canonical_prediction_type
    from diffjax.diffusion.schedules import load_scheduler_config

    sched = load_scheduler_config(scheduler_config)
    out = dict(unet_config)
    out["prediction_type"] = canonical_prediction_type(
        sched.get("prediction_type", out.get("prediction_type", "epsilon")))
    return out


class LatentDenoiserTask(Task):
    """Train a ``UNet2DConditionModel`` on frozen-autoencoder latents at ``t <= t_max``.

    Args (``config.task.kwargs``):
      vae_config: the TAESD-family autoencoder (``latent_channels``, ``arch_variant``,
        ``scaling_factor``, ``shift_factor``), as :class:`~diffjax.codecs.foundation.Backbone`.
      taesd_encoder: the encoder ``.pth`` (e.g. ``../shared/data/taesd/taef2_encoder.pth``);
        ``None``/``""`` = a random encoder (tests only).
      unet_config: diffusers ``UNet2DConditionModel`` config (in/out channels = latent
        channels); its ``prediction_type`` is set to the scheduler's.
      scheduler_config: diffusers scheduler config; ``prediction_type`` is read from it.
      t_max: highest continuous noise level trained, in ``(t_min, 1]``.
      weighting, snr_gamma: a :data:`~diffjax.diffusion.losses.WEIGHTINGS` name; ``gamma``
        of ``min_snr`` (and ``p2``).

    Parameters are ``{"unet": ...}``; everything in them trains.
    """

    per_example_rng = True

    def __init__(self, vae_config: Mapping, unet_config: Mapping, scheduler_config: Mapping,
                 taesd_encoder: str | None = None, t_max: float = 0.25,
                 weighting: str = "min_snr", snr_gamma: float = 5.0, vae: str = "taesd"):
        if vae != "taesd":
            raise InputError(f"the latent denoiser task trains on a TAESD-family autoencoder "
                             f"(vae='taesd'), got {vae!r}; SD backbones ship their own UNet")
        self.unet_config = denoiser_unet_config(unet_config, scheduler_config)
        self.backbone = Backbone("taesd", vae_config, self.unet_config, scheduler_config)
        self.vae_config = dict(vae_config)
        self.scheduler_config = dict(self.backbone.scheduler_config)
        self.taesd_encoder = taesd_encoder or None
        self.t_min = float(self.backbone.t_min)
        self.t_max = float(t_max)
        if not self.t_min < self.t_max <= 1.0:
            raise InputError(f"t_max must be in ({self.t_min}, 1], got {t_max}")
        if weighting not in WEIGHTINGS:
            raise InputError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        self.weighting = Weighting(weighting, gamma=float(snr_gamma))
        # The frozen encoder, loaded now (outside any trace) as host numpy arrays: they
        # become constants of the jitted step, never trained parameters.
        self.vae_params = {"encoder": jax.tree.map(lambda a: np.asarray(a, np.float32),
                                                   self._load_encoder())}

    def _load_encoder(self):
        enc_module = self.backbone.taesd[0]
        if self.taesd_encoder:
            from diffjax.models.taesd import load_taesd

            module, enc = load_taesd(self.taesd_encoder, kind="encoder")
            if (module.latent_channels, module.arch_variant) != (enc_module.latent_channels,
                                                                 enc_module.arch_variant):
                raise CheckpointError(
                    f"{self.taesd_encoder} is a {module.latent_channels}-channel "
                    f"{module.arch_variant!r} encoder; vae_config asks for "
                    f"{enc_module.latent_channels} channels, {enc_module.arch_variant!r}")
            return enc
        import flax.linen as nn  # no path: a random encoder (tests)

        s = enc_module.factor
        shapes = nn.unbox(jax.eval_shape(lambda: enc_module.init(
            jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"]))
        return host_random_params(shapes, 0)

    # ----------------------------------------------------------------- task protocol
    def init_params(self, rng, batch_spec=None) -> dict:
        """``{"unet": ...}``: LeCun-normal kernels (``N(0, 1 / fan_in)``), unit norm scales,
        zero biases -- Flax's defaults, drawn on the host from ``rng`` (tracing and
        compiling the UNet's Flax initialisers costs more CPU time than a short run)."""
        import flax.linen as nn

        unet = self.backbone.unet
        args, kw = unet.dummy_inputs()  # fully convolutional: shapes do not depend on H, W
        shapes = nn.unbox(jax.eval_shape(lambda: unet.init(jax.random.key(0), *args, **kw)))
        seed_words = jax.random.key_data(rng).reshape(-1)
        return {"unet": host_params(shapes["params"], lambda w: host_random_params(
            shapes["params"], int.from_bytes(np.asarray(w, "<u4").tobytes(), "little")),
            seed_words)}

    def latents(self, x: jax.Array, vae_params: Mapping | None = None) -> jax.Array:
        """Images ``[B, H, W, 3]`` in ``[0, 1]`` -> diffusion latents (no gradient)."""
        vae_params = self.vae_params if vae_params is None else vae_params
        return jax.lax.stop_gradient(self.backbone.encode(vae_params, x))

    def loss_terms(self, params, x, rng, *, vae_params=None, t=None, noise=None, y=None):
        """``(loss, metrics, aux)`` for images ``x``; ``aux`` holds per-example ``t``,
        ``per_example`` (target-space MSE) and ``x0_mse``. ``t`` / ``noise`` may be given
        (tests); ``vae_params`` defaults to the frozen encoder. ``y``: the diffusion latents
        ``[B, h, w, C]`` already computed (a latent cache, :mod:`diffjax.input.latent_cache`);
        then ``x`` is not used."""
        bb = self.backbone
        if y is None:
            y = self.latents(x, vae_params)
        else:
            chex.assert_rank(y, 4)
            if y.shape[-1] != bb.latent_channels:
                raise InputError(f"latents have {y.shape[-1]} channels, the autoencoder "
                                 f"{bb.latent_channels}")
            y = jax.lax.stop_gradient(y.astype(jnp.float32))
        ctx = bb.context({}, y.shape[0])

        def denoise(y_t, time, context):
            return bb.unet_apply(params["unet"], y_t, time, context)

        loss, aux = denoising_loss(denoise, y, rng, schedule=bb.schedule,
                                   prediction_type=bb.prediction_type, weighting=self.weighting,
                                   cond=ctx, t=t, noise=noise, t_range=(self.t_min, self.t_max))
        a, s = bb.schedule.alpha_sigma(aux["t"])
        x0_mse = aux["per_example"] * x0_error_factor(a, s, bb.prediction_type)
        aux = dict(aux, x0_mse=x0_mse)
        metrics = {"mse": jnp.mean(aux["per_example"]), "x0_mse": jnp.mean(x0_mse),
                   "x0_mse_identity": jnp.mean(jnp.square(s / a)), "t": jnp.mean(aux["t"])}
        return loss, metrics, aux

    def loss_fn(self, params, batch, rng, step):
        """Batches of images (``{"image"}``, encoded here) or of cached latents
        (``{"latent"}``: ``data.kind = "latents"``, encoded once by the same frozen encoder)."""
        if "latent" in batch:
            loss, metrics, _ = self.loss_terms(params, None, rng, y=batch["latent"])
        else:
            loss, metrics, _ = self.loss_terms(params, batch["image"], rng)
        return loss, metrics


# ----------------------------------------------------------------------------- export


def read_workdir(workdir: str | pathlib.Path, step: int | None = None,
                 use_ema: bool | None = None) -> tuple[dict, dict, dict]:
    """``(config, unet_params, info)`` of a latent-denoiser training workdir.

    Reads ``params`` (or ``ema_params``: ``use_ema=None`` picks them when the run kept an
    EMA) of checkpoint ``step`` (default: the latest) without rebuilding the optimizer.
    """
    from diffjax.train.checkpoint import read_workdir_params

    cfg, params, info = read_workdir_params(workdir, step=step, use_ema=use_ema, task=TASK_NAME)
    return cfg, params["unet"], info


def export_denoiser(workdir: str | pathlib.Path, directory: str | pathlib.Path, *,
                    step: int | None = None, use_ema: bool | None = None,
                    overwrite: bool = False, param_dtype: str | None = None,
                    metadata_extra: Mapping | None = None) -> pathlib.Path:
    """Write the denoiser of a training workdir as a diffjax model directory.

    The result loads with :func:`diffjax.convert.core.load_pretrained` and is what
    :class:`~diffjax.codecs.foundation.FoundationTask` takes as ``unet_path``. The
    metadata records the scheduler config and ``t_max`` it was trained with (the second
    stage must use the same scheduler) and the training data licence note;
    ``metadata_extra`` adds to it. ``param_dtype`` (e.g. ``"float16"``, half the size) casts the stored
    floating-point parameters; ``load_pretrained(..., param_dtype=jnp.float32)`` casts back.
    """
    from diffjax.convert.core import save_pretrained

    from diffjax.convert.core import build_model
    from diffjax.diffusion.schedules import load_scheduler_config

    cfg, unet, info = read_workdir(workdir, step, use_ema)
    if param_dtype is not None:
        try:
            target = np.dtype(param_dtype)
        except TypeError as err:
            raise InputError(f"unknown param_dtype {param_dtype!r}") from err
        if not np.issubdtype(target, np.floating):
            raise InputError(f"param_dtype must be a floating-point type, got {param_dtype!r}")
        unet = jax.tree.map(lambda a: np.asarray(a, target)
                            if np.issubdtype(np.asarray(a).dtype, np.floating) else a, unet)
    kw = dict(cfg["task"]["kwargs"])
    module = build_model(denoiser_unet_config(kw["unet_config"], kw["scheduler_config"]),
                         "UNet2DConditionModel")
    data_cfg = cfg.get("data", {}) or {}
    data = str(data_cfg.get("path", ""))
    # a latent cache (data.kind = "latents") names its image folders in its spec
    cached = [str(p) for p in (data_cfg.get("latent_cache") or {}).get("images", [])]
    metadata = {
        "source": "diffjax latent denoiser (diffjax.codecs.latent_denoiser)",
        "workdir": str(pathlib.Path(workdir).absolute()), "step": info["step"],
        "ema": info["ema"], "t_max": float(kw.get("t_max", 0.25)),
        "weighting": kw.get("weighting", "min_snr"),
        "scheduler_config": load_scheduler_config(kw["scheduler_config"]),
        "vae_config": dict(kw["vae_config"]), "taesd_encoder": kw.get("taesd_encoder"),
        "data": data,
        "license_note": ("trained on BSDS500 (non-commercial research only)"
                         if any("bsds" in d.lower() for d in [data] + cached) else ""),
    }
    metadata.update(dict(metadata_extra or {}))
    return save_pretrained(directory, module, unet, metadata=metadata, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffjax.codecs.latent_denoiser",
        description="Export a latent-denoiser training workdir as a diffjax model directory "
                    "(the unet_path of experiments/configs/foundation_taef2.py).")
    parser.add_argument("workdir")
    parser.add_argument("output")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", dest="use_ema", action="store_true", default=None,
                        help="export the EMA parameters (default: when the run kept them)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from diffjax.errors import DiffjaxError

    try:
        out = export_denoiser(args.workdir, args.output, step=args.step, use_ema=args.use_ema,
                              overwrite=args.overwrite)
    except DiffjaxError as err:
        print(f"latent_denoiser export: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
