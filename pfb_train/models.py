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
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pfb_train.errors import UserError, first_line
from pfb_train.selection.score_pass import AUTO_SCALE, EXACT_SCORE, ScorePass


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
    return SplitSpec(
        stem=("patch_embed", "pos_drop", "patch_drop", "norm_pre") + loose,
        stages=_children(model, "blocks"),
        post=("norm",),
        feature_dims=(1,),
        stem_forward=_vit_stem,
    )


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
SUPPORTED = (
    "ResNet family (resnet, resnext, seresnet, wide_resnet), ConvNeXt, Swin, ViT/DeiT, EfficientNet, "
    "MobileNetV3, RegNet, and models whose feature_info stages run in sequence"
)
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

    _model: nn.Module
    _stem_forward: Optional[Callable]

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

    _model: Any  # a timm model: forward_head

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
        raise UserError(
            f"cannot split model '{_model_name(model)}' ({type(model).__name__}): its feature_info "
            f"stages do not run in sequence; supported: {SUPPORTED}"
        )


class BlockedModel(nn.Module):
    """A timm model run as shallow -> select -> deep. Owns the timm model as `self.model`.

    mode 'reuse': shallow once, with gradients, for the whole batch; deep on the kept rows.
    mode 'recompute': a ranking pass of the shallow part without gradients (`ScorePass`: by
    default full size, batch statistics), then shallow + deep with gradients on the kept rows only
    (BatchNorm statistics updated by that second pass alone).
    """

    # Attributes kept out of nn.Module's registries (set through __dict__, see __init__), typed for readers.
    model: Any  # the timm model
    shallow: nn.Module  # _Shallow, or its torch.compile'd form
    deep: nn.Module
    _eager_shallow: _Shallow
    _shallow_norms: list[_BatchNorm]
    _takes_size: dict[int, Optional[str]]
    stage: int
    stage_name: str
    mode: str

    def __init__(self, model: nn.Module, stage: Union[int, str] = 1, mode: str = "reuse"):
        super().__init__()
        if mode not in ("reuse", "recompute"):
            raise UserError(
                f"invalid blocking.mode {mode!r}; choose one of: reuse, recompute (auto is resolved "
                "from the ratio by pfb_train.costs.cheaper_mode)"
            )
        self.model = model
        spec = split_spec(model)
        self.stage = resolve_stage(spec, stage)
        self.stage_name = spec.stages[self.stage - 1]
        self.mode = mode
        self.feature_dims = spec.feature_dims
        # Views share the model's modules; kept out of _modules so nothing is registered twice.
        self.__dict__["shallow"] = _Shallow(model, spec, self.stage)
        self.__dict__["deep"] = _Deep(model, spec, self.stage)
        self.__dict__["_shallow_norms"] = tracking_norms(self.shallow)
        self.__dict__["_eager_shallow"] = self.shallow  # compile_parts replaces `shallow`, not this
        self.__dict__["_takes_size"] = {}  # input size -> whether the shallow part runs on it
        if type(model).__name__ not in ADAPTERS:
            _verify_split(model, self)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes  # every timm classifier has it

    @property
    def in_chans(self) -> int:
        """Input channels, from the stem's first convolution (or patch projection) weight (out, in, kh, kw):
        timm's pretrained_cfg keeps 3 for a model made with another `in_chans`."""
        return next(p for p in self._eager_shallow.parameters() if p.dim() == 4).shape[1]

    def compile_parts(self, **options) -> None:
        """torch.compile shallow and deep separately; the selection between them stays eager.

        Shapes are static (`dynamic=False`): each batch size the parts see (the full batch, the
        kept rows, the score pass's size) gets its own specialised graph, compiled the first time
        it appears and reused after. A graph with a symbolic batch size ran the deep part of a
        blocked resnet50 step 1.4x slower than the static one on an H200 (docs/BENCHMARKS.md).
        A ramped ratio adds one size per epoch, hence the higher recompile limit."""
        import torch._dynamo  # loaded on first use: importing it costs ~1 s, and most runs never compile

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        options.setdefault("dynamic", False)
        self.__dict__["shallow"] = torch.compile(self.shallow, **options)
        self.__dict__["deep"] = torch.compile(self.deep, **options)

    def pooled_features(self, h: torch.Tensor) -> torch.Tensor:
        """Global average over space (or tokens), accumulated in float32: the (B, C) input of the
        density model. `dtype=` instead of `.float()` avoids a float32 copy of the whole activation."""
        return h.detach().mean(self.feature_dims, dtype=torch.float32)

    def forward(
        self, x: torch.Tensor, select: Optional[Callable] = None, features: bool = False, score: ScorePass = EXACT_SCORE
    ) -> BlockedOutput:
        """`x`: (B, C, H, W) images. `select(feats) -> kept row indices or None`; without it this is
        the plain model, which returns the pooled shallow features too when `features` is set.
        `score`: how recompute mode ranks the rows (reuse ranks by its training pass's features)."""
        if select is None:
            if not features:
                return BlockedOutput(self.deep(self.shallow(x)), None, None)
            h = self.shallow(x)
            return BlockedOutput(self.deep(h), None, self.pooled_features(h))
        recompute = self.mode == "recompute"
        if recompute:
            feats = self.score_features(x, score)
        else:
            h = self.shallow(x)
            feats = self.pooled_features(h)
        keep = select(feats)
        if recompute:  # the kept rows again, with gradients; the ranking pass was only for choosing them
            h = self.shallow(x if keep is None else x.index_select(0, keep))
        elif keep is not None:
            h = h.index_select(0, keep)
        return BlockedOutput(self.deep(h), keep, feats)

    def resolve_score(self, score: ScorePass, img_size: Optional[int] = None) -> ScorePass:
        """`score` with its automatic parts decided for this model at `img_size` px (None: the
        model's own input size): see ScorePass. Decided once per size (one image through the
        uncompiled shallow part), then looked up."""
        if score.resolved():
            return score
        norm = score.norm if score.norm != "auto" else ("running" if self._shallow_norms else "batch")
        scale = score.scale
        if scale is None:
            size = img_size or getattr(self.model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
            scale = AUTO_SCALE if self._runs_at(max(1, round(size * AUTO_SCALE))) is None else 1.0
        return ScorePass(scale, norm)

    def _runs_at(self, size: int) -> Optional[str]:
        """None if the shallow part runs on a `size`-px image, else the reason it does not (cached)."""
        if size not in self._takes_size:
            param = next(self.parameters())
            was_training = self.training
            self.eval()  # one image through, running statistics untouched
            try:
                with torch.no_grad():
                    self._eager_shallow(
                        torch.zeros(1, self.in_chans, size, size, device=param.device, dtype=param.dtype)
                    )
                self._takes_size[size] = None
            except Exception as e:
                self._takes_size[size] = first_line(e)
            finally:
                self.train(was_training)
        return self._takes_size[size]

    @torch.no_grad()
    def score_features(self, x: torch.Tensor, score: ScorePass = EXACT_SCORE) -> torch.Tensor:
        """The ranking pass: (B, C) float32 pooled shallow features of every row, no gradients, the
        model's state as it was. Modules are switched to eval mode (`running`) outside the compiled
        parts, and batch statistics are undone by a copy rather than by flipping BatchNorm attributes:
        TorchDynamo guards on attributes, so a flip would cost a recompile."""
        if score.scale == 0:  # NO_RANKING: the selection reads the batch size and device only
            return x.new_zeros(x.shape[0], 0, dtype=torch.float32)
        score = self.resolve_score(score, x.shape[-1])
        assert score.scale is not None  # resolved
        x = score_input(x, score.scale)
        if score.norm == "running":
            was_training = self.training  # the views are outside _modules: their own flag is stale
            self.shallow.train(False)
            try:
                return self.pooled_features(self.shallow(x))
            finally:
                self.shallow.train(was_training)
        with kept_norm_stats(self._shallow_norms):
            return self.pooled_features(self.shallow(x))


def score_input(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, round(H * scale), round(W * scale)) by area averaging (an antialiased
    downscale: each output pixel is the mean of the input pixels it covers)."""
    if scale == 1.0:
        return x
    size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
    return F.interpolate(x, size=size, mode="area")


def tracking_norms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `module` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def kept_norm_stats(norms: list[_BatchNorm]):
    """Running statistics of `norms` as they were before the block: a train-mode pass inside
    normalises by its batch (outputs equal to BatchNorm without running statistics) and updates
    nothing. Buffers are read at entry: `.to(device)` replaces them."""
    buffers = [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = list(torch._foreach_clone(buffers)) if buffers else []  # one call per step, not one per buffer
    try:
        yield
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module, enabled: bool = True):
    """BatchNorm layers normalise with batch statistics but leave running statistics alone."""
    with kept_norm_stats(tracking_norms(module) if enabled else []):
        yield


def check_score_pass(blocked: BlockedModel, score: ScorePass, img_size: int, key: str = "blocking.pfb") -> ScorePass:
    """The ranking pass `score` resolved for `blocked` at `img_size` px (BlockedModel.resolve_score);
    raises UserError (one line, naming the config key) if the model cannot run an explicit setting: a
    fixed-size input (timm's ViT and Swin check it), or `running` without BatchNorm to read it from."""
    resolved = blocked.resolve_score(score, img_size)
    name = _model_name(blocked.model)
    if score.norm == "running" and not blocked._shallow_norms:
        raise UserError(
            f"{key}.score_norm 'running' needs BatchNorm running statistics in the shallow part; "
            f"'{name}' has none there (its norms use each sample's own statistics): use 'batch' or 'auto'"
        )
    if score.scale not in (None, 1.0, 0.0):  # 0: NO_RANKING, no pass to run
        size = max(1, round(img_size * score.scale))
        reason = blocked._runs_at(size)
        if reason is not None:
            raise UserError(
                f"{key}.score_scale {score.scale} feeds '{name}' {size} px images (data.img_size "
                f"{img_size}), which its shallow part does not take ({reason}); use score_scale 1 "
                "or null (auto)"
            )
    return resolved


def check_training_rows(
    blocked: BlockedModel,
    img_size: int,
    batch_rows: int,
    kept_rows: int,
    ratio_key: Optional[str] = None,
    synced_ranks: int = 1,
) -> None:
    """Refuse (UserError, one line) a batch that BatchNorm cannot train on: in training it needs two or more
    values per channel (PyTorch raises ValueError otherwise), and a layer whose input is one pixel per
    channel (the last stages of a small image) gets that from the rows alone.

    `batch_rows`: rows per step on this process (data.batch_size); `kept_rows`: the fewest rows the deep
    part gets (the blocking ratio's largest value applied), which recompute mode's shallow part gets too.
    `ratio_key`: the config key that sets `kept_rows` below `batch_rows` (for the message).
    `synced_ranks`: processes whose rows each BatchNorm's statistics gather (SyncBatchNorm: the world
    size), which then needs two values per channel over all of them. One image goes through the model
    in eval mode (only where the rows alone could be too few): no state changes."""
    if min(batch_rows, kept_rows) >= 2 or synced_ranks > 1:  # enough rows whatever the feature maps
        return
    single = _single_value_norms(blocked, img_size)
    shallow_rows = kept_rows if blocked.mode == "recompute" else batch_rows
    name = _model_name(blocked.model)
    for part, rows in (("shallow", shallow_rows), ("deep", kept_rows)):
        layer = next((layer for layer, where in single if where == part), None)
        if layer is None or rows >= 2:
            continue
        seen = (
            f"BatchNorm layer '{layer}' of '{name}' sees one value per channel per image at data.img_size "
            f"{img_size} px, and in training BatchNorm needs two"
        )
        if batch_rows < 2:
            raise UserError(f"config key 'data.batch_size' is {batch_rows}: {seen}; set data.batch_size to 2 or more")
        raise UserError(
            f"config key '{ratio_key}' keeps {rows} row of each batch of data.batch_size {batch_rows}: "
            f"{seen}; raise data.batch_size or lower {ratio_key}"
        )


def _single_value_norms(blocked: BlockedModel, img_size: int) -> list[tuple[str, str]]:
    """(name, 'shallow' | 'deep') of the BatchNorm layers whose input holds one value per channel per image
    at `img_size` px."""
    shallow = {id(m) for m in blocked._eager_shallow.modules()}
    found, hooks = [], []
    for layer, module in blocked.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def record(module, inputs, layer=layer):
                if inputs[0][0].numel() == inputs[0].shape[1]:  # (C, *spatial) of one image: C values
                    found.append((layer, "shallow" if id(module) in shallow else "deep"))

            hooks.append(module.register_forward_pre_hook(record))
    if not hooks:
        return []
    try:
        runs_at(blocked.model, img_size)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def create_timm_model(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm.create_model with user mistakes (unknown name, unreachable weights) as UserError."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown timm model '{name}'{hint}")
    problem = weights_out_of_reach(name) if pretrained else None
    if problem is not None:
        raise UserError(f"could not load pretrained weights for '{name}': {problem}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:  # an option this model's constructor does not take
        raise UserError(
            f"timm model '{name}' cannot be built with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())} "
            f"({first_line(e)})"
        ) from None
    except Exception as e:  # pretrained weights need the network or a local cache
        if pretrained:
            raise UserError(f"could not load pretrained weights for '{name}': {first_line(e)}") from None
        raise


def weights_out_of_reach(name: str, timeout: float = 3.0) -> Optional[str]:
    """Why timm model `name`'s pretrained weights cannot be had here, found in at most `timeout` seconds
    (the Hub client's own retries take about a minute to fail offline); None where they are in the Hugging
    Face cache, the Hub answers, or they come from elsewhere (a URL: timm's own error is quick)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id.split("@")[0]
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return None
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    elif urllib.request.getproxies().get(endpoint.scheme or "https"):
        return None  # reached through a proxy: a direct probe says nothing, the download will tell
    else:
        try:
            socket.create_connection((host, endpoint.port or 443), timeout=timeout).close()
            return None
        except OSError:
            reason = f"{host} cannot be reached"
    return (
        f"{reason}, and {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): download it where "
        f"there is network (timm.create_model('{name}', pretrained=True)) and copy that cache here (or point "
        "HF_HUB_CACHE at it), or set model.pretrained=false"
    )


def runs_at(model: nn.Module, size: int) -> Optional[str]:
    """None if `model` (whole) takes one `size`-px image, else the reason it does not (e.g. timm's
    "Input height (32) doesn't match model (224)" of a ViT). Eval mode, no gradients: no state changes."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, chans, size, size, device=param.device, dtype=param.dtype))
        return None
    except Exception as e:
        return first_line(e)
    finally:
        model.train(was_training)


def build_model(
    model_cfg,
    stage: Union[int, str],
    num_classes: int,
    mode: str = "reuse",
    sync_bn: bool = False,
    img_size: Optional[int] = None,
) -> BlockedModel:
    """The timm model `model_cfg` describes, split after `stage`. With `img_size` (px), a model that
    does not run at that size as built (ViT, DeiT, Swin: a fixed input size) is built for it through
    timm's `img_size` argument. Raises UserError (one line) for an unknown model, options it does not
    take, or a size it cannot run at."""
    options = dict(
        num_classes=num_classes,
        pretrained=model_cfg.pretrained,
        drop_rate=model_cfg.drop_rate,
        drop_path_rate=model_cfg.drop_path,
    )
    model = _prepared(create_timm_model(model_cfg.name, **options), model_cfg)
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[-1]
    if img_size is not None and img_size != default and (reason := runs_at(model, img_size)) is not None:
        try:
            model = _prepared(create_timm_model(model_cfg.name, img_size=img_size, **options), model_cfg)
            reason = runs_at(model, img_size)
        except UserError:  # the model takes no img_size: the first reason stands
            pass
        if reason is not None:
            raise UserError(
                f"model '{model_cfg.name}' does not run on data.img_size {img_size} px images ({reason}); "
                f"set data.img_size to a size it takes{f' (its default is {default})' if default else ''}"
            )
    if sync_bn:  # before splitting: conversion swaps modules, and the views hold references
        model = timm.layers.convert_sync_batchnorm(model)
    return BlockedModel(model, stage, mode)


def _prepared(model: nn.Module, model_cfg) -> nn.Module:
    if model_cfg.cifar_stem:
        model = cifar_stem(model)
    return model


def cifar_stem(model: nn.Module) -> nn.Module:
    """The usual CIFAR ResNet: a 3x3 stride-1 first convolution and no max-pool keep 32 px inputs at
    full resolution into layer1 (timm's ImageNet stem would shrink them to 8 px)."""
    if type(model).__name__ != "ResNet" or not isinstance(model.conv1, nn.Conv2d):
        raise UserError(
            f"config key 'model.cifar_stem' applies to ResNets with a single-conv stem, not '{_model_name(model)}'"
        )
    model.conv1 = nn.Conv2d(
        model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False, device=model.conv1.weight.device
    )
    model.maxpool = nn.Identity()
    return model


def split_model(model: nn.Module, stage: Union[int, str] = 1, mode: str = "reuse") -> BlockedModel:
    """Public API: a timm classifier as shallow -> select -> deep; `blocked.deep(blocked.shallow(x)) == model(x)`.

    `model`: a timm classifier, on any device and in any dtype; it is shared, not copied (`blocked.model`).
    `stage`: where to split: the body's stages counted from 1, the stem never counted (ViT/DeiT: blocks),
    or a stage's module name ("layer2"); the deep part keeps at least one stage.
    `mode`: "reuse" or "recompute" ("auto" is resolved before: `pfb_train.Blocking`, `costs.cheaper_mode`).

    Shapes: `blocked.shallow(x)` takes (B, C, H, W) images and returns the stage's activation in timm's
    layout ((B, C', H', W') for CNNs, (B, H', W', C') for Swin, (B, N, C') tokens for ViT/DeiT), in the
    input's dtype (autocast's under autocast); `blocked.deep(h)` returns (B, classes) logits.
    `blocked(x, select=fn)` returns BlockedOutput: logits (kept, classes), keep ((kept,) int64 row indices,
    or None when every row was kept), feats ((B, C') float32 pooled shallow features, or None).

    Raises UserError: a model that cannot be split (a family without an adapter whose feature_info stages
    do not reproduce its forward), a `stage` out of range or not a stage name, a `mode` other than the two."""
    return BlockedModel(model, stage, mode)
