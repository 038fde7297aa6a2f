"""Tiny stochastic autoencoder (``diffjax.train.toy``): checks a training setup end to end.

    python -m experiments.train --config=experiments/configs/toy_autoencoder.py:smoke --workdir=/tmp/toy
"""
from experiments.configs.base import apply_smoke, get_base_config, parse_arg


def get_config(arg: str = ""):
    args = parse_arg(arg)
    c = get_base_config()
    c.task.name = "toy_autoencoder"
    c.task.kwargs.channels = 16
    c.task.kwargs.latent = 8
    c.task.kwargs.rate_weight = 0.01
    c.num_train_steps = 2_000
    c.data.crop = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.999
    if "smoke" in args:
        apply_smoke(c)
        c.data.crop = 32
        c.task.kwargs.channels = 8
        c.task.kwargs.latent = 4
    unknown = args - {"smoke"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use 'smoke'")
    return c
