"""``diffjax convert SRC DST``: diffusers / original SD checkpoints -> diffjax (Orbax) models."""
from __future__ import annotations

import argparse

HELP = "convert a diffusers folder or an original Stable Diffusion checkpoint to a diffjax model"

_EPILOG = """\
SRC can be
  * a diffusers model folder      (config.json + diffusion_pytorch_model.safetensors,
                                   or a sharded *.safetensors.index.json)
  * a diffusers pipeline folder   (model_index.json with unet/ and vae/; the scheduler's
                                   prediction_type is recorded with the UNet)
  * an original single-file SD    (.safetensors / .ckpt with model.diffusion_model.* and
    checkpoint                     first_stage_model.* keys): needs --config
DST is written as an Orbax checkpoint directory with the params and the config (JSON);
a pipeline or a single file with UNet and VAE gives DST/unet and DST/vae.
Load it with:  module, params = diffjax.convert.load_pretrained(DST[, "unet"])

Conversion is strict: any missing, unexpected or mis-shaped key is an error that lists
the keys, and nothing is written.

examples:
  diffjax convert data/sample_tiny_sd /tmp/tiny_sd
  diffjax convert stable-diffusion-2-1/unet sd21_unet
  diffjax convert v2-1_768-ema-pruned.safetensors sd21 --config sd21
  diffjax convert sd_xl_base_1.0.safetensors sdxl_vae --config sdxl --component vae
  diffjax convert text-to-video-ms-1.7b/unet ms_t2v_unet          # UNet3DConditionModel
  diffjax convert text2video_pytorch_model.pth ms_t2v --config modelscope-t2v
  diffjax convert sd15/unet animatediff --motion-adapter animatediff-motion-adapter-v1-5-2
  diffjax convert control_v11p_sd15_canny.pth canny_cn --config sd15   (original ControlNet)
  diffjax convert sd-controlnet-canny canny_cn                       (diffusers ControlNet)
  diffjax convert stable-diffusion-2-1/unet sd21_style --lora style.safetensors --lora-scale 0.8
  diffjax convert --lora-only style.safetensors style_lora --config sd21   (LoRA tree alone)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffjax.convert.presets import PRESETS

    parser.epilog = _EPILOG
    parser.add_argument("src", metavar="SRC", help="diffusers folder or single-file checkpoint")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    parser.add_argument("--config", metavar="NAME|JSON",
                        help="architecture of a single-file checkpoint: one of "
                             f"{', '.join(PRESETS)}, modelscope-t2v (an original ModelScope "
                             "text-to-video UNet), or a diffusers config.json")
    parser.add_argument("--component", choices=("unet", "vae", "controlnet"),
                        help="convert only this model of a pipeline / single file")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast the parameters (default: keep the stored dtype)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                        help="record the UNet's prediction type (default: from the scheduler "
                             "config or the preset, else epsilon)")
    parser.add_argument("--variant", help="diffusers weight variant, e.g. fp16 "
                                          "(reads diffusion_pytorch_model.fp16.safetensors)")
    parser.add_argument("--motion-adapter", metavar="ADAPTER_SRC",
                        help="a diffusers MotionAdapter folder (AnimateDiff): SRC (an SD UNet) "
                             "plus the adapter become one UNetMotionModel")
    parser.add_argument("--lora", metavar="FILE",
                        help="merge this LoRA file (diffusers/peft, attention-processor or "
                             "kohya .safetensors) into the UNet of SRC")
    parser.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                        help="LoRA strength: kernel + S * alpha / rank * down @ up (default 1)")
    parser.add_argument("--lora-only", action="store_true",
                        help="SRC is a LoRA file: write it as its own Orbax LoRA checkpoint "
                             "(--config NAME|JSON checks it against that UNet)")
    parser.add_argument("--lora-skip-text-encoder", action="store_true",
                        help="ignore text-encoder LoRA keys instead of failing on them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from diffjax.convert.files import convert

    if args.lora_only or args.lora:
        from diffjax.convert import lora

        if args.lora_only:
            lora.lora_only(args.src, args.dst, config=args.config, overwrite=args.overwrite,
                           skip_text_encoder=args.lora_skip_text_encoder)
        else:
            lora.convert_merged(args.src, args.dst, args.lora, scale=args.lora_scale,
                                config=args.config, dtype=args.dtype,
                                prediction_type=args.prediction_type, variant=args.variant,
                                skip_text_encoder=args.lora_skip_text_encoder,
                                overwrite=args.overwrite, progress=not args.no_progress)
        return 0
    convert(args.src, args.dst, config=args.config, component=args.component, dtype=args.dtype,
            prediction_type=args.prediction_type, variant=args.variant,
            overwrite=args.overwrite, progress=not args.no_progress,
            motion_adapter=args.motion_adapter)
    return 0
