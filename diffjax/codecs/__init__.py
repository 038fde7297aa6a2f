"""diffjax.codecs: one module per method, all following the protocol in ``base``.

``diffjax.codecs.get(name, **config)`` and ``diffjax.codecs.available()`` see every codec
(diffjax's own are imported on first use, :data:`~diffjax.codecs.base.BUILTIN`); ``diffjax.codecs.load(path)`` returns
``(codec, params)`` of a model folder, a training workdir or a shipped model
(:mod:`diffjax.codecs.pretrained`).

Adding a codec is one file, ``codecs/<name>.py``: a :class:`Codec` or :class:`VideoCodec`
subclass decorated with ``@register("<name>")`` (plus its line in ``BUILTIN`` for a codec
that ships with diffjax, and, to train it, a :class:`~diffjax.train.task.Task` whose
``codec_name`` names it, and a config). A codec defined in a user's own module needs only
the decorator.
"""
from diffjax.codecs.base import (Codec, VideoCodec, available, codec_class, codec_name,  # noqa: F401
                                 get, register)
from diffjax.codecs.pretrained import load, load_model, save_model  # noqa: F401,E402


def __getattr__(name: str):
    """``diffjax.codecs.residual`` etc. work without importing every codec up front."""
    import importlib

    from diffjax.codecs.base import BUILTIN

    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name][1])
    raise AttributeError(f"module 'diffjax.codecs' has no attribute {name!r}")
