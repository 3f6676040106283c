"""A model's forward pass traced with :mod:`torch.fx` and translated to run ``r`` copies at once."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn
from torch.func import functional_call

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines.fused import layers, ops, translate
from fedzo_flwr.zo.engines.fused.rewrite import pool_before_activation
from fedzo_flwr.zo.engines.fused.stacked import CHANNELS_LAST, Stacked, UnsupportedModel
from fedzo_flwr.zo.engines.fused.weights import ChunkWeights, Layout

__all__ = ["FusedPlan", "Measured", "get_plan", "getattr_path"]


@dataclass
class Measured:
    """What :meth:`FusedPlan.verify` measured for one input shape."""

    act_bytes_per_example: float
    """Peak bytes of the live per-copy activations of one copy on one example."""


def getattr_path(root: nn.Module, path: str) -> Any:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _aliases(v: Stacked, others: Iterable[Any]) -> bool:
    ptr = v.data.untyped_storage().data_ptr()
    return any(
        isinstance(o, Stacked) and o.data.untyped_storage().data_ptr() == ptr for o in others
    )


class FusedPlan:
    """A model's forward pass, translated to run ``r`` weight copies at once.

    Parameters
    ----------
    model : nn.Module
        The model (float32, a single tensor input, one tensor output). Not modified.
    space : KeptSpace
        The perturbed coordinates; trainable parameters outside it are shared by all copies.

    Raises
    ------
    UnsupportedModel
        If tracing fails or the graph uses anything outside the supported rules.
    """

    def __init__(self, model: nn.Module, space: KeptSpace) -> None:
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as err:  # any tracing failure means "not translatable"
            raise UnsupportedModel(f"torch.fx cannot trace the model: {err}") from err
        params = dict(model.named_parameters())
        self.space_params: list[torch.Tensor] = [params[n] for n in space.names]
        if any(p.dtype != torch.float32 for p in self.space_params):
            raise UnsupportedModel("the fused engine supports float32 parameters only")
        self.nodes = list(self.gm.graph.nodes)
        self._check_graph()
        self.pools_moved = pool_before_activation(self.gm)
        self.nodes = list(self.gm.graph.nodes)
        position = {n: i for i, n in enumerate(self.nodes)}
        last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in self.nodes}
        self.free_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last_use.items():
            self.free_after[i].append(n)
        self.measured: dict[tuple[int, ...], Measured] = {}

    def _check_graph(self) -> None:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModel(f"forward must take one tensor, got {len(placeholders)} inputs")
        space_ids = {id(p) for p in self.space_params}
        for node in self.nodes:
            if node.op == "call_module":
                mod = self.gm.get_submodule(str(node.target))
                if not isinstance(mod, layers.SUPPORTED_MODULES):
                    raise UnsupportedModel(f"module {type(mod).__name__} ({node.target})")
            elif node.op == "call_function":
                if node.target not in ops.SUPPORTED_FUNCTIONS:
                    raise UnsupportedModel(f"function {node.target}")
            elif node.op == "call_method":
                if node.target not in ops.SUPPORTED_METHODS:
                    raise UnsupportedModel(f"method .{node.target}()")
            elif node.op == "get_attr":
                target = getattr_path(self.gm, str(node.target))
                if isinstance(target, torch.Tensor) and id(target) in space_ids:
                    raise UnsupportedModel(f"direct use of perturbed parameter {node.target}")

    def layout(self, space: KeptSpace) -> Layout:
        """Where each perturbed parameter's kept coordinates sit in ``space``."""
        return Layout(self.space_params, space)

    # -- forward ------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, weights: ChunkWeights, track: list[int] | None = None
    ) -> torch.Tensor:
        """Logits ``(r, B, classes)`` of the chunk's ``r`` weight copies on batch ``x``.

        With ``track`` (a one-element list), ``track[0]`` receives the peak bytes of the live
        per-copy activations (tensors this forward allocated, views not double counted).
        """
        rows = weights.rows
        env: dict[fx.Node, Any] = {}
        live = 0
        result = None
        for i, node in enumerate(self.nodes):
            value = self._run(node, env, x, rows, weights)
            env[node] = value
            if track is not None and isinstance(value, Stacked) and value.fresh:
                if not _aliases(value, [env[n] for n in node.all_input_nodes if n in env]):
                    live += value.data.numel() * value.data.element_size()
                    track[0] = max(track[0], live)
            if node.op == "output":
                result = value
            for dead in self.free_after[i]:
                gone = env.pop(dead, None)
                if track is not None and isinstance(gone, Stacked) and gone.fresh:
                    if not _aliases(gone, env.values()):
                        live -= gone.data.numel() * gone.data.element_size()
        if isinstance(result, torch.Tensor):  # no perturbed parameter reaches the output
            return result.unsqueeze(0).expand(rows, *result.shape)
        if not isinstance(result, Stacked):
            raise UnsupportedModel("the model output must be one tensor")
        return result.lead()

    def _run(
        self,
        node: fx.Node,
        env: dict[fx.Node, Any],
        x: torch.Tensor,
        rows: int,
        weights: ChunkWeights,
    ) -> Any:
        op = node.op
        if op == "placeholder":
            return x
        if op == "get_attr":
            return getattr_path(self.gm, str(node.target))
        # fx types the mapped arguments as its own Argument union; here they are node values.
        args = cast(tuple[Any, ...], fx.node.map_arg(node.args, lambda n: env[n]))
        kwargs = dict(cast(dict[str, Any], fx.node.map_arg(node.kwargs, lambda n: env[n])))
        if op == "output":
            return args[0]
        first = args[0] if args else None
        source = node.args[0] if node.args else None
        reuse = isinstance(source, fx.Node) and len(source.users) == 1
        if op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return translate.call_module(mod, first, rows, weights, reuse)
        if op == "call_function":
            return translate.call_function(node.target, args, kwargs, reuse)
        return translate.call_method(str(node.target), args, kwargs, reuse)

    # -- verification and memory --------------------------------------------------------

    def verify(self, model: nn.Module, space: KeptSpace, x: torch.Tensor) -> Measured:
        """Check the translation on one example against ``functional_call``; measure memory.

        Two copies are run: the current weights and a random perturbation of the kept
        coordinates (scale 0.1 of the mean magnitude). Both must match the ordinary forward
        pass under the same weights, or :class:`UnsupportedModel` is raised. Cached per input
        shape (the translation does not depend on the weights or on the mask).
        """
        key = tuple(x.shape[1:])
        if key in self.measured:
            return self.measured[key]
        one = x[:1].contiguous(memory_format=CHANNELS_LAST) if x.dim() == 4 else x[:1]
        layout = self.layout(space)
        kept = space.gather(model)
        noise = torch.randn(1, space.dim, generator=torch.Generator().manual_seed(0))
        scale = 0.1 * float(kept.abs().mean()) + 1e-3
        weights = ChunkWeights(layout, layout.new_blocks(2), kept, noise, scale, (0.0, 1.0))
        track = [0]
        try:
            logits = self.forward(one, weights, track)
        except UnsupportedModel:
            raise
        except Exception as err:  # a translation rule does not fit this model
            raise UnsupportedModel(f"fused forward failed: {type(err).__name__}: {err}") from err
        for row in range(2):
            state = {n: weights.copy(p, row) for n, p in zip(space.names, self.space_params)}
            expected = functional_call(model, state, (x[:1],))
            if not torch.allclose(logits[row], expected, rtol=1e-3, atol=1e-4):
                gap = float((logits[row] - expected).abs().max())
                raise UnsupportedModel(
                    f"verification failed: fused forward differs from the model by {gap:.3g}"
                )
        measured = Measured(act_bytes_per_example=track[0] / 2)
        self.measured[key] = measured
        return measured


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], FusedPlan]] = (
    weakref.WeakKeyDictionary()
)


def get_plan(model: nn.Module, space: KeptSpace) -> FusedPlan:
    """The (cached) :class:`FusedPlan` of ``model`` for the parameters of ``space``.

    Plans are cached per model object and set of perturbed parameters; the cache does not keep
    models alive. Kept indices may change between calls (they are read from ``space`` each
    time): only the traced graph is cached.
    """
    per_model = _PLANS.setdefault(model, {})
    key = tuple(space.names)
    plan = per_model.get(key)
    if plan is None:
        plan = FusedPlan(model, space)
        per_model[key] = plan
    return plan
