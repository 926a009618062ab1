"""The trained model leaves the harness as a timm model (export.py): what timm rebuilds from a run's export
gives the harness's own logits; `pfb-train export` writes any of best, last, ema; the best copy can be skipped."""

import pytest
import timm
import torch

from pfb_train.checkpoint import BEST, LAST, load_checkpoint
from pfb_train.config import load_config
from pfb_train.models import build_model
from pfb_train.train import run
from helpers import SMALL_CPU_RUN, run_main

RUN = [
    *SMALL_CPU_RUN,
    "model.name=test_resnet",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=64",
    "data.val_samples=16",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "blocking.method=pfb",
    "blocking.pfb.centres=8",
    "optim.ema_decay=0.5",
    "name=exp",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = run(load_config(None, [*RUN, f"runtime.output={out}"]))
    return out / "exp", summary


def harness_logits(run_dir, checkpoint_name, key, x):
    """The harness's own evaluation forward of a checkpoint's weights: the split model, eval mode."""
    checkpoint = load_checkpoint(run_dir / checkpoint_name)
    cfg = load_config(str(run_dir / "config.yaml"))
    blocked = build_model(cfg.model, cfg.blocking.stage, 10, img_size=32)
    weights = checkpoint[key] if key == "model" else {k.removeprefix("module."): v for k, v in checkpoint[key].items()}
    blocked.load_state_dict(weights)
    with torch.no_grad():
        return blocked.eval()(x).logits


def test_timm_rebuilds_each_exported_model_with_the_harness_logits(trained):
    run_dir, _ = trained
    x = torch.randn(4, 3, 32, 32)
    for which, checkpoint_name, key in (("best", BEST, "model"), ("last", LAST, "model"), ("ema", LAST, "ema")):
        folder = run_dir / "export" / which
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.num_classes == 10
        # generated data is used as made: timm's preprocessing must leave it alone; no claim of timm's weights
        config = timm.data.resolve_data_config(model=model)
        assert (tuple(config["mean"]), tuple(config["std"]), config["crop_pct"]) == ((0.0,) * 3, (1.0,) * 3, 1.0)
        assert "tag" not in model.pretrained_cfg and "hf_hub_id" not in model.pretrained_cfg
        with torch.no_grad():
            torch.testing.assert_close(model(x), harness_logits(run_dir, checkpoint_name, key, x), rtol=0, atol=0)
    # the same file through timm's checkpoint_path=, the loader that refused the harness's own checkpoints
    plain = timm.create_model(
        "test_resnet", num_classes=10, checkpoint_path=str(run_dir / "export/best/model.safetensors")
    )
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), harness_logits(run_dir, BEST, "model", x), rtol=0, atol=0)


def test_the_export_command_writes_any_of_the_weights_and_refuses_in_one_line(trained, tmp_path, capsys, monkeypatch):
    run_dir, _ = trained
    result = run_main(capsys, "export", str(run_dir), "--which", "ema", "--out", str(tmp_path / "ema"))
    assert result.returncode == 0 and "local-dir:" in result.stdout, result.stderr
    assert (tmp_path / "ema" / "model.safetensors").read_bytes() == (
        run_dir / "export/ema/model.safetensors"
    ).read_bytes()

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run_main(capsys, "export", str(run_dir), "--out", str(tmp_path / "b"), "--hub", "someone/model")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in result.stderr
    result = run_main(capsys, "export", str(tmp_path), "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "is not a run directory" in result.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    for out in (tmp_path / "mine", run_dir):  # a folder of other things is never replaced: the run's own neither
        result = run_main(capsys, "export", str(run_dir), "--out", str(out))
        assert result.returncode == 2 and "holds other things than an export" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept" and (run_dir / "config.yaml").is_file()
    again = run_main(capsys, "export", str(run_dir), "--which", "last", "--out", str(tmp_path / "ema"))
    assert again.returncode == 0  # an earlier export is replaced


def test_a_run_can_skip_the_best_copy_and_one_without_ema_says_so(tmp_path, capsys):
    run(load_config(None, [*RUN, "optim.ema_decay=null", "runtime.save_best=false", f"runtime.output={tmp_path}"]))
    run_dir = tmp_path / "exp"
    assert not (run_dir / BEST).exists() and not (run_dir / "export" / "best").exists()
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["last"]
    result = run_main(capsys, "export", str(run_dir), "--which", "ema", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "has no EMA weights (optim.ema_decay was not set)" in result.stderr
    result = run_main(capsys, "export", str(run_dir), "--which", "best", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "holds no best checkpoint (runtime.save_best false" in result.stderr


def test_the_exported_data_config_is_the_runs_own_preprocessing(tmp_path):
    """What timm rebuilds from config.json: files through timm's eval transform (ImageNet's statistics, crop
    0.875), in-memory float data by the statistics it was normalised with (digits: 0.5), no crop."""
    from helpers import write_smooth_folder

    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets
    from pfb_train.data.splits import timm_data_config

    digits = timm_data_config(build_datasets(DataConfig(dataset="digits", img_size=16)), 3, 16)
    assert (digits["mean"], digits["std"], digits["crop_pct"]) == ((0.5,) * 3, (0.5,) * 3, 1.0)
    write_smooth_folder(tmp_path, per_class=2)
    files = timm_data_config(build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=24)), 3, 24)
    assert (files["mean"], files["crop_pct"], files["input_size"]) == (
        timm.data.IMAGENET_DEFAULT_MEAN,
        0.875,
        (3, 24, 24),
    )
