"""Perturbation directions regenerated from ``(seed, k)``.

Directions live in a :class:`~fedzo_flwr.space.KeptSpace` (kept coordinates only) and are never
stored K at a time: direction ``k`` of seed ``s`` is drawn from its own generator seeded with
``derive_seed(s, k)``, so any subset can be regenerated in any order, on any machine.

* ``gaussian`` (default): ``torch.randn`` from a CPU ``torch.Generator``. Bit-exact between two
  machines only with the same torch build and CPU architecture (vectorised ``randn`` paths differ).
* ``rademacher``: +-1 entries from the integer output of NumPy's counter-based Philox generator,
  unpacked bit by bit. Integer arithmetic only, hence identical on every platform.

:func:`fingerprint` hashes generator output so two machines can check that they agree.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch

DirectionKind = Literal["gaussian", "rademacher"]
DIRECTION_KINDS: tuple[str, ...] = ("gaussian", "rademacher")

_SEED_MASK = (1 << 63) - 1


def check_kind(kind: str, name: str = "directions") -> str:
    """Return ``kind`` after checking it names a direction distribution."""
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"{name} must be one of {', '.join(DIRECTION_KINDS)}; got {kind!r}")
    return kind


def derive_seed(*parts: int) -> int:
    """Hash integers into a 63-bit seed (BLAKE2b; identical on every platform).

    ``derive_seed(base, round)`` gives a round seed, ``derive_seed(round_seed, k)`` the seed of
    direction ``k``. Distinct inputs give unrelated seeds, so seeds are never reused.
    """
    digest = hashlib.blake2b(digest_size=8, person=b"fedzo-seed")
    for part in parts:
        digest.update(int(part).to_bytes(16, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & _SEED_MASK


class DirectionGenerator:
    """Regenerates the perturbation directions of one seed.

    Parameters
    ----------
    dim : int
        Number of coordinates (``KeptSpace.dim``).
    seed : int
        The round (or step) seed shared by server and clients.
    kind : {"gaussian", "rademacher"}
        Distribution of the entries; both have zero mean and identity covariance.
    """

    def __init__(self, dim: int, seed: int, kind: str = "gaussian") -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.seed = int(seed)
        self.kind = check_kind(kind)
        self._torch_gen = torch.Generator()

    def direction(self, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Direction ``k`` as a float32 ``(dim,)`` tensor, written into ``out`` if given."""
        if out is None:
            out = torch.empty(self.dim, dtype=torch.float32)
        sub_seed = derive_seed(self.seed, k)
        if self.kind == "gaussian":
            self._torch_gen.manual_seed(sub_seed)
            torch.randn(self.dim, generator=self._torch_gen, out=out)
        else:
            words = np.random.Philox(key=sub_seed).random_raw((self.dim + 63) // 64)
            bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
            signs = 1.0 - 2.0 * bits[: self.dim].astype(np.float32)
            out.copy_(torch.from_numpy(signs))
        return out

    def block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Directions ``start..stop-1`` stacked as rows, shape ``(stop - start, dim)``."""
        rows = stop - start
        if rows < 0:
            raise ValueError(f"stop ({stop}) must be >= start ({start})")
        if out is None:
            out = torch.empty(rows, self.dim, dtype=torch.float32)
        for i in range(rows):
            self.direction(start + i, out=out[i])
        return out[:rows]


def fingerprint(dim: int, seed: int, kind: str = "gaussian", ks: tuple[int, ...] = (0, 1)) -> str:
    """SHA-256 (hex) of the float32 little-endian bytes of directions ``ks`` of ``seed``.

    Two machines that return the same fingerprint for the same arguments regenerate the same
    directions; the server uses it to refuse clients whose generator disagrees with its own.
    """
    generator = DirectionGenerator(dim, seed, kind)
    digest = hashlib.sha256()
    for k in ks:
        digest.update(generator.direction(k).numpy().astype("<f4").tobytes())
    return digest.hexdigest()
