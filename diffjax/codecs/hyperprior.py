"""The hyperprior codec: scale (Ballé 2018) or mean-scale (Minnen 2018) hyperprior.

Encode (Ballé et al., ICLR 2018, fig. 4; Minnen et al., NeurIPS 2018, fig. 1 without the
context model): edge-pad the uint8 image to a multiple of 64, ``y = g_a(x)``,
``z = h_a(y)``; ``ẑ = round(z - median) + median`` is coded with the factorized table
(one row per channel); ``(σ, μ) = h_s(ẑ)``; ``round(y - μ)`` is coded with the Gaussian
table row of ``σ``. Decode mirrors it and crops back.

Bitstream sections (inside the ``diffjax.entropy.bitstream`` container, codec id 1):
``z`` (the hyper-latent stream) and ``y`` (the latent stream). Each stream carries the
CRC32 of its symbols (``diffjax.entropy.coder``). The y rows come from the decoder's own
``h_s`` evaluation; if a platform computed another row than the encoder did (different
floating-point results), the decoded symbols differ and, since the container CRC has
already vouched for the bytes, that is reported as :class:`WrongModelError` instead of
returning a garbage image.

The fingerprint hashes the parameters, the model configuration and both integer CDF
tables. Network stages are jitted once per shape and cached on the codec object (the
codec is an entry point, like a sampler); entropy coding runs on the host.

    codec = diffjax.codecs.get("hyperprior", N=128, M=192, mean_scale=True)
    data = codec.encode(params, image)      # uint8 [H, W, 3] -> bytes
    image2 = codec.decode(params, data)     # -> uint8 [H, W, 3]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.base import (
    Codec,
    check_image,
    crop,
    fingerprint_pytree,
    pad_to_multiple,
    register,
)
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache, LatentCoder, check_symbols, group_indexes
from diffjax.entropy.models import (
    DEFAULT_SCALE_TABLE,
    bits,
    factorized_medians,
    factorized_table,
    gaussian_table,
)
from diffjax.errors import InputError
from diffjax.models.hyperprior import STRIDE, HyperpriorModel

@dataclasses.dataclass(frozen=True)
class _Prepared:
    fingerprint: bytes
    coder: LatentCoder
    medians: np.ndarray


@register("hyperprior")
class HyperpriorCodec(Codec):
    """Codec around :class:`~diffjax.models.hyperprior.HyperpriorModel` (see module doc).

    ``params`` is the model's ``"params"`` collection (a ``{"params": ...}`` variables
    dict is accepted too).
    """

    name = "hyperprior"
    codec_id = 1

    def __init__(self, N: int = 128, M: int = 192, mean_scale: bool = False,
                 scale_table: Sequence[float] = DEFAULT_SCALE_TABLE):
        self.model = HyperpriorModel(N=int(N), M=int(M), mean_scale=bool(mean_scale),
                                     scale_table=tuple(float(s) for s in scale_table))
        self.y_table = gaussian_table(self.model.scale_table)
        self._config = (f"hyperprior/N={self.model.N}/M={self.model.M}/"
                        f"mean_scale={self.model.mean_scale}").encode()
        self._cache = IdentityCache()
        m = self.model

        def analyze(p, x, medians):
            def f(mod, x):
                y = mod.analysis(x)
                return y, jnp.round(mod.hyper_analysis(y) - medians).astype(jnp.int32)
            return m.apply({"params": p}, x, method=f)

        def hyper(p, z_sym, medians):
            def f(mod, z_sym):
                scales, means = mod.hyper_synthesis(z_sym.astype(jnp.float32) + medians)
                means = jnp.zeros_like(scales) if means is None else means
                return mod.table_indexes(scales), means
            return m.apply({"params": p}, z_sym, method=f)

        def synthesize(p, y_sym, means):
            x = m.apply({"params": p}, y_sym.astype(jnp.float32) + means, method="synthesis")
            return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)

        def estimate(p, x):
            out = m.apply({"params": p}, x, train=False)
            return {k: bits(v) for k, v in out["likelihoods"].items()}

        def init(key, size):
            x = jnp.zeros((1, size, size, 3), jnp.float32)
            return m.init({"params": key}, x, train=False)["params"]

        self._init = jax.jit(init, static_argnums=1)
        self._analyze, self._hyper = jax.jit(analyze), jax.jit(hyper)
        self._synthesize, self._estimate = jax.jit(synthesize), jax.jit(estimate)

    # ----------------------------------------------------------------- parameters
    def init(self, rng: jax.Array, size: int = STRIDE) -> dict:
        """Random parameters (the ``"params"`` collection; jitted: an ``impl="rbg"`` key
        compiles several times faster on CPU than the default threefry)."""
        return self._init(rng, size)

    @staticmethod
    def _unwrap(params: Any) -> Any:
        if isinstance(params, dict) and set(params) == {"params"}:
            return params["params"]
        return params

    def _prepared(self, params: Any) -> _Prepared:
        return self._cache.get(params, self._prepare)

    def _prepare(self, params: Any) -> _Prepared:
        try:
            eb = params["entropy_bottleneck"]
        except (KeyError, TypeError) as err:
            raise InputError("params are not HyperpriorModel parameters") from err
        z_table = factorized_table(eb)
        return _Prepared(
            fingerprint_pytree(params, self._config, z_table.digest(), self.y_table.digest()),
            LatentCoder(z_table, self.y_table), factorized_medians(eb))

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(self._unwrap(params)).fingerprint

    # ----------------------------------------------------------------- helpers
    def geometry(self, height: int, width: int):
        """``(z_shape, y_shape)`` of an image of that size (one example, no batch axis)."""
        hp, wp = -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE
        return (hp // STRIDE, wp // STRIDE, self.model.N), (hp // 16, wp // 16, self.model.M)

    def latents(self, params: Any, images: np.ndarray) -> dict:
        """Quantised latents of a batch ``[B, H, W, 3]`` uint8 (same size), host arrays.

        Returns ``y_symbols``, ``z_symbols``, ``indexes`` (Gaussian table rows) and
        ``means``; ``y_hat = y_symbols + means`` is what the decoder synthesises.
        """
        p = self._unwrap(params)
        prep = self._prepared(p)
        x = pad_to_multiple(np.asarray(images), STRIDE).astype(np.float32) / 255.0
        y, z_sym = self._analyze(p, x, prep.medians)
        idx, means = self._hyper(p, z_sym, prep.medians)
        y, means = np.asarray(y), np.asarray(means)
        return {"y_symbols": check_symbols(y - means), "z_symbols": np.asarray(z_sym),
                "indexes": np.asarray(idx), "means": means}

    def estimate_bits(self, params: Any, image: np.ndarray) -> dict:
        """The model's evaluation-mode rate of one image in bits: ``{"y", "z", "total"}``."""
        p = self._unwrap(params)
        x = pad_to_multiple(check_image(image), STRIDE)[None].astype(np.float32) / 255.0
        est = {k: float(v) for k, v in self._estimate(p, x).items()}
        est["total"] = est["y"] + est["z"]
        return est

    # ----------------------------------------------------------------- protocol
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        return self.encode_batch(params, [image])[0]

    def decode(self, params: Any, data: bytes) -> np.ndarray:
        return self.decode_batch(params, [data])[0]

    def encode_batch(self, params: Any, images: Sequence[np.ndarray]) -> list:
        """Encode images; those of the same padded size share one network call."""
        p = self._unwrap(params)
        prep = self._prepared(p)
        images = [check_image(im) for im in images]
        out: list = [None] * len(images)
        for members in group_indexes(images, lambda im: self.geometry(*im.shape[:2])).values():
            padded = np.stack([pad_to_multiple(images[i], STRIDE) for i in members])
            lat = self.latents(p, padded)
            for j, i in enumerate(members):
                sections = prep.coder.encode(lat["z_symbols"][j], lat["y_symbols"][j],
                                             lat["indexes"][j])
                h, w = images[i].shape[:2]
                out[i] = bitstream.pack(self.codec_id, prep.fingerprint, sections,
                                        height=h, width=w)
        return out

    def decode_batch(self, params: Any, datas: Sequence[bytes]) -> list:
        """Decode bitstreams; same-size images share one network call, same result."""
        return [image for image, _ in self.decode_with_latents(params, datas)]

    def decode_with_latents(self, params: Any, datas: Sequence[bytes]) -> list:
        """``[(image uint8 [H, W, 3], ŷ [1, Hp/16, Wp/16, M])]`` of fully verified
        bitstreams, from one pass over the streams: ``ŷ = symbols + μ`` is what the synthesis
        transform received (codecs built on this one condition on it)."""
        p = self._unwrap(params)
        prep = self._prepared(p)
        items = []
        for data in datas:
            header, sections = bitstream.unpack(data, codec_id=self.codec_id,
                                                fingerprint=prep.fingerprint)
            if (header.frames, header.channels, len(sections)) != (1, 3, 2):
                raise CorruptError("hyperprior bitstream has the wrong section layout")
            items.append((header, sections))
        out: list = [None] * len(datas)
        hyper = lambda z: self._hyper(p, z, prep.medians)  # noqa: E731
        z_shapes = [self.geometry(h.height, h.width)[0] for h, _ in items]
        for members in group_indexes(z_shapes, lambda z_shape: z_shape).values():
            z_shape = z_shapes[members[0]]
            y_sym, means = prep.coder.decode([items[i][1] for i in members], z_shape, hyper)
            x = np.asarray(self._synthesize(p, y_sym, means))
            for j, i in enumerate(members):
                header = items[i][0]
                y_hat = y_sym[j:j + 1].astype(np.float32) + means[j:j + 1]
                out[i] = (crop(x[j], header.height, header.width), y_hat)
        return out

    def decoded_latents(self, params: Any, data: bytes) -> np.ndarray:
        """``ŷ = symbols + μ`` ``[1, Hp/16, Wp/16, M]`` of a bitstream (fully verified)."""
        return self.decode_with_latents(params, [data])[0][1]
