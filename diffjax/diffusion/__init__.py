"""diffjax.diffusion: schedules, parameterisations, loss weightings and samplers.

Pure functions matching diffusers' schedulers number for number; callers jit. The public
entry points:

* :func:`sample` / :func:`sdedit`: run a sampler (DDPM, DDIM, Euler, Euler ancestral,
  DPM-Solver++(2M)) from a diffusers ``scheduler_config``, with partial starts, CFG and
  conditioning passed through;
* :func:`make_sampler` (in :mod:`diffjax.diffusion.sharded`): the same loop jitted with
  ``in_shardings``/``out_shardings`` over a device mesh;
* :class:`DiscreteSchedule`, :class:`CosineSchedule`, :func:`continuous_schedule`: noise
  levels, continuous in ``t`` for gradient-learned timesteps;
* :func:`denoising_loss` and the weightings of :mod:`diffjax.diffusion.losses`.
"""
from diffjax.diffusion.losses import (  # noqa: F401
    Weighting,
    constant,
    denoising_loss,
    edm,
    min_snr,
    p2,
    sech,
)
from diffjax.diffusion.parameterization import (  # noqa: F401
    canonical_prediction_type,
    convert,
    to_eps,
    to_v,
    to_x0,
    training_target,
)
from diffjax.diffusion.noise import standard_normal, step_noise  # noqa: F401
from diffjax.diffusion.samplers import SAMPLERS, Plan, get_sampler, make_plan  # noqa: F401
from diffjax.diffusion.sampling import (  # noqa: F401
    CFG,
    initial_noise_scale,
    noise_to_step,
    run_plan,
    sample,
    sdedit,
    sdedit_start_step,
    start_step_for_t,
)
from diffjax.diffusion.schedules import (  # noqa: F401
    ContinuousSchedule,
    CosineSchedule,
    DiscreteSchedule,
    InterpolatedSchedule,
    continuous_schedule,
    rescale_zero_terminal_snr,
    t_to_timestep,
    timestep_to_t,
)
from diffjax.diffusion.sharded import make_sampler  # noqa: F401
