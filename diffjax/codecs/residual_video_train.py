"""Training task of the residual video codec (Brenig & Timofte, "Higher fidelity perceptual
image and video compression with a latent conditioned residual denoising diffusion model",
video: a frozen video codec as the backbone, the previous frame in the UNet's input,
fine-tuned from pretrained checkpoints, 10 decoding steps).

Per example (a window of ``T`` consecutive frames, :mod:`diffjax.input.backbone_video`):

* the backbone frames: the cached x265 / x264 decodes at the window's random CRF
  (``batch["backbone"]``, ``batch["crf"]``), or the frozen learned backbone run here (the
  gained hyperprior with rounding, at a random rate point);
* frame by frame, as the decoder runs: the refiner sees the backbone frame ``x̂_t`` and the
  previous *refined* frame (``x̂_0`` for the first frame; none with ``prev_frame=False``,
  the ablation); with ``sampler_steps = K > 0`` ("sampler in the loop", as
  :mod:`diffjax.codecs.residual_train`) the decoder's own K-step deterministic DDIM runs
  from ``r_T ~ N(0, I)`` without gradient, the loss is applied to the refiner's ``r̂₀`` at
  a random step ``k`` of that trajectory, and the previous frame handed to the next frame
  is the trajectory's end, rounded to 8 bits: exactly what the decoder feeds back. With
  ``K = 0``: the uniform-timestep denoising loss on the noised true residual, and the
  previous frame is the (stopped) one-step estimate;
* loss on the refined frames ``x̃_t = x̂_t + r̂₀ / s`` (the backbone is frozen, so there is
  no rate term), averaged over the window::

      L = (1 − ρ) · MSE(x, x̃) + ρ · κ · LPIPS(x, x̃)

  with κ of the image task (HiFiC's MSE/LPIPS balance), AlexNet LPIPS.

``init_from_image``: a residual image model (model folder, e.g. the shipped
``diffjax/weights/residual``, or a training workdir) whose parameters start the video
model (:func:`~diffjax.models.video_refiner.from_image_params`: the refiner UNet and, for
the learned backbone, the base; the new input rows at zero). The learned backbone's base
and gains are frozen (``param_labels``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from diffjax.codecs.residual_train import LPIPS_TO_MSE
from diffjax.diffusion.parameterization import add_noise, expand_to
from diffjax.diffusion.samplers import make_plan
from diffjax.diffusion.sampling import run_plan
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.errors import InputError
from diffjax.train.task import Task


class ResidualVideoTask(Task):
    """Refiner training of :class:`~diffjax.models.video_refiner.ResidualVideoModel`.

    ``backbone``: ``"x265"`` / ``"x264"`` (the data's) or ``"learned"``; ``prev_frame``:
    condition on the previous refined frame (``False``: the frame-by-frame ablation);
    ``rho``: perceptual weight; ``sampler_steps``: K (module docstring), also the steps
    the exported codec writes; ``init_from_image``: see the module docstring. Model
    keyword arguments (``refiner_channels``, ``patch``, ``N``, ``M``, ...) pass through.
    """

    codec_name = "residual-video"

    def __init__(self, backbone: str = "x265", prev_frame: bool = True, rho: float = 0.9,
                 lpips_net: str = "alex", sampler_steps: int = 10, init_from_image: str = "",
                 **model_kwargs):
        from diffjax.models.refiner import SCHEDULER_CONFIG
        from diffjax.models.video_refiner import ResidualVideoModel

        model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
        self.model = ResidualVideoModel(backbone=backbone, prev_frame=bool(prev_frame),
                                        **model_kwargs)
        self.rho = float(rho)
        self.lpips_net = lpips_net
        self.sampler_steps = int(sampler_steps)
        if self.sampler_steps < 0:
            raise InputError(f"sampler_steps must be >= 0, got {sampler_steps!r}")
        self.schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
        self.plan = (make_plan(SCHEDULER_CONFIG, "ddim", self.sampler_steps)
                     if self.sampler_steps else None)
        self.init_from_image = str(init_from_image or "")
        self.lpips_params = None
        if self.rho > 0:
            from diffjax.metrics.perceptual import load_lpips_params

            self.lpips_params = load_lpips_params(lpips_net)

    def codec_kwargs(self) -> dict:
        from diffjax.codecs.residual_video import DEFAULT_STEPS

        return {**self.model.config(), "steps": self.sampler_steps or DEFAULT_STEPS}

    def provenance(self) -> dict:
        return {"rho": self.rho, "sampler_steps": self.sampler_steps,
                "prev_frame": bool(self.model.prev_frame),
                "init_from_image": self.init_from_image}

    def init_params(self, rng, batch_spec: Mapping[str, Any]):
        h, w = batch_spec["video"].shape[2:4]
        x = jnp.zeros((1, h, w, 3), jnp.float32)
        params = self.model.init({"params": rng}, x, jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1,), jnp.float32))["params"]
        if self.init_from_image:
            import flax.linen as nn

            from diffjax.models.video_refiner import from_image_params

            loaded = from_image_params(params, self._image_params(), self.model)
            is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
            # keep the logical-axis boxes of init (the train loop's shardings read them)
            params = jax.tree.map(lambda box, v: box.replace_boxed(v) if is_box(box) else v,
                                  params, loaded, is_leaf=is_box)
        return params

    def _image_params(self):
        if not hasattr(self, "_image"):
            from diffjax.codecs.pretrained import load_model

            model = load_model(self.init_from_image)
            if model.codec_name != "residual":
                raise InputError(f"init_from_image {self.init_from_image!r} is a "
                                 f"{model.codec_name} model, not a residual image model")
            self._image = model.params
        return self._image

    def param_labels(self, params):
        if not self.model.learned:
            return None
        from diffjax.train.optim import path_labels

        return path_labels(params, train_only=["^refiner/"])

    def loss_fn(self, params, batch, rng, step):
        from diffjax.metrics.perceptual import lpips_distance

        video = jnp.asarray(batch["video"], jnp.float32)
        b, n = video.shape[:2]
        k_q, k_frames = jax.random.split(rng)
        q = jax.random.randint(k_q, (b,), 0, self.model.num_qualities)
        crf = jnp.asarray(batch.get("crf", jnp.zeros((b,))), jnp.float32).reshape(b)
        s = float(self.model.residual_scale)
        apply = lambda *a, **k: self.model.apply({"params": params}, *a, **k)  # noqa: E731
        prev, totals = None, {"mse_backbone": 0.0, "mse_refined": 0.0, "lpips_refined": 0.0}
        loss = 0.0
        for t, key in enumerate(jax.random.split(k_frames, n)):
            x = video[:, t]
            y_cond = None
            if self.model.learned:
                out = jax.lax.stop_gradient(apply(x, q, train=False, method="base_pass"))
                x_base, y_cond = out["x_base"], out["y_cond"]
            else:
                x_base = jnp.asarray(batch["backbone"][:, t], jnp.float32)
            prev = x_base if prev is None else prev

            def denoise(r, tt, x_base=x_base, prev=prev, y_cond=y_cond):
                tt = jnp.broadcast_to(jnp.asarray(tt, jnp.float32), (b,))
                return apply(r, tt, x_base, prev, y_cond, q, crf, method="denoise")

            k_t, k_eps = jax.random.split(key)
            eps = jax.random.normal(k_eps, x.shape, jnp.float32)
            if self.plan is not None:
                r_t, tt, decoded = self._sampler_state(denoise, eps, k_t, b)
                r_hat = denoise(r_t, tt)
                nxt = jnp.clip(x_base + decoded / s, 0.0, 1.0)
            else:
                r0 = s * (x - x_base)
                tt = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
                a_bar = self.schedule.alpha_bar(tt)
                r_t = add_noise(r0, eps, expand_to(jnp.sqrt(a_bar), r0),
                                expand_to(jnp.sqrt(1 - a_bar), r0))
                r_hat = denoise(r_t, tt.astype(jnp.float32))
                nxt = jnp.clip(x_base + jax.lax.stop_gradient(r_hat) / s, 0.0, 1.0)
            x_ref = x_base + r_hat / s
            mse = jnp.mean(jnp.square(x - x_ref))
            lp = (jnp.mean(lpips_distance(self.lpips_params, x_ref, x, net=self.lpips_net))
                  if self.lpips_params is not None else jnp.zeros(()))
            loss = loss + (1 - self.rho) * mse + self.rho * LPIPS_TO_MSE * lp
            totals["mse_backbone"] += jnp.mean(jnp.square(x - x_base)) / n
            totals["mse_refined"] += mse / n
            totals["lpips_refined"] += lp / n
            # what the decoder feeds back: the refined frame in 8 bits
            prev = jax.lax.stop_gradient(jnp.round(nxt * 255.0) / 255.0)
        loss = loss / n
        psnr = lambda m: -10.0 * jnp.log10(jnp.maximum(m, 1e-10))  # noqa: E731
        metrics = {**totals, "psnr_backbone": psnr(totals["mse_backbone"]),
                   "psnr_refined": psnr(totals["mse_refined"]), "rd_loss": loss}
        # the image task's scale, so gradient clipping and learning rates carry over
        return loss * 1000.0, metrics

    def _sampler_state(self, denoise, noise, key, b):
        """``(r_k, t_k, r_decoded)``: the decoder's deterministic K-step DDIM from
        ``noise`` run without gradient; its state entering a random step ``k``, that step's
        timestep, and the residual it decodes (the trajectory's end)."""
        plan = self.plan
        tab = plan.arrays()
        sg = lambda r, t: jax.lax.stop_gradient(denoise(r, t))  # noqa: E731
        final, traj = run_plan(plan, sg, noise, return_trajectory=True)
        k = jax.random.randint(key, (), 0, plan.num_steps)
        prior = traj["x"][jnp.maximum(k - 1, 0)]
        r_k = jnp.where(k == 0, noise, prior)
        return (jax.lax.stop_gradient(r_k), jnp.full((b,), tab["timesteps"][k], jnp.float32),
                jax.lax.stop_gradient(final))
