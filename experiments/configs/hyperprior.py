"""Mean-scale (Minnen 2018) or scale (Ballé 2018) hyperprior, rate-distortion training.

Loss ``bpp + λ·255²·MSE`` (CompressAI); ``λ`` from CompressAI's quality table. The
entropy bottleneck quantiles train with their own Adam rate (CompressAI's aux optimizer,
lr 1e-3) through the ``aux`` optimizer group. Arguments (comma separated):

* ``q1`` .. ``q8``: quality (λ = 0.0018 ... 0.0483; default q3 = 0.0067);
* ``scale``: the scale-only hyperprior instead of the mean-scale one;
* ``smoke``: a few steps of a tiny model on 64 px crops (CPU, seconds).

    python -m experiments.train --config=experiments/configs/hyperprior.py:q3 --workdir=runs/hp-q3
    python -m experiments.train --config=experiments/configs/hyperprior.py:smoke --workdir=/tmp/hp

BSDS500 (the default data here) is licensed for non-commercial research only; point
``--config.data.path`` at your own training set (CompressAI uses Vimeo-90k crops).
"""
from experiments.configs.base import apply_smoke, get_base_config, parse_arg

# CompressAI's lambda for qualities 1..8 (compressai.zoo, MSE models).
LMBDA = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}


def get_config(arg: str = ""):
    args = parse_arg(arg)
    c = get_base_config()
    quality = 3
    for a in args:
        if a.startswith("q") and a[1:].isdigit() and int(a[1:]) in LMBDA:
            quality = int(a[1:])
        elif a not in ("smoke", "scale"):
            raise ValueError(f"unknown config argument {a!r}; use q1..q8, scale, smoke")
    small = quality <= 5  # CompressAI: N=128, M=192 for q1-5, N=192, M=320 for q6-8
    c.task.name = "rate_distortion"
    c.task.kwargs.N = 128 if small else 192
    c.task.kwargs.M = 192 if small else 320
    c.task.kwargs.mean_scale = "scale" not in args
    c.task.kwargs.lmbda = LMBDA[quality]
    c.num_train_steps = 1_000_000
    c.batch_size = 16
    c.data.crop = 256
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.groups = {"aux": {"learning_rate": 1e-3, "grad_clip_norm": 0.0}}
    if "smoke" in args:
        apply_smoke(c)
        c.task.kwargs.N = 8
        c.task.kwargs.M = 12
    return c
