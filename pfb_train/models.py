"""Build a timm model and split it into a shallow and a deep part at a stage boundary.

The timm model is kept whole (its parameters, state_dict keys and `forward_head` are
untouched); `shallow` and `deep` are views that run its modules in forward order:

    shallow = stem -> stages[:k]            deep = stages[k:] -> post -> forward_head

so `deep(shallow(x)) == model(x)` exactly. A family adapter only names the stem
modules, the stage modules and the modules that `forward_features` runs after the
last stage; everything else about the model comes from timm.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import timm
import torch
from torch import nn

from pfb_train.errors import UserError


@dataclass(frozen=True)
class SplitSpec:
    stem: tuple[str, ...]  # modules (or loose parameters) before the first stage, in forward order
    stages: tuple[str, ...]  # body stages, in order; stage k = after stages[k-1]
    post: tuple[str, ...] = ()  # modules forward_features runs after the last stage
    feature_dims: tuple[int, ...] = (2, 3)  # axes averaged to pool a stage output to (B, C)
    stem_forward: Optional[Callable] = None  # (model, x) -> x when the stem is not a plain module chain


def _children(model: nn.Module, container: str) -> tuple[str, ...]:
    return tuple(f"{container}.{name}" for name, _ in model.get_submodule(container).named_children())


def _resnet_spec(model) -> SplitSpec:
    return SplitSpec(stem=("conv1", "bn1", "act1", "maxpool"), stages=("layer1", "layer2", "layer3", "layer4"))


def _convnext_spec(model) -> SplitSpec:
    return SplitSpec(stem=("stem",), stages=_children(model, "stages"), post=("norm_pre",))


def _swin_spec(model) -> SplitSpec:
    # timm's Swin keeps activations channels-last: (B, H, W, C)
    return SplitSpec(stem=("patch_embed",), stages=_children(model, "layers"), post=("norm",), feature_dims=(1, 2))


def _vit_stem(model, x):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def _vit_spec(model) -> SplitSpec:
    # Blocks are equal, so each block is a stage; the class/register tokens and the position
    # embedding are loose parameters of the stem. Tokens are (B, N, C): pool over N.
    loose = tuple(n for n in ("cls_token", "reg_token", "pos_embed") if getattr(model, n, None) is not None)
    return SplitSpec(stem=("patch_embed", "pos_drop", "patch_drop", "norm_pre") + loose,
                     stages=_children(model, "blocks"), post=("norm",), feature_dims=(1,), stem_forward=_vit_stem)


def _efficientnet_spec(model) -> SplitSpec:
    return SplitSpec(stem=("conv_stem", "bn1"), stages=_children(model, "blocks"), post=("conv_head", "bn2"))


def _mobilenetv3_spec(model) -> SplitSpec:
    return SplitSpec(stem=("conv_stem", "bn1"), stages=_children(model, "blocks"))  # conv_head is in forward_head


def _regnet_spec(model) -> SplitSpec:
    return SplitSpec(stem=("stem",), stages=("s1", "s2", "s3", "s4"), post=("final_conv",))


# timm model class name -> adapter. ResNet covers resnet, resnext, seresnet(xt), wide_resnet, resnet-d.
ADAPTERS: dict[str, Callable[[nn.Module], SplitSpec]] = {
    "ResNet": _resnet_spec,
    "ConvNeXt": _convnext_spec,
    "SwinTransformer": _swin_spec,
    "VisionTransformer": _vit_spec,
    "EfficientNet": _efficientnet_spec,
    "MobileNetV3": _mobilenetv3_spec,
    "RegNet": _regnet_spec,
}
SUPPORTED = ("ResNet family (resnet, resnext, seresnet, wide_resnet), ConvNeXt, Swin, ViT/DeiT, EfficientNet, "
             "MobileNetV3, RegNet, and models whose feature_info stages run in sequence")
# Children that belong to timm's forward_head, never to forward_features.
HEAD_NAMES = {"global_pool", "head", "head_drop", "fc", "fc_norm", "classifier", "flatten", "pre_logits", "head_dist"}


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _generic_spec(model: nn.Module) -> Optional[SplitSpec]:
    """Stages from timm's feature_info: the children of the container holding most of its entries."""
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    entries = [d["module"] for d in info] if isinstance(info, list) else list(info.module_name())
    parents = [e.rpartition(".")[0] for e in entries]
    container = max(dict.fromkeys(parents), key=parents.count)  # most common; first wins ties
    top = [name for name, _ in model.named_children()]
    if container:
        if "." in container or not isinstance(model.get_submodule(container), nn.Sequential):
            return None
        stages, first, final = _children(model, container), container, container
    else:
        stages = tuple(e for e in entries if e in top)
        first, final = stages[0], stages[-1]
    stem = tuple(top[: top.index(first)])
    post = tuple(n for n in top[top.index(final) + 1 :] if n not in HEAD_NAMES)
    return SplitSpec(stem=stem, stages=stages, post=post)


def split_spec(model: nn.Module) -> SplitSpec:
    adapter = ADAPTERS.get(type(model).__name__)
    spec = adapter(model) if adapter is not None else _generic_spec(model)
    if spec is None:
        raise UserError(f"cannot split model '{_model_name(model)}' ({type(model).__name__}); supported: {SUPPORTED}")
    return spec


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


class _Shallow(nn.Module):
    """stem -> stages[:k]. Registers the modules it runs; the timm model stays their owner.

    The model is referenced through __dict__ (not closures) so that copy.deepcopy of the
    BlockedModel (timm's EMA does one) maps it to the copy, consistently with the modules."""

    def __init__(self, model: nn.Module, spec: SplitSpec, stage: int):
        super().__init__()
        self.stem = nn.ModuleList()
        for name in spec.stem:
            if isinstance(getattr(model, name, None), nn.Parameter):  # e.g. ViT's cls_token, pos_embed
                self.register_parameter(f"stem_{name}", getattr(model, name))
            else:
                self.stem.append(model.get_submodule(name))
        self.stages = nn.Sequential(*[model.get_submodule(n) for n in spec.stages[:stage]])
        self.__dict__["_model"] = model
        self.__dict__["_stem_forward"] = spec.stem_forward  # a module-level function, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_forward is not None:
            x = self._stem_forward(self._model, x)
        else:
            for module in self.stem:
                x = module(x)
        return self.stages(x)


class _Deep(nn.Module):
    """stages[k:] -> post -> timm's own forward_head."""

    def __init__(self, model: nn.Module, spec: SplitSpec, stage: int):
        super().__init__()
        self.stages = nn.Sequential(*[model.get_submodule(n) for n in spec.stages[stage:] + spec.post])
        body = {n.split(".")[0] for n in spec.stem + spec.stages + spec.post}
        self.head = nn.ModuleList(m for n, m in model.named_children() if n not in body)
        self.__dict__["_model"] = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._model.forward_head(self.stages(h))


def _verify_split(model: nn.Module, blocked: "BlockedModel") -> None:
    """Generic splits are only trusted once they reproduce the model's forward on a random input
    (on the meta device, where there are no values, they must at least run and give its shape)."""
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, *size, device=device)
        with torch.no_grad():
            split, whole = blocked.deep(blocked.shallow(x)), model(x)
        if device.type == "meta":
            ok = split.shape == whole.shape
        else:
            ok = torch.allclose(split, whole, rtol=1e-4, atol=1e-5)
    except Exception:
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        raise UserError(f"cannot split model '{_model_name(model)}' ({type(model).__name__}): its feature_info "
                        f"stages do not run in sequence; supported: {SUPPORTED}")


class BlockedModel(nn.Module):
    """A timm model run as shallow -> select -> deep. Owns the timm model as `self.model`.

    mode 'reuse': shallow once, with gradients, for the whole batch; deep on the kept rows.
    mode 'recompute': shallow without gradients for the selection, then shallow + deep with
    gradients on the kept rows only (BatchNorm statistics updated by that second pass alone).
    """

    def __init__(self, model: nn.Module, stage: Union[int, str] = 1, mode: str = "reuse"):
        super().__init__()
        if mode not in ("reuse", "recompute"):
            raise UserError(f"invalid blocking.mode {mode!r}; choose one of: reuse, recompute (auto is resolved "
                            "from the ratio by pfb_train.costs.cheaper_mode)")
        self.model = model
        spec = split_spec(model)
        self.stage = resolve_stage(spec, stage)
        self.stage_name = spec.stages[self.stage - 1]
        self.mode = mode
        self.feature_dims = spec.feature_dims
        # Views share the model's modules; kept out of _modules so nothing is registered twice.
        self.__dict__["shallow"] = _Shallow(model, spec, self.stage)
        self.__dict__["deep"] = _Deep(model, spec, self.stage)
        if type(model).__name__ not in ADAPTERS:
            _verify_split(model, self)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes  # every timm classifier has it

    def compile_parts(self, **options) -> None:
        """torch.compile shallow and deep separately; the selection between them stays eager."""
        self.__dict__["shallow"] = torch.compile(self.shallow, **options)
        self.__dict__["deep"] = torch.compile(self.deep, **options)

    def pooled_features(self, h: torch.Tensor) -> torch.Tensor:
        """Global average over space (or tokens), accumulated in float32: the (B, C) input of the
        density model. `dtype=` instead of `.float()` avoids a float32 copy of the whole activation."""
        return h.detach().mean(self.feature_dims, dtype=torch.float32)

    def forward(self, x: torch.Tensor, select: Optional[Callable] = None, features: bool = False,
                timer=None) -> BlockedOutput:
        """`select(feats) -> kept row indices or None`; without it this is the plain model, which
        returns the pooled shallow features too when `features` is set."""
        if select is None:
            if not features:
                return BlockedOutput(self.deep(self.shallow(x)), None, None)
            h = self.shallow(x)
            return BlockedOutput(self.deep(h), None, self.pooled_features(h))
        recompute = self.mode == "recompute"
        with torch.no_grad() if recompute else contextlib.nullcontext(), frozen_norm_stats(self.shallow, recompute):
            h = self.shallow(x)
        feats = self.pooled_features(h)
        if timer is not None:
            timer.mark("shallow")
        keep = select(feats)
        if timer is not None:
            timer.mark("select")
        if recompute:  # the kept rows again, with gradients; h was only for choosing them
            h = self.shallow(x if keep is None else x.index_select(0, keep))
        elif keep is not None:
            h = h.index_select(0, keep)
        return BlockedOutput(self.deep(h), keep, feats)


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module, enabled: bool = True):
    """BatchNorm layers normalise with batch statistics but leave running statistics alone."""
    norms = [m for m in module.modules() if enabled and isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


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


def build_model(model_cfg, stage: Union[int, str], num_classes: int, mode: str = "reuse",
                sync_bn: bool = False) -> BlockedModel:
    model = create_timm_model(
        model_cfg.name,
        num_classes=num_classes,
        pretrained=model_cfg.pretrained,
        drop_rate=model_cfg.drop_rate,
        drop_path_rate=model_cfg.drop_path,
    )
    if model_cfg.cifar_stem:
        model = cifar_stem(model)
    if sync_bn:  # before splitting: conversion swaps modules, and the views hold references
        model = timm.layers.convert_sync_batchnorm(model)
    return BlockedModel(model, stage, mode)


def cifar_stem(model: nn.Module) -> nn.Module:
    """The usual CIFAR ResNet: a 3x3 stride-1 first convolution and no max-pool keep 32 px inputs at
    full resolution into layer1 (timm's ImageNet stem would shrink them to 8 px)."""
    if type(model).__name__ != "ResNet" or not isinstance(model.conv1, nn.Conv2d):
        raise UserError(f"config key 'model.cifar_stem' applies to ResNets with a single-conv stem, not '{_model_name(model)}'")
    model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False,
                            device=model.conv1.weight.device)
    model.maxpool = nn.Identity()
    return model


def split_model(model: nn.Module, stage: Union[int, str] = 1, mode: str = "reuse") -> BlockedModel:
    """Public API: `split_model(timm_model, stage)`; `blocked.deep(blocked.shallow(x)) == model(x)`."""
    return BlockedModel(model, stage, mode)
