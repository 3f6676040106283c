"""One seed-derivation function for the whole library.

Every random draw in fedzo-flwr comes from a generator seeded with ``derive_seed(base, *keys)``:
the round seed, each direction, each client's mini-batch, each pruning stream. It hashes the
keys with BLAKE2b, so it is identical on every platform and Python version (unlike ``hash()``)
and different key tuples give unrelated streams.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: int | str) -> int:
    """Derive an independent 63-bit seed from ``seed`` and a tuple of stream keys.

    Parameters
    ----------
    seed : int
        Base seed.
    *keys : int or str
        Stream identifiers, e.g. ``(round,)`` or ``("ntk-sap/weights", client, iteration)``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` suitable for :meth:`torch.Generator.manual_seed` and NumPy.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    text = "/".join([str(seed), *(f"{type(k).__name__}:{k}" for k in keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
