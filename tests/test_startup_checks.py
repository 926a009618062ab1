"""What a run refuses before it trains (one line, exit 2), and what it stops on when an epoch trains nothing:
sizes that would train no step or that BatchNorm cannot train on, settings this machine cannot run."""

import math

import pytest

from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.errors import TrainingStopped, UserError
from pfb_train.selection.static_random import StaticRandomSelector
from pfb_train.train import fit, run, setup
from helpers import SMALL_CPU_RUN

TINY = [
    *SMALL_CPU_RUN,
    "model.name=test_resnet",
    "data.img_size=32",
    "data.batch_size=32",
    "data.train_samples=64",
    "data.val_samples=16",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
]


def start(tmp_path, *overrides, dist=None):
    return setup(load_config(None, [*TINY, f"runtime.output={tmp_path}", *overrides]), dist or DistInfo())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["blocking.method=static_random", "blocking.static_random.drop_fraction=0.9"],
            "config key 'blocking.static_random.drop_fraction' 0.9 can leave an epoch 6 of the 64 training samples, fewer "
            "than one global batch (data.batch_size 32 x 1 process(es)): such an epoch trains no step",
        ),
        (
            ["blocking.method=infobatch", "blocking.infobatch.prune_ratio=0.5", "data.train_samples=40"],
            "config key 'blocking.infobatch.prune_ratio' 0.5 can leave an epoch 20 of the 40 training samples",
        ),
    ],
)
def test_a_subset_smaller_than_one_global_batch_is_refused_at_start_up(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        start(tmp_path, *overrides)
    assert not any(tmp_path.iterdir())  # refused before the run directory is made


def test_an_epoch_that_trains_no_step_stops_the_run(tmp_path, monkeypatch):
    """What the start-up check cannot know (a plug-in method's subset, a loss-drawn one) stops with one line at
    the end of the first epoch without a step, instead of 'done' after epochs that trained nothing."""
    with monkeypatch.context() as patch:  # at start-up, as a method that cannot say
        patch.setattr(StaticRandomSelector, "fewest_samples", lambda self, n: n)
        state = start(tmp_path, "blocking.method=static_random", "blocking.static_random.drop_fraction=0.9")
    with pytest.raises(
        TrainingStopped,
        match=r"epoch 0 trained no step: 'static_random' left 6 of the 64 training "
        r"samples in it, fewer than one global batch",
    ):
        fit(state)
    assert not (state.run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["blocking.method=random", "blocking.random.ratio=0.9", "data.batch_size=10"],
            "config key 'blocking.random.ratio' keeps 1 row of each batch of data.batch_size 10: BatchNorm layer "
            "'layer4.0.bn1' of 'test_resnet' sees one value per channel per image at data.img_size 32 px",
        ),
        (["data.batch_size=1"], "config key 'data.batch_size' is 1: BatchNorm layer 'layer4.0.bn1'"),
        (
            [
                "blocking.method=pfb",
                "blocking.pfb.ratio=0.5",
                "blocking.pfb.centres=2",
                "data.batch_size=2",
                "blocking.mode=recompute",
            ],
            "config key 'blocking.pfb.ratio' keeps 1 row of each batch of data.batch_size 2",
        ),
    ],
)
def test_a_row_count_batchnorm_cannot_train_on_is_refused(tmp_path, overrides, message):
    """PyTorch's BatchNorm raises in training on one value per channel, which a 1-pixel feature map gets from
    one row: a ratio (or a batch size) the config accepts must train, so it is refused before any step."""
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        start(tmp_path, *overrides)


def test_one_kept_row_trains_where_batchnorm_sees_a_feature_map(tmp_path):
    state = start(
        tmp_path,
        "blocking.method=random",
        "blocking.random.ratio=0.9",
        "data.batch_size=10",
        "data.img_size=64",
        "schedule.epochs=1",
    )
    assert fit(state)["blocked_fraction"] == pytest.approx(0.9)


def test_sync_bn_on_the_cpu_is_one_line_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no-such-folder"  # the data would fail too: the key's error comes first
    with pytest.raises(UserError, match=r"config key 'runtime.sync_bn' needs CUDA devices .*set runtime.sync_bn=false"):
        start(
            tmp_path,
            "runtime.sync_bn=true",
            "data.dataset=imagefolder",
            f"data.root={missing}",
            "data.train_samples=null",
            "data.val_samples=null",
            dist=DistInfo(rank=0, world_size=2),
        )


def test_a_warmup_as_long_as_the_run_is_noted(tmp_path, capsys):
    start(tmp_path, "schedule.warmup_epochs=2")
    assert (
        "note: schedule.warmup_epochs 2 is not below schedule.epochs 2: the whole run is warm-up"
        in capsys.readouterr().out
    )


def test_an_optimizer_timm_lists_but_cannot_make_here_is_one_line(tmp_path):
    cfg = load_config(
        None,
        [
            "model.name=test_resnet",
            "data.img_size=16",
            "data.train_samples=32",
            "data.val_samples=16",
            "data.batch_size=16",
            "runtime.device=cpu",
            "runtime.progress=false",
            "optim.name=bnbadam",
            f"runtime.output={tmp_path}",
        ],
    )
    with pytest.raises(UserError, match=r"config key 'optim.name': timm cannot make optimizer 'bnbadam' here"):
        run(cfg)
    assert not any(tmp_path.iterdir())  # before the run directory


def test_a_fixed_size_model_is_built_at_the_configured_size_or_refused_before_the_run_directory(tmp_path):
    tiny = [
        "model.name=vit_tiny_patch16_224",
        "data.dataset=synthetic",
        "data.train_samples=32",
        "data.val_samples=16",
        "data.batch_size=16",
        "data.workers=0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "runtime.progress=false",
        "runtime.device=cpu",
        f"runtime.output={tmp_path}",
    ]
    summary = run(load_config(None, [*tiny, "data.img_size=32", "name=vit32"]))  # timm's default is 224 px
    assert summary["epochs"] == 1 and math.isfinite(summary["top1"])
    with pytest.raises(UserError, match=r"does not run on data.img_size 8 px .*its default is 224"):
        run(load_config(None, [*tiny, "data.img_size=8", "name=vit8"]))
    assert not (tmp_path / "vit8").exists()


def test_lr_base_scales_the_lr_with_the_global_batch(tmp_path, capsys):
    """optim.lr_base is per lr_base_size samples of the global batch (timm's --lr-base); optim.lr is not read."""
    from pfb_train.config import load_config
    from pfb_train.distributed import DistInfo
    from pfb_train.train import setup

    cfg = load_config(None, [*TINY, "optim.lr=5", "optim.lr_base=0.2", f"runtime.output={tmp_path}"])
    state = setup(cfg, DistInfo())
    assert state.optimization.optimizer.defaults["lr"] == pytest.approx(0.2 * 32 / 256)  # batch 32, one process
    assert "note: LR 0.025: optim.lr_base 0.2 per 256 samples x global batch 32" in capsys.readouterr().out
