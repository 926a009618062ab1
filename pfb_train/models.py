"""Build a timm model and split it into a shallow and a deep part at a stage boundary.

The timm model is kept whole (its parameters, state_dict keys and `forward_head` are
untouched); `shallow` and `deep` are views that run its modules in forward order:

    shallow = stem -> stages[:k]            deep = stages[k:] -> post -> forward_head

so `deep(shallow(x)) == model(x)` exactly. A family adapter only names the stem
modules, the stage modules and the modules that `forward_features` runs after the
last stage; everything else about the model comes from timm.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import timm
import torch
from torch import nn

from pfb_train.errors import UserError


@dataclass(frozen=True)
class SplitSpec:
    stem: tuple[str, ...]  # modules run before the first stage, in order
    stages: tuple[str, ...]  # body stages, in order; stage k = after stages[k-1]
    post: tuple[str, ...] = ()  # modules forward_features runs after the last stage
    channels_last_features: bool = False  # stage outputs are (B, H, W, C), not (B, C, H, W)


def _resnet_spec(model) -> SplitSpec:
    return SplitSpec(stem=("conv1", "bn1", "act1", "maxpool"), stages=("layer1", "layer2", "layer3", "layer4"))


def _convnext_spec(model) -> SplitSpec:
    stages = tuple(f"stages.{i}" for i in range(len(model.stages)))
    return SplitSpec(stem=("stem",), stages=stages, post=("norm_pre",))


# timm model class name -> adapter. ResNet covers resnet, resnext, seresnet(xt), wide_resnet, resnet-d.
ADAPTERS: dict[str, Callable[[nn.Module], SplitSpec]] = {
    "ResNet": _resnet_spec,
    "ConvNeXt": _convnext_spec,
}
SUPPORTED = "ResNet family (resnet, resnext, seresnet, wide_resnet), ConvNeXt"


def split_spec(model: nn.Module) -> SplitSpec:
    adapter = ADAPTERS.get(type(model).__name__)
    if adapter is None:
        name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        raise UserError(f"cannot split model '{name}' ({type(model).__name__}); supported: {SUPPORTED}")
    return adapter(model)


def resolve_stage(spec: SplitSpec, stage: Union[int, str]) -> int:
    """Stage as a number k in 1..len(stages)-1 (deep keeps at least one stage)."""
    valid = list(range(1, len(spec.stages)))
    names = list(spec.stages[: len(valid)])
    if isinstance(stage, str) and stage.strip().isdigit():
        stage = int(stage)
    if isinstance(stage, str):
        if stage in names:
            return names.index(stage) + 1
    elif stage in valid:
        return stage
    choices = ", ".join(f"{k} ({n})" for k, n in zip(valid, names))
    raise UserError(f"invalid blocking.stage {stage!r}; choose one of: {choices}")


class BlockedOutput(NamedTuple):
    logits: torch.Tensor  # rows of the retained samples only
    keep: Optional[torch.Tensor]  # kept row indices, or None when all rows were kept
    feats: Optional[torch.Tensor]  # (B, C) pooled shallow features of every row, float32


class _Deep(nn.Module):
    def __init__(self, stages: list[nn.Module], head: list[nn.Module], forward_head: Callable):
        super().__init__()
        self.stages = nn.Sequential(*stages)
        self.head = nn.ModuleList(head)  # registered so deep.parameters() holds the head
        self.__dict__["_forward_head"] = forward_head  # timm's own pooling/dropout/classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._forward_head(self.stages(h))


class BlockedModel(nn.Module):
    """A timm model run as shallow -> select -> deep. Owns the timm model as `self.model`."""

    def __init__(self, model: nn.Module, stage: Union[int, str] = 1):
        super().__init__()
        self.model = model
        spec = split_spec(model)
        self.stage = resolve_stage(spec, stage)
        self.stage_name = spec.stages[self.stage - 1]
        self.channels_last_features = spec.channels_last_features
        get = model.get_submodule
        # Views share the model's modules; kept out of _modules so nothing is registered twice.
        self.__dict__["shallow"] = nn.Sequential(*[get(n) for n in spec.stem + spec.stages[: self.stage]])
        body = {n.split(".")[0] for n in spec.stem + spec.stages + spec.post}
        head = [m for n, m in model.named_children() if n not in body]
        deep_stages = [get(n) for n in spec.stages[self.stage :] + spec.post]
        self.__dict__["deep"] = _Deep(deep_stages, head, model.forward_head)

    def pooled_features(self, h: torch.Tensor) -> torch.Tensor:
        """Global average over space, in float32: the (B, C) input of the density model."""
        dims = (1, 2) if self.channels_last_features else (2, 3)
        return h.detach().float().mean(dims)

    def forward(self, x: torch.Tensor, select: Optional[Callable] = None, timer=None) -> BlockedOutput:
        """`select(feats) -> kept row indices or None`; without it this is the plain model."""
        h = self.shallow(x)
        if select is None:
            return BlockedOutput(self.deep(h), None, None)
        feats = self.pooled_features(h)
        keep = select(feats)
        if timer is not None:
            timer.mark("shallow")
        if keep is not None:
            h = h.index_select(0, keep)
        return BlockedOutput(self.deep(h), keep, feats)


def create_timm_model(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm.create_model with user mistakes (unknown name, unreachable weights) as UserError."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as e:  # pretrained weights need the network or a local cache
        if pretrained:
            raise UserError(f"could not load pretrained weights for '{name}': {str(e).splitlines()[0]}") from None
        raise


def build_model(model_cfg, stage: Union[int, str], num_classes: int) -> BlockedModel:
    model = create_timm_model(
        model_cfg.name,
        num_classes=num_classes,
        pretrained=model_cfg.pretrained,
        drop_rate=model_cfg.drop_rate,
        drop_path_rate=model_cfg.drop_path,
    )
    return BlockedModel(model, stage)


def split_model(model: nn.Module, stage: Union[int, str] = 1) -> BlockedModel:
    """Public API: `split_model(timm_model, stage)`; `blocked.deep(blocked.shallow(x)) == model(x)`."""
    return BlockedModel(model, stage)
