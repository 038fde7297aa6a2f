"""diffjax.codecs: one module per method, all following the protocol in ``base``.

Importing this package registers every codec, so ``diffjax.codecs.get(name, **config)``
and ``diffjax.codecs.available()`` see them all.
"""
from diffjax.codecs.base import Codec, available, codec_name, get, register  # noqa: F401
from diffjax.codecs import hyperprior  # noqa: F401,E402  (registers "hyperprior")
from diffjax.codecs import residual  # noqa: F401,E402  (registers "residual")
from diffjax.codecs import foundation  # noqa: F401,E402  (registers "foundation")
