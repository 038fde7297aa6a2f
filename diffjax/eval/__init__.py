"""diffjax.eval: rate-distortion evaluation of diffjax codecs and classical baselines.

    from diffjax.eval import baseline_points, checkpoint_point, evaluate_rd, load_images
    points = baseline_points("jpeg") + [checkpoint_point("runs/hp-q3")]
    result = evaluate_rd(points, load_images("../shared/data/kodak"), anchor="JPEG")

See :mod:`diffjax.eval.runner` (measurement), :mod:`diffjax.eval.baselines` (JPEG, WebP,
AVIF, HEVC/AV1 intra, x264/x265), :mod:`diffjax.eval.points`, :mod:`diffjax.eval.plots`,
:mod:`diffjax.eval.video`, and the ``diffjax eval`` command.
"""
from diffjax.eval.plots import load_reference, plot_rd
from diffjax.eval.points import (
    RatePoint,
    baseline_points,
    checkpoint_point,
    codec_point,
)
from diffjax.eval.runner import (
    MetricSuite,
    bd_rate_table,
    evaluate_rd,
    format_bd_table,
    load_images,
)
from diffjax.eval.video import evaluate_video_rd, load_clip

__all__ = ["RatePoint", "baseline_points", "checkpoint_point", "codec_point",
           "MetricSuite", "evaluate_rd", "bd_rate_table",
           "format_bd_table", "load_images", "plot_rd", "load_reference",
           "evaluate_video_rd", "load_clip"]
