"""diffjax.entropy: everything between latents and bytes.

* ``quantize``: noise / straight-through / mixed / mean-offset rounding, ``lower_bound``;
* ``models``: the factorized entropy bottleneck and the Gaussian/Laplace conditional
  (Flax Linen), their CDF tables and ``bits`` (rate of a likelihood pytree);
* ``coder``: host-side ANS coding with those tables (constriction), escapes, checksums;
* ``bitstream``: the versioned container and its error classes;
* ``info``: the ``diffjax info`` command.

Submodules are imported explicitly; importing this package does nothing else.
"""
