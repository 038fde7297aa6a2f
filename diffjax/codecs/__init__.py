"""diffjax.codecs: one module per method, all following the protocol in ``base``.

Importing this package registers every codec, so ``diffjax.codecs.get(name, **config)``
and ``diffjax.codecs.available()`` see them all; ``diffjax.codecs.load(path)`` returns
``(codec, params)`` of a model folder, a training workdir or a shipped model
(:mod:`diffjax.codecs.pretrained`).

Adding a codec is one file, ``codecs/<name>.py``: a :class:`Codec` or :class:`VideoCodec`
subclass decorated with ``@register("<name>")`` and imported below (plus, to train it, a
:class:`~diffjax.train.task.Task` whose ``codec_name`` names it, and a config).
"""
from diffjax.codecs.base import (Codec, VideoCodec, available, codec_class, codec_name,  # noqa: F401
                                 get, register)
from diffjax.codecs.pretrained import load, load_model, save_model  # noqa: F401,E402
from diffjax.codecs import hyperprior  # noqa: F401,E402  (registers "hyperprior")
from diffjax.codecs import residual  # noqa: F401,E402  (registers "residual")
from diffjax.codecs import foundation  # noqa: F401,E402  (registers "foundation")
from diffjax.codecs import intra  # noqa: F401,E402  (registers "intra")
