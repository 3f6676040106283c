"""The client's engines: four ways to compute the same K loss differences of a step.

* ``stream`` (:mod:`.stream`): each layer's weights materialised, perturbed, in one scratch
  buffer only while that layer runs; directions drawn per layer; optional micro-batches; the
  model held sparse at rest (:class:`~.stream_model.StreamModel`). The least memory — for the
  smallest boards.
* ``lean`` (:mod:`.lean`): perturbs the model in place, one direction at a time, and restores
  the saved kept values by copy. Runs any model (the fallback).
* ``batched`` (:mod:`.batched`): chunks of perturbed copies in one ``vmap`` of
  ``functional_call``; a generic reference, slower than ``lean`` on CPU.
* ``fused`` (:mod:`.fused`): the fastest. The model's forward pass is rewritten (via
  :mod:`torch.fx`) so that a chunk of perturbed copies runs as one wide first layer, grouped
  convolutions and batched matrix products. A model it cannot translate raises
  :class:`~fedzo_flwr.zo.engines.fused.UnsupportedModel`, and the caller falls back to ``lean``
  (so does ``stream`` for a parameter outside its supported layers).

Every engine is an :class:`~fedzo_flwr.zo.engines.base.Engine`, looked up by name in
:data:`ENGINES`.
"""

from collections.abc import Mapping
from types import MappingProxyType

from fedzo_flwr.zo.engines.base import Engine, LossDifferences, LossFn, batch_loss
from fedzo_flwr.zo.engines.batched import batched_engine
from fedzo_flwr.zo.engines.fused import UnsupportedModel, fused_engine
from fedzo_flwr.zo.engines.lean import lean_engine
from fedzo_flwr.zo.engines.stream_model import StreamModel, stream_engine

__all__ = [
    "ENGINES",
    "FALLBACK_ENGINE",
    "Engine",
    "LossDifferences",
    "LossFn",
    "StreamModel",
    "UnsupportedModel",
    "batch_loss",
]

ENGINES: Mapping[str, Engine] = MappingProxyType(
    {
        "lean": lean_engine,
        "batched": batched_engine,
        "fused": fused_engine,
        "stream": stream_engine,
    }
)
"""The engines by name (the values of the ``engine`` run-config key)."""

FALLBACK_ENGINE = "lean"
"""The engine that runs any model; used when another raises ``UnsupportedModel``."""
