"""The optimizer update (engine.update): gradient clipping under every precision, and the stop line's advice."""

import pytest
import timm
import torch

from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, nonfinite_advice, train_step
from pfb_train.models import split_model
from pfb_train.selection import Selector
from pfb_train.train import AMP_DTYPES


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_clipping_scales_the_gradients_to_the_clip_norm(amp):
    """optim.clip_grad: after the update the gradient norm is the clip value (fp16: unscaled first, so the
    clip applies to the true gradients, not the scaled ones)."""
    torch.manual_seed(0)
    model = split_model(timm.create_model("test_resnet", num_classes=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    settings = StepSettings(torch.device("cpu"), AMP_DTYPES[amp], clip_grad=0.01)
    context = StepContext(model, Selector(), settings, Optimization(optimizer, None, scaler))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = Batch(torch.randn(8, 3, 32, 32), torch.arange(8) % 4, torch.arange(8))
    result = train_step(batch, context, schedule_at=0.0)
    grads = [p.grad for p in model.parameters()]
    assert result.finite and torch.nn.utils.get_total_norm(grads).item() == pytest.approx(0.01, rel=1e-4)
    step = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters()])
    assert step.norm().item() == pytest.approx(0.1 * 0.01, rel=1e-3)  # the update used the clipped gradients


@pytest.mark.parametrize(
    "amp,clip,check_finite,wanted,unwanted",
    [
        ("none", None, True, ["lower optim.lr", "set optim.clip_grad", "check the data"], ["check_finite", "bf16"]),
        ("none", 1.0, False, ["set runtime.check_finite=true"], ["clip_grad"]),
        ("fp16", None, True, ["set optim.clip_grad", "set runtime.amp=bf16"], ["check_finite"]),
        ("fp16", 1.0, False, ["set runtime.amp=bf16"], ["check_finite", "clip_grad"]),
    ],
)
def test_nonfinite_advice_names_only_what_would_change_the_outcome(amp, clip, check_finite, wanted, unwanted):
    settings = StepSettings(torch.device("cpu"), AMP_DTYPES[amp], clip_grad=clip, check_finite=check_finite)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    advice = nonfinite_advice(settings, Optimization(None, None, scaler))
    assert all(w in advice for w in wanted) and not any(u in advice for u in unwanted), advice
