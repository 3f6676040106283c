"""A staged view of a model for progressive block training: blocks, output modules, head.

The ordinary model (from :func:`fedzo_flwr.models.build_model`) is cut into consecutive
**blocks**. Stage ``t`` trains block ``t`` and a small **output module** that stands in for the
blocks behind it; blocks ``0..t-1`` are frozen and run forward only; the last stage trains the
last block with the model's own **head**. The blocks hold the ordinary model's modules (the same
parameter tensors, by identity), so the last stage *is* the ordinary model and a block's
tensors travel under the ordinary model's ``state_dict`` keys.

Splits (``stage-split``):

``stage``
    one block per architecture stage: LeNet-5 ``conv1+pool | conv2+pool | fc1+fc2`` (head
    ``fc3``); BAFFLE's LeNet ``conv1+norm+pool | conv2+norm`` (head: pooling and ``fc``, the
    only classifier layer); ResNet-20 ``stem+stage1 | stage2 | stage3``; ResNet-18
    ``stem+layer1 | layer2 | layer3 | layer4`` (ResNet heads: global pooling and ``fc``).
``layers``
    ``layers-per-block`` consecutive units per block, where a unit is a residual block for the
    ResNets (the stem joins the first unit) and a layer for the LeNets (a convolution with its
    norm, activation and pooling, or a hidden linear layer with its activation).

Output modules [code] (ProFL's released code, for ResNets): one 3x3 stride-2 convolution per
architecture stage missing behind the block, channels those of the stage it stands in for, no
norm, no activation; then global average pooling and a linear classifier. [ours] The same rule
for the LeNets' convolution stages (3x3, stride 2, padding 1, the missing stage's channels);
behind a hidden linear layer of LeNet-5 the output module is one linear classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedzo_flwr.errors import ConfigError
from fedzo_flwr.models import build_model, get_model_spec, init_parameters_
from fedzo_flwr.models.lenet import LeNet5, LeNetGN
from fedzo_flwr.models.resnet import BasicBlock, CifarResNet
from fedzo_flwr.seeding import derive_seed

__all__ = ["OUTPUT_PREFIX", "SPLITS", "StagedModel", "build_staged", "output_module_seed"]

StageSplit = Literal["stage", "layers"]
SPLITS: tuple[str, ...] = ("stage", "layers")
OUTPUT_PREFIX = "output."
"""Names of output-module tensors: ``output.<stage>.<name>`` (never an ordinary model key)."""

_OUTPUT_STREAM = "progressive/output-module"


def output_module_seed(seed: int, stage: int) -> int:
    """Seed of the initial weights of output module ``stage`` (sub-stream of ``seed``)."""
    return derive_seed(seed, _OUTPUT_STREAM, stage)


@dataclass(frozen=True)
class _Unit:
    """One indivisible piece of the forward pass and the architecture stage it belongs to."""

    module: nn.Module
    stage: int


@dataclass(frozen=True)
class _Layout:
    """How a model is cut: its units, its head and the (channels) of each conv stage."""

    units: tuple[_Unit, ...]
    head: nn.Module
    stage_channels: tuple[int, ...]
    num_conv_stages: int


def _seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)


def _pooled_head(fc: nn.Module) -> nn.Sequential:
    return _seq(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)


def _layout(model: nn.Module) -> _Layout:
    units: tuple[_Unit, ...]
    if isinstance(model, LeNet5):
        units = (
            _Unit(_seq(model.conv1, model.act, model.pool), 0),
            _Unit(_seq(model.conv2, model.act, model.pool), 1),
            _Unit(_seq(nn.Flatten(1), model.fc1, model.act), 2),
            _Unit(_seq(model.fc2, model.act), 2),
        )
        return _Layout(units, model.fc3, (6, 16), 2)
    if isinstance(model, LeNetGN):
        units = (
            _Unit(_seq(model.conv1, model.norm1, model.act, model.pool), 0),
            _Unit(_seq(model.conv2, model.norm2, model.act), 1),
        )
        return _Layout(units, _pooled_head(model.fc), (16, 64), 2)
    if isinstance(model, CifarResNet):
        stem = _seq(model.conv1, model.norm1, nn.ReLU())
        stage, res_units, channels = 0, [], [int(model.conv1.out_channels)]
        for i, block in enumerate(model.layers):
            if not isinstance(block, BasicBlock):
                raise ConfigError(f"unexpected residual layer {type(block).__name__}")
            if i > 0 and block.stride != 1:
                stage += 1
                channels.append(int(block.conv1.out_channels))
            res_units.append(_Unit(_seq(stem, block) if i == 0 else block, stage))
        return _Layout(tuple(res_units), _pooled_head(model.fc), tuple(channels), len(channels))
    raise ConfigError(f"no staged view for model class {type(model).__name__}")


def _group(layout: _Layout, split: str, layers_per_block: int) -> list[list[_Unit]]:
    if split == "stage":
        groups: dict[int, list[_Unit]] = {}
        for unit in layout.units:
            groups.setdefault(unit.stage, []).append(unit)
        return [groups[s] for s in sorted(groups)]
    if split == "layers":
        if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int):
            raise ConfigError(f"layers-per-block must be an int, got {layers_per_block!r}")
        if layers_per_block < 1:
            raise ConfigError(f"layers-per-block must be >= 1, got {layers_per_block}")
        units = list(layout.units)
        return [units[i : i + layers_per_block] for i in range(0, len(units), layers_per_block)]
    raise ConfigError(f"stage-split must be one of {', '.join(SPLITS)}, got {split!r}")


def _output_module(
    layout: _Layout, last: _Unit, probe: torch.Tensor, num_classes: int
) -> nn.Sequential:
    """ProFL-style output module behind a block ending with unit ``last`` (see module doc)."""
    if probe.dim() == 2:  # behind a hidden linear layer: a linear classifier
        return _seq(nn.Linear(int(probe.shape[1]), num_classes))
    layers: list[nn.Module] = []
    channels = int(probe.shape[1])
    for stage in range(last.stage + 1, layout.num_conv_stages):
        out = layout.stage_channels[stage]
        layers.append(nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes)]
    return _seq(*layers)


class StagedModel:
    """The staged view of one ordinary model (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The ordinary model; its modules are shared, not copied.
    num_classes : int
        Classes of the output modules' classifiers.
    split : {"stage", "layers"}
        ``stage-split``.
    layers_per_block : int
        ``layers-per-block`` (``split = "layers"`` only).
    seed : int
        Seed of the output modules' initial weights (:func:`output_module_seed`).
    init_scheme : {"pytorch", "kaiming-normal"}
        Initialiser of the output modules (the model's own).

    Attributes
    ----------
    model : nn.Module
        The ordinary model.
    blocks : tuple of nn.Sequential
        Block ``t`` as a module (its parameters are the model's own tensors).
    output_modules : nn.ModuleList
        Output module ``t`` for every stage but the last.
    head : nn.Module
        The model's head, trained with the last block.

    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        split: str = "stage",
        layers_per_block: int = 1,
        seed: int = 0,
        init_scheme: Literal["pytorch", "kaiming-normal"] = "pytorch",
    ) -> None:
        layout = _layout(model)
        groups = _group(layout, split, layers_per_block)
        self.model = model
        self.split = split
        self.blocks: tuple[nn.Sequential, ...] = tuple(_seq(*(u.module for u in g)) for g in groups)
        self.head = layout.head
        modules: list[nn.Module] = []
        with torch.no_grad():
            h = torch.zeros(1, 3, 32, 32)
            for t, (group, block) in enumerate(zip(groups[:-1], self.blocks[:-1])):
                h = block(h)
                module = _output_module(layout, group[-1], h, num_classes)
                init_parameters_(
                    module, torch.Generator().manual_seed(output_module_seed(seed, t)), init_scheme
                )
                modules.append(module)
        self.output_modules = nn.ModuleList(modules)
        names = {id(p): n for n, p in model.named_parameters()}
        self._block_names: tuple[tuple[str, ...], ...] = tuple(
            tuple(names[id(p)] for p in block.parameters()) for block in self.blocks
        )
        self._head_names = tuple(names[id(p)] for p in self.head.parameters())
        self._params = dict(model.named_parameters())

    @property
    def num_stages(self) -> int:
        """Number of stages (= blocks)."""
        return len(self.blocks)

    def _check_stage(self, stage: int) -> None:
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise TypeError(f"stage must be an int, got {type(stage).__name__}")
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")

    def block_names(self, stage: int) -> tuple[str, ...]:
        """Ordinary ``state_dict`` keys of block ``stage``'s parameters."""
        self._check_stage(stage)
        return self._block_names[stage]

    def stage_parameters(self, stage: int) -> dict[str, nn.Parameter]:
        """The parameters stage ``stage`` trains, by name.

        Block ``stage`` under the ordinary model's keys, then output module ``stage`` under
        ``output.<stage>.<name>`` (or, at the last stage, the head under the model's keys).
        """
        self._check_stage(stage)
        params = {n: self._params[n] for n in self._block_names[stage]}
        if stage == self.num_stages - 1:
            params.update((n, self._params[n]) for n in self._head_names)
        else:
            module = self.output_modules[stage]
            prefix = f"{OUTPUT_PREFIX}{stage}."
            params.update((prefix + n, p) for n, p in module.named_parameters())
        return params

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter: the ordinary model's, then every output module's."""
        yield from self.model.parameters()
        yield from self.output_modules.parameters()

    def prepare_stage(self, stage: int) -> dict[str, nn.Parameter]:
        """Make exactly stage ``stage``'s parameters require grad; return them by name."""
        trainable = self.stage_parameters(stage)
        keep = {id(p) for p in trainable.values()}
        for param in self.parameters():
            param.requires_grad_(id(param) in keep)
        return trainable

    def features(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Output of the frozen prefix (blocks ``0..stage-1``), computed under no_grad."""
        self._check_stage(stage)
        with torch.no_grad():
            for block in self.blocks[:stage]:
                x = block(x)
        return x

    def forward_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits of stage ``stage``: frozen prefix (no_grad), block ``stage``, output module.

        Block ``stage`` and its output module (the head at the last stage) run in the caller's
        grad mode, so only they record a graph.
        """
        h = self.blocks[stage](self.features(x, stage))
        if stage == self.num_stages - 1:
            out: torch.Tensor = self.head(h)
        else:
            out = self.output_modules[stage](h)
        return out

    def block_vector(self, stage: int) -> torch.Tensor:
        """Block ``stage``'s parameters flattened into one detached vector (the pace input)."""
        names = self.block_names(stage)
        return torch.cat([self._params[n].detach().reshape(-1) for n in names])

    def stage_tensors(self, stage: int) -> dict[str, torch.Tensor]:
        """Detached copies of stage ``stage``'s trainable tensors, by name (what travels)."""
        return {n: p.detach().clone() for n, p in self.stage_parameters(stage).items()}

    @torch.no_grad()
    def load_stage_tensors(self, stage: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy received tensors into stage ``stage``'s parameters.

        Raises
        ------
        ValueError
            If the names differ from :meth:`stage_parameters` or a shape, dtype or value is
            wrong (non-finite): received tensors are untrusted.

        """
        params = self.stage_parameters(stage)
        if set(tensors) != set(params):
            missing = sorted(set(params) - set(tensors))
            extra = sorted(set(tensors) - set(params))
            raise ValueError(f"stage {stage} tensors: missing {missing}, unexpected {extra}")
        for name, param in params.items():
            value = tensors[name]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                raise ValueError(f"tensor {name!r}: expected shape {tuple(param.shape)}")
            if value.dtype != param.dtype:
                raise ValueError(f"tensor {name!r}: expected dtype {param.dtype}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"tensor {name!r} holds non-finite values")
        for name, param in params.items():
            param.copy_(tensors[name])


def build_staged(
    name: str,
    num_classes: int = 10,
    seed: int = 0,
    split: str = "stage",
    layers_per_block: int = 1,
) -> StagedModel:
    """Build model ``name`` (:func:`~fedzo_flwr.models.build_model`) and its staged view.

    ``seed`` seeds the model's weights exactly as ``build_model(name, num_classes, seed)`` and,
    through :func:`output_module_seed`, the output modules'.
    """
    model = build_model(name, num_classes, seed=seed)
    scheme = get_model_spec(name).init_scheme
    return StagedModel(model, num_classes, split, layers_per_block, seed, scheme)
