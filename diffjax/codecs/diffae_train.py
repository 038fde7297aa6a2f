"""Training the diffusion-autoencoder image codec (Rampas 2024) with ``experiments/train.py``.

:class:`DiffAETask` trains the encoder (EfficientNetV2-S + 1x1 projection + affine-free
BatchNorm), the learned prior of every quality and the UNet decoder together with
:func:`diffjax.codecs.diffae.diffae_loss`; the first-stage autoencoder (TAEF2 or an
SD-compatible VAE) is frozen.

* **BatchNorm statistics** are the task's model state (:attr:`Task.stateful`): the train
  state carries ``{"encoder": {"batch_stats": ...}}`` beside the parameters, the step
  replaces it with the batch's updated running averages, Orbax checkpoints it, and
  exports / ``--model WORKDIR`` merge it back into the codec's parameter tree
  (``{"encoder": {"params", "batch_stats"}}``). Batch statistics couple the examples of a
  batch, so the loss gets the whole batch and one key (``per_example_rng = False``).
* **Target and weighting** (the thesis's Table 1 ablation): ``codec.prediction_type``
  (``"sample"`` = x0, the default; ``"epsilon"``; ``"v_prediction"``) is a codec argument
  because the sampler must know it; ``weighting`` is ``"min_snr"`` (gamma 5, Hang et al.
  2023; the default, the thesis's best with x0), ``"constant"``, ``"p2"`` (Choi et al.
  2022; ``p2_k``, ``p2_gamma``) or ``"sech"`` (Kingma & Gao 2023). The config's arguments
  ``eps|x0|v`` and ``const|p2|minsnr|sech`` set them (``experiments/configs/diffae.py``).
* **Video** (:class:`DiffAEVideoTask`, Rampas 2024 sec. 3.4.1): the same loss on clips of
  ``group_frames`` frames (``{"video": [B, T, H, W, 3]}`` batches) through the video
  codec's per-frame encoder, temporal compression and deflate layers and its 3-D UNet.
* **Rates**: a quality (quantisation step) is drawn per example (``quality_weights``:
  relative probabilities, ``None`` = uniform); the prior's quantiles carry the ``"aux"``
  optimizer label (CompressAI's auxiliary optimiser).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.diffae import DiffAECodec, diffae_loss
from diffjax.codecs.diffae_video import DiffAEVideoCodec
from diffjax.codecs.foundation import host_params
from diffjax.diffusion.losses import Weighting
from diffjax.errors import InputError
from diffjax.nn.layers import host_random_params
from diffjax.train.task import Task, merge_trees

WEIGHTINGS = ("constant", "min_snr", "p2", "sech")


def make_weighting(kind: str, *, min_snr_gamma: float = 5.0, p2_k: float = 1.0,
                   p2_gamma: float = 1.0) -> Weighting:
    """The loss weighting of the ablation (``constant`` / ``p2`` / ``min_snr`` / ``sech``)."""
    if kind not in WEIGHTINGS:
        raise InputError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")
    if kind == "p2":
        return Weighting("p2", k=float(p2_k), gamma=float(p2_gamma))
    return Weighting(kind, gamma=float(min_snr_gamma))


class DiffAETask(Task):
    """Train a :class:`~diffjax.codecs.diffae.DiffAECodec` (see the module docstring).

    Args (``config.task.kwargs``):
      codec: the codec's constructor arguments (``experiments/configs/diffae.py``).
      rate_weight: weight of the bits per pixel in the loss.
      p_uncond: condition dropout probability (classifier-free guidance).
      weighting, min_snr_gamma, p2_k, p2_gamma: the loss weighting.
      quality_weights: relative probability of each quality (``None``: uniform).
      aux_weight: weight of the prior's quantile loss.
    """

    per_example_rng = False
    stateful = True
    codec_name = "diffae"
    codec_class = DiffAECodec
    input_key = "image"

    def __init__(self, codec: Mapping, rate_weight: float = 0.01, p_uncond: float = 0.1,
                 weighting: str = "min_snr", min_snr_gamma: float = 5.0, p2_k: float = 1.0,
                 p2_gamma: float = 1.0, quality_weights: Sequence[float] | None = None,
                 aux_weight: float = 1.0):
        self._codec_kwargs = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in dict(codec).items()}
        self.codec = self.codec_class(quality=0, **dict(codec))
        self.weighting_name = weighting
        self.weighting = make_weighting(weighting, min_snr_gamma=min_snr_gamma, p2_k=p2_k,
                                        p2_gamma=p2_gamma)
        self.rate_weight, self.p_uncond = float(rate_weight), float(p_uncond)
        self.aux_weight = float(aux_weight)
        if not 0.0 <= self.p_uncond < 1.0:
            raise InputError(f"p_uncond must be in [0, 1), got {p_uncond!r}")
        n = len(self.codec.quant_steps)
        w = np.ones(n) if quality_weights is None else np.asarray(quality_weights, np.float64)
        if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
            raise InputError(f"quality_weights must be {n} non-negative numbers, got "
                             f"{quality_weights!r}")
        self.quality_logits = np.log(np.maximum(w / w.sum(), 1e-30)).astype(np.float32)

    # ----------------------------------------------------------------- codec convention
    def codec_kwargs(self) -> dict:
        return dict(self._codec_kwargs)

    def provenance(self) -> dict:
        return {"prediction_type": self.codec.prediction_type, "weighting": self.weighting_name,
                "rate_weight": self.rate_weight, "p_uncond": self.p_uncond}

    # ----------------------------------------------------------------- parameters
    @functools.cached_property
    def _shapes(self) -> dict:
        """Parameter shapes of every part (traced once, outside any jit)."""
        return self.codec.param_shapes()

    def init_params(self, rng, batch_spec=None) -> dict:
        """Host-drawn encoder / UNet kernels and first stage (out of the compiled init,
        :func:`~diffjax.codecs.foundation.host_params`), the prior's own initialisers."""
        shapes = self._shapes
        seed = jax.random.key_data(rng).reshape(-1)[-1]

        nets = [k for k in shapes if k not in ("encoder", "vae")]  # unet (+ temporal)

        def load(seed):
            s = int(seed)
            out = {"encoder": {"params": host_random_params(shapes["encoder"]["params"], s + 1)},
                   "vae": self.codec.first_stage.load(s + 3, shapes["vae"])}
            for k in nets:  # the seeds of the codecs' own init
                out[k] = host_random_params(shapes[k], s + {"unet": 2, "temporal": 4}[k])
            return out

        template = {"encoder": {"params": shapes["encoder"]["params"]}, "vae": shapes["vae"],
                    **{k: shapes[k] for k in nets}}
        params = host_params(template, load, seed)
        params["entropy"] = self.codec.entropy.init(
            rng, jnp.zeros((1, self.codec.entropy.channels)), train=False)["params"]
        return params

    def init_model_state(self, rng, batch_spec=None) -> dict:
        """BatchNorm running statistics: mean 0, variance 1."""
        stats = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.full(a.shape, 1.0 if p[-1].key == "var" else 0.0, a.dtype),
            self._shapes["encoder"]["batch_stats"])
        return {"encoder": {"batch_stats": stats}}

    def param_labels(self, params):
        from diffjax.train.optim import TRAINABLE, path_labels

        base = jax.tree_util.tree_map_with_path(
            lambda path, _: "aux" if "quantiles" in jax.tree_util.keystr(path) else TRAINABLE,
            params)
        return path_labels(params, freeze=[r"^vae/"], base=base)

    # ----------------------------------------------------------------- loss
    def draw_quality(self, key, batch: int):
        return jax.random.categorical(key, jnp.asarray(self.quality_logits), shape=(batch,))

    def loss_fn(self, params, batch, rng, step, model_state):
        k_q, k_loss = jax.random.split(rng)
        x = batch[self.input_key].astype(jnp.float32)
        # the first stage is frozen: no weight gradients through it
        full = merge_trees(dict(params, vae=jax.lax.stop_gradient(params["vae"])), model_state)
        loss, metrics, stats = diffae_loss(
            self.codec, full, x, k_loss, rate_weight=self.rate_weight, p_uncond=self.p_uncond,
            weighting=self.weighting, quality=self.draw_quality(k_q, x.shape[0]),
            aux_weight=self.aux_weight)
        return loss, metrics, {"encoder": {"batch_stats": stats}}


class DiffAEVideoTask(DiffAETask):
    """Train a :class:`~diffjax.codecs.diffae_video.DiffAEVideoCodec` on frame groups
    (arguments as :class:`DiffAETask`; ``codec`` from ``experiments/configs/diffae_video.py``)."""

    codec_name = "diffae-video"
    codec_class = DiffAEVideoCodec
    input_key = "video"
