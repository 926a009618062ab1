import pytest
import timm
import torch

from pfb_train.errors import UserError
from pfb_train.models import split_model

# (model, number of body stages); valid split points are 1..stages-1
MODELS = [("resnet18", 4), ("resnet50", 4), ("seresnext26d_32x4d", 4), ("convnext_atto", 4)]


@pytest.fixture(scope="module")
def timm_models():
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=7).eval() for name, _ in MODELS}


@pytest.mark.parametrize("name,stages", MODELS)
def test_split_equals_timm_forward_at_every_stage(timm_models, name, stages):
    model = timm_models[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        for stage in range(1, stages):
            blocked = split_model(model, stage).eval()
            assert torch.equal(blocked.deep(blocked.shallow(x)), reference), (name, stage)
            out = blocked(x)
            assert out.keep is None and torch.equal(out.logits, reference)


@pytest.mark.parametrize("name,stages", MODELS)
def test_shallow_and_deep_partition_the_parameters(timm_models, name, stages):
    model = timm_models[name]
    blocked = split_model(model, 2)
    shallow = {id(p) for p in blocked.shallow.parameters()}
    deep = {id(p) for p in blocked.deep.parameters()}
    assert not shallow & deep
    assert shallow | deep == {id(p) for p in model.parameters()}
    # the wrapper registers the model once: same keys as timm's own state_dict, prefixed
    assert list(blocked.state_dict()) == [f"model.{k}" for k in model.state_dict()]


def test_stage_by_module_name(timm_models):
    assert split_model(timm_models["resnet18"], "layer2").stage == 2
    assert split_model(timm_models["convnext_atto"], "stages.0").stage == 1


@pytest.mark.parametrize("stage", [0, 4, 9, "layer4", "layer9"])
def test_invalid_stage_is_one_line_listing_choices(timm_models, stage):
    with pytest.raises(UserError) as err:
        split_model(timm_models["resnet18"], stage)
    message = str(err.value)
    assert "\n" not in message
    assert "1 (layer1), 2 (layer2), 3 (layer3)" in message


def test_unsplittable_model_is_a_clear_error():
    model = timm.create_model("levit_128s", num_classes=3)  # flattens to tokens between stem and stages
    with pytest.raises(UserError, match="cannot split model 'levit_128s' .*supported: ResNet family"):
        split_model(model, 1)


def test_blocked_forward_runs_deep_on_kept_rows_only():
    model = timm.create_model("resnet18", num_classes=5).eval()
    blocked = split_model(model, 1)
    x = torch.randn(6, 3, 32, 32)
    keep = torch.tensor([1, 4])
    with torch.no_grad():
        out = blocked(x, select=lambda feats: keep)
        full = model(x)
    assert out.logits.shape == (2, 5)
    assert torch.allclose(out.logits, full[keep], atol=1e-5)
    assert out.feats.shape == (6, 64) and out.feats.dtype == torch.float32


def test_compiled_parts_give_the_same_output():
    model = timm.create_model("resnet18", num_classes=5).eval()
    blocked = split_model(model, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = blocked(x).logits
        blocked.compile_parts(backend="eager")  # exercises the wrapping; inductor needs no other code path
        assert type(blocked.shallow).__name__ == "OptimizedModule"
        assert torch.allclose(blocked(x).logits, expected)
    assert list(blocked.state_dict()) == [f"model.{k}" for k in model.state_dict()]  # nothing re-registered


def test_sync_bn_is_converted_before_splitting():
    from pfb_train.config import ModelConfig
    from pfb_train.models import build_model

    blocked = build_model(ModelConfig(name="resnet18"), 1, num_classes=5, sync_bn=True)
    norms = [m for m in blocked.shallow.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # the views run the converted modules, not stale copies of the originals
    assert {id(m) for m in norms} <= {id(m) for m in blocked.model.modules()}
    blocked.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(blocked(x).logits, blocked.model(x))


def test_cifar_stem_keeps_full_resolution_and_rejects_other_models():
    from pfb_train.config import ModelConfig
    from pfb_train.models import build_model

    blocked = build_model(ModelConfig(name="resnet18", cifar_stem=True), 1, num_classes=10)
    assert blocked.shallow(torch.randn(2, 3, 32, 32)).shape == (2, 64, 32, 32)
    with pytest.raises(UserError, match="model.cifar_stem"):
        build_model(ModelConfig(name="convnext_atto", cifar_stem=True), 1, num_classes=10)


@pytest.mark.parametrize("offline", [True, False])
def test_pretrained_weights_out_of_reach_are_one_line_before_any_download(monkeypatch, offline):
    """Offline (HF_HUB_OFFLINE, or the Hub unreachable) and not in the cache: said at once, with where to
    put the weights, instead of after the Hub client's minute of retries."""
    import huggingface_hub
    import huggingface_hub.constants

    from pfb_train import models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    def no_download(*args, **kwargs):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    monkeypatch.setattr(models.timm, "create_model", no_download)
    reason = "HF_HUB_OFFLINE is set" if offline else "cannot be reached"
    with pytest.raises(UserError, match=f"{reason}, and timm/resnet18.* is not in the Hugging Face cache"):
        models.create_timm_model("resnet18", num_classes=10, pretrained=True)
