"""The hint-guided video codec (IKIN, "Diffusion-Based Compression"; issue 26).

Not a training config: the codec's LoRA is fine-tuned per clip at encode time
(:mod:`diffjax.codecs.hint_lora`). The config names the frozen parts the receiver needs and
the codec settings; :func:`diffjax.codecs.hint_model.assemble` turns it into ``(kwargs, params)``
and ``diffjax.codecs.pretrained.save_model(DIR, "hint", kwargs, params)`` into a model folder
for ``diffjax compress clip.mp4 --codec hint --model DIR``.

Arguments (comma separated):

* ``taef2`` (default): ``hint_taef2``, the instance measured here. Base: the project's
  ``ldm_taef2`` UNet (``diffjax/weights/ldm_taef2``, issue 25) in the TAEF2 latent space
  (``../shared/data/taesd``); ControlNets for canny and low-resolution colour
  (``runs/hint_controlnet_{canny,colour}``, trained on H.26x-coded conditions) and a motion
  module (``runs/hint_motion``). These parts do not exist yet: set the paths once trained.
* ``sd15``: ``hint_sd15``, for users with the weights of SD 1.5, the public canny / depth
  ControlNets (``lllyasviel/control_v11p_sd15_canny``, ``control_v11f1p_sd15_depth``) and an
  AnimateDiff motion adapter, each converted with ``diffjax convert``; colour is the SDEdit
  start image (``strength`` 0.8) since no public low-res colour ControlNet exists for SD 1.5.
* ``smoke``: tiny random networks (a one-level SD-layout UNet, a one-level AutoencoderKL
  (/1), a motion module, a canny ControlNet; colour is the start image at ``strength``
  0.5), 2 LoRA steps, 2 DDIM steps, ``fast_compile``: seconds of CPU after compilation.
* ``exp1`` / ``exp2``: Table I's hint preset; ``h264`` / ``h265``: the hint streams' codec.

Every codec setting is ``config.codec.<name>`` (``--config.codec.lora_steps=200``).
"""
import ml_collections

from experiments.configs.base import REPO_ROOT, data_root, parse_arg
from experiments.configs.foundation_sd21 import SD21_SCHEDULER
from experiments.configs.taef2_denoiser import TAEF2

SD15_SCHEDULER = dict(SD21_SCHEDULER, prediction_type="epsilon")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

# smoke / tests: the smallest networks with the SD key layout of every part (one level)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
    norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8,), norm_num_groups=4, scaling_factor=0.5,
    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
TINY_ADAPTER = dict(
    block_out_channels=(8,), motion_layers_per_block=1, motion_num_attention_heads=2,
    motion_norm_num_groups=4, motion_max_seq_length=8, use_motion_mid_block=False)
TINY_CONTROL = (4,)  # conditioning_embedding_out_channels: condition = the latent's size


def tiny_controlnet_config(unet_config: dict = TINY_UNET) -> dict:
    """The diffusers config of a ControlNet copying ``unet_config``'s encoder."""
    from diffjax.models.controlnet import controlnet_for_unet
    from diffjax.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(dict(unet_config))
    return controlnet_for_unet(unet, conditioning_embedding_out_channels=TINY_CONTROL).to_config()


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = args - {"taef2", "sd15", "smoke", "exp1", "exp2", "h264", "h265"}
    if unknown or len(args & {"taef2", "sd15", "smoke"}) > 1 or {"exp1", "exp2"} <= args \
            or {"h264", "h265"} <= args:
        raise ValueError(f"bad config argument(s) {sorted(args)}; use one of taef2, sd15, "
                         "smoke, plus exp1|exp2 and h264|h265")
    c = ml_collections.ConfigDict()
    c.variant = "smoke" if "smoke" in args else "sd15" if "sd15" in args else "taef2"
    codec = ml_collections.ConfigDict(dict(
        preset="exp2" if "exp2" in args else "exp1",
        hint_codec="h265" if "h265" in args else "h264",
        lora_steps=200, lora_rank=4, lora_alpha=4.0, lora_targets=list(ATTENTION),
        lora_lr=1e-4, lora_batch=2, lora_bits=8, control_lora_rank=0,
        steps=20, strength=1.0, window=8, output_median_radius=0, seed=0, fast_compile=False))
    # the frozen parts: directories of `diffjax convert` / exported models, or (smoke) the
    # diffusers configs of random-weight networks
    parts = dict(vae="taesd", vae_config=dict(TAEF2), taesd_dir=str(data_root() / "taesd"),
                 sd_vae="", scheduler_config=dict(SD21_SCHEDULER),
                 unet=str(REPO_ROOT / "diffjax" / "weights" / "ldm_taef2"), unet_config={},
                 controlnets={}, controlnet_configs={}, motion="", adapter_config={}, seed=0)
    if c.variant == "taef2":
        parts["controlnets"] = {"canny": str(REPO_ROOT / "runs" / "hint_controlnet_canny"),
                                "colour": str(REPO_ROOT / "runs" / "hint_controlnet_colour")}
        parts["motion"] = str(REPO_ROOT / "runs" / "hint_motion")
    elif c.variant == "sd15":
        parts.update(vae="sd", vae_config={}, taesd_dir="", sd_vae="sd15-diffjax/vae",
                     scheduler_config=dict(SD15_SCHEDULER), unet="sd15-diffjax/unet",
                     controlnets={"canny": "control_sd15_canny-diffjax",
                                  "depth": "control_sd15_depth-diffjax"},
                     motion="animatediff-motion-adapter-diffjax")
        codec.strength = 0.8  # colour hint = the SDEdit start image
    else:
        control = tiny_controlnet_config()
        parts.update(vae="sd", vae_config=dict(TINY_VAE), taesd_dir="",
                     scheduler_config=dict(SD15_SCHEDULER), unet="", unet_config=dict(TINY_UNET),
                     adapter_config=dict(TINY_ADAPTER),
                     controlnet_configs={"canny": control})
        codec.update(lora_steps=2, lora_rank=2, lora_alpha=2.0, lora_lr=1e-3, steps=2, window=2,
                     strength=0.5, lora_targets=["to_q", "to_v"], fast_compile=True)
    parts = ml_collections.ConfigDict(parts)
    c.parts = parts
    c.codec = codec
    return c


def build(config) -> tuple[dict, dict]:
    """``(codec kwargs, params)`` of a config (:func:`diffjax.codecs.hint_model.assemble`)."""
    from diffjax.codecs.hint_model import assemble

    return assemble(config.parts.to_dict(), **config.codec.to_dict())
