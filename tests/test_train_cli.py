import json

import pytest
import torch
import yaml

from pfb_train.config import load_config
from pfb_train.run_dir import read_metrics
from pfb_train.train import run

from helpers import TINY_YAML as TINY, run_main


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_cli_two_epoch_run_writes_run_directory(capsys, tiny_config, tmp_path):
    result = run_main(capsys, "--config", str(tiny_config), "--set", f"runtime.output={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "tiny"
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["kept_fraction"] == 1.0  # before start_epoch: full batches
    assert records[1]["kept_fraction"] == pytest.approx(1 - 0.25)  # inside the window
    assert records[1]["samples_blocked"] == 128 * 0.25
    for key in (
        "lr",
        "train_loss",
        "top1",
        "top5",
        "samples_seen",
        "epoch_seconds",
        "data_seconds",
        "shallow_seconds",
        "deep_seconds",
        "images_per_second",
    ):
        assert key in records[1], key
    assert records[1]["shallow_seconds"] > 0 and records[1]["deep_seconds"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["blocked_fraction"] == pytest.approx(32 / 256)
    assert summary["top1"] == records[-1]["top1"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["blocking"]["pfb"]["ratio"] == 0.25
    assert list(run_dir.glob("events.out.tfevents.*"))
    state = torch.load(run_dir / "checkpoint-last.pt", weights_only=False)
    assert state["epoch"] == 2 and state["selector"]["centres"].shape == (16, 16)  # epochs completed
    assert "top-1" in result.stdout and "blocked 0.125" in result.stdout and "s/epoch" in result.stdout
    # a second run with the same name never overwrites the first
    again = run_main(
        capsys,
        "--config",
        str(tiny_config),
        "--set",
        f"runtime.output={tmp_path / 'runs'}",
        "--set",
        "schedule.epochs=1",
        "--set",
        "blocking.pfb.start_epoch=0",
        "--set",
        "blocking.random.start_epoch=0",
    )
    assert again.returncode == 0 and (tmp_path / "runs" / "tiny-2" / "metrics.jsonl").exists()
    assert len(read_metrics(run_dir)) == 2


@pytest.mark.parametrize(
    "method,mode", [("none", "reuse"), ("random", "reuse"), ("pfb", "reuse"), ("pfb", "recompute")]
)
def test_methods_train_and_learn(tiny_config, tmp_path, method, mode):
    cfg = load_config(
        str(tiny_config),
        [
            f"blocking.method={method}",
            f"blocking.mode={mode}",
            f"runtime.output={tmp_path}",
            "schedule.epochs=3",
            "blocking.pfb.start_epoch=0",
            "blocking.random.start_epoch=0",
        ],
    )
    summary = run(cfg)
    expected = 0.0 if method == "none" else 0.25
    assert summary["blocked_fraction"] == pytest.approx(expected)
    records = read_metrics(summary["run_dir"])
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_bf16_autocast_run_on_cpu(tiny_config, tmp_path):
    """Autocast reaches the selection; density math must stay float32 and the run must learn."""
    cfg = load_config(
        str(tiny_config),
        [
            f"runtime.output={tmp_path}",
            "runtime.amp=bf16",
            "schedule.epochs=3",
            "blocking.pfb.start_epoch=0",
            "blocking.random.start_epoch=0",
            "runtime.channels_last=true",
        ],
    )
    summary = run(cfg)
    records = read_metrics(summary["run_dir"])
    assert summary["blocked_fraction"] == pytest.approx(0.25)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    state = torch.load(f"{summary['run_dir']}/checkpoint-last.pt", weights_only=False)
    assert state["selector"]["centres"].dtype == torch.float32


def test_seeded_runs_are_reproducible(tiny_config, tmp_path):
    cfg = load_config(str(tiny_config), [f"runtime.output={tmp_path}"])
    a, b = run(cfg), run(cfg)
    ra, rb = read_metrics(a["run_dir"]), read_metrics(b["run_dir"])
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    sa = torch.load(f"{a['run_dir']}/checkpoint-last.pt", weights_only=False)
    sb = torch.load(f"{b['run_dir']}/checkpoint-last.pt", weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert torch.equal(sa["selector"]["centres"], sb["selector"]["centres"])


# (arguments, words the one-line message must contain, files to create first); {tmp} is a scratch folder
BAD_INPUTS = [
    (["--config", "/no/such/file.yaml"], "config file not found: /no/such/file.yaml", {}),
    (["--config", "{tmp}/broken.yaml"], "is not valid YAML", {"broken.yaml": "model: {name: [resnet18\n"}),
    (["--config", "{tmp}/list.yaml"], "must hold a mapping of sections", {"list.yaml": "- 1\n- 2\n"}),
    (["--config", "{tmp}/looped.yaml"], "loops back", {"looped.yaml": "base: looped.yaml\n"}),
    (["--config", "demo", "--set", "blocking.pfb.ratoi=0.3"], "did you mean 'blocking.pfb.ratio'", {}),
    (["--config", "demo", "--set", "modle.name=resnet18"], "did you mean 'model'", {}),
    (["--config", "demo", "--set", "schedule.epochs=ten"], "'schedule.epochs': expected int, got 'ten'", {}),
    (["--config", "demo", "--set", "schedule.epochs=0"], "'schedule.epochs' must be >= 1", {}),
    (
        [
            "--config",
            "demo",
            "--set",
            "blocking.pfb.ratio=1.5",
            "--set",
            "blocking.random.ratio=1.5",
            "--set",
            "blocking.infobatch.prune_ratio=1.5",
            "--set",
            "blocking.static_random.drop_fraction=1.5",
        ],
        "'blocking.pfb.ratio' must be in [0, 1)",
        {},
    ),
    (
        ["--config", "demo", "--set", "blocking.method=pfb2"],
        "unknown blocking.method 'pfb2'; choose one of: none, random, pfb",
        {},
    ),
    (["--config", "demo", "--set", "data.batch_size=16"], "must be >= 'blocking.pfb.centres' (32)", {}),
    (["--config", "demo", "--set", "data.mixup=0.2", "--set", "data.batch_size=33"], "even 'data.batch_size'", {}),
    (
        [
            "--config",
            "demo",
            "--set",
            "blocking.stage=5",
            "--set",
            "blocking.pfb.start_epoch=0",
            "--set",
            "blocking.random.start_epoch=0",
        ],
        "invalid blocking.stage 5; choose one of: 1 (layer1), 2 (layer2), 3 (layer3)",
        {},
    ),
    (["--config", "demo", "--set", "blocking.stage=layer9"], "invalid blocking.stage 'layer9'", {}),
    (["--config", "demo", "--set", "model.name=resnet_nope"], "unknown timm model 'resnet_nope'", {}),
    (["--config", "demo", "--set", "model.name=levit_128s"], "cannot split model 'levit_128s'", {}),
    (
        ["--config", "demo", "--set", "model.name=convnext_atto", "--set", "model.cifar_stem=true"],
        "'model.cifar_stem' applies to ResNets",
        {},
    ),
    (
        ["--config", "demo", "--set", "data.dataset=imagefolder", "--set", "data.root=/no/such/dir"],
        "data.root does not exist: /no/such/dir",
        {},
    ),
    (
        ["--config", "demo", "--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/nofolders"],
        "dataset folder not found",
        {"nofolders/readme.txt": "x"},
    ),
    (
        ["--config", "demo", "--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/d"],
        "holds no images",
        {"d/train/a/x.png": "x", "d/train/b/notes.txt": "x", "d/val/a/x.png": "x"},
    ),
    (["--config", "demo", "--set", "data.dataset=cifar10", "--set", "data.root={tmp}"], "cifar10 files not found", {}),
    (
        ["--config", "demo", "--set", "data.dataset=fashion_mnist", "--set", "data.root={tmp}"],
        "fashion_mnist file not found",
        {},
    ),
    (
        ["--config", "demo", "--set", "data.dataset=fashion_mnist", "--set", "data.root={tmp}"],
        "cannot read idx file",
        {
            n: "not an idx file"
            for n in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        },
    ),
    (
        ["--config", "demo", "--set", "data.train_samples=5000"],
        "'data.train_samples' is 5000, but the split has 1438",
        {},
    ),
    (["--config", "demo", "--set", "data.imbalance=0"], "'data.imbalance' must be in (0, 1]", {}),
    (["--config", "demo", "--set", "data.rare_classes=[1,2]"], "'data.rare_classes' needs data.imbalance < 1", {}),
    (
        ["--config", "demo", "--set", "data.imbalance=0.1", "--set", "data.rare_classes=[3,12]"],
        "'data.rare_classes' names [12], not classes of a 10-class set (0 to 9)",
        {},
    ),
    (
        ["--config", "demo", "--set", "data.rare_classes=three"],
        "'data.rare_classes': expected a list of int or null",
        {},
    ),
    (
        ["--config", "demo", "--set", "data.imbalance=0.1", "--set", "data.rare_classes=[]"],
        "'data.rare_classes' is an empty list",
        {},
    ),
    (["--config", "demo", "--set", "blocking.pfb.class_memory=0"], "'blocking.pfb.class_memory' must be >= 1", {}),
    (
        [
            "--config",
            "demo",
            "--set",
            "data.dataset=imagefolder",
            "--set",
            "data.root=x",
            "--set",
            "data.val_samples=9",
        ],
        "'data.val_samples' does not apply to dataset 'imagefolder'",
        {},
    ),
    (
        ["--config", "demo", "--set", "blocking.pfb.noise_form=gauss"],
        "'blocking.pfb.noise_form': expected one of 'rank'",
        {},
    ),
    (["--config", "demo", "--set", "runtime.baseline={tmp}/nothing"], "'runtime.baseline': no metrics.jsonl", {}),
    (["--config", "demo", "--resume", "{tmp}/missing.pt"], "cannot resume from", {}),
    (["report", "{tmp}", "--baseline", "{tmp}"], "not a finished run directory", {}),
    (["--set", "a=b"], "the following arguments are required: --config", {}),
]


def _bad_input_args(tmp_path, args, files) -> list:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] != "report":
        args += ["--set", f"runtime.output={tmp_path}/runs"]
    return args


@pytest.mark.parametrize("args,message,files", BAD_INPUTS, ids=[m[:40] for _, m, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, args, message, files):
    """In-process, through the CLI's own entry point (an uncaught exception would fail the test)."""
    from pfb_train.cli import main

    code = main(_bad_input_args(tmp_path, args, files))
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfb-train: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out


@pytest.mark.parametrize("case", [0, 12], ids=["missing config file", "invalid stage"])
def test_bad_input_as_a_real_process(cli, tmp_path, case):
    """The same, as a user runs it: a process's exit code, and nothing else on stderr."""
    args, message, files = BAD_INPUTS[case]
    result = cli(*_bad_input_args(tmp_path, args, files))
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("pfb-train: error: ") and message in line
    ]


def test_ema_is_evaluated_and_checkpointed(tiny_config, tmp_path):
    cfg = load_config(
        str(tiny_config),
        [
            f"runtime.output={tmp_path}",
            "optim.ema_decay=0.5",
            "data.mixup=0.8",
            "data.cutmix=1.0",
            "optim.clip_grad=1.0",
        ],
    )
    summary = run(cfg)
    record = read_metrics(summary["run_dir"])[-1]
    assert 0 <= record["top1_ema"] <= 100 and "top5_ema" in record
    state = torch.load(f"{summary['run_dir']}/checkpoint-last.pt", weights_only=False)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items()}  # ModelEmaV3 wraps the copy
    assert ema.keys() == state["model"].keys()
    assert any(not torch.equal(ema[k], state["model"][k]) for k in ema if ema[k].is_floating_point())


def test_fp16_with_gradient_scaling_on_cpu(tmp_path):
    """The scaler path (scale, unscale for clipping, step, update) runs; GPUs are covered in test_gpu.py."""
    cfg = load_config(
        None,
        [
            "model.name=resnet18",
            "data.dataset=synthetic",
            "data.img_size=16",
            "data.batch_size=16",
            "data.train_samples=32",
            "data.val_samples=16",
            "data.workers=0",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "runtime.progress=false",
            "blocking.method=pfb",
            "blocking.pfb.centres=8",
            "blocking.pfb.start_epoch=0",
            "blocking.random.start_epoch=0",
            "runtime.amp=fp16",
            "optim.clip_grad=1.0",
            f"runtime.output={tmp_path}",
        ],
    )
    summary = run(cfg)
    state = torch.load(f"{summary['run_dir']}/checkpoint-last.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] == 2  # two scaled steps taken
    assert summary["blocked_fraction"] == pytest.approx(6 / 16)
    assert state["selector"]["centres"].dtype == torch.float32


def test_a_run_shorter_than_the_warm_up_trains_on_full_data(capsys, tiny_config, tmp_path):
    """A quick check of a recipe (fewer epochs than blocking.start_epoch) runs, and says it did not block."""
    result = run_main(
        capsys,
        "--config",
        str(tiny_config),
        "--set",
        "schedule.epochs=1",
        "--set",
        "blocking.pfb.start_epoch=3",
        "--set",
        "blocking.random.start_epoch=3",
        "--set",
        f"runtime.output={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert "this run trains on full data" in result.stdout
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["blocked_fraction"] == 0.0
