import pytest
import yaml

from pfb_train.config import Config, load_config, resolve_config_path, save_config
from pfb_train.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, "blocking: {method: pfb}\n"),
        [
            "blocking.pfb.ratio=0.3",
            "schedule.epochs=7",
            "optim.lr=1e-3",
            "blocking.stage=layer2",
            "runtime.channels_last=true",
            "model.num_classes=null",
        ],
    )
    assert cfg.blocking.chosen().ratio == 0.3 and cfg.schedule.epochs == 7
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-3  # "1e-3" is a YAML string: coerced
    assert cfg.blocking.stage == "layer2" and cfg.runtime.channels_last is True
    assert cfg.model.num_classes is None
    assert cfg.data.batch_size == Config().data.batch_size


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path):
    assert load_config(write(tmp_path, "optim: {lr: 1}\n")).optim.lr == 1.0
    with pytest.raises(UserError, match="'schedule.epochs': expected int, got True"):
        load_config(write(tmp_path, "schedule: {epochs: true}\n"))


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        (
            "blocking: {pfb: {ratoi: 0.4}}\n",
            [],
            "config key 'blocking.pfb.ratoi' is not an option of method 'pfb' (did you mean 'blocking.pfb.ratio'? "
            "its options: ratio,",
        ),
        ("blocking: {metod: pfb}\n", [], "unknown config key 'blocking.metod' (did you mean 'blocking.method'?)"),
        (
            "",
            ["blocking.random.centres=3"],
            "config key 'blocking.random.centres' is not an option of method 'random' "
            "(its options: ratio, start_epoch, end_epoch, ramp)",
        ),
        ("blocking: {pfb: 3}\n", [], "config section 'blocking.pfb' must be a mapping of method 'pfb' options"),
        ("", ["blocking.pfb=3"], "--set blocking.pfb: give one option of method 'pfb', e.g. blocking.pfb.ratio="),
        ("modle: {name: resnet18}\n", [], "unknown config key 'modle' (did you mean 'model'?)"),
        ("", ["data.batchsize=3"], "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)"),
        ("", ["blocking.pfb.ratio=abc"], "config key 'blocking.pfb.ratio': expected float, got 'abc'"),
        ("", ["blocking.method=pfbb"], "unknown blocking.method 'pfbb'; choose one of: none, random, pfb, infobatch"),
        ("", ["blocking.method=pfb", "blocking.pfb.ratio=1.0"], "'blocking.pfb.ratio' must be in [0, 1)"),
        (
            "",
            [
                "blocking.method=random",
                "blocking.pfb.ratio=-0.1",
                "blocking.random.ratio=-0.1",
                "blocking.infobatch.prune_ratio=-0.1",
                "blocking.static_random.drop_fraction=-0.1",
            ],
            "'blocking.random.ratio' must be in [0, 1)",
        ),
        (
            "",
            ["blocking.method=infobatch", "blocking.infobatch.prune_ratio=1"],
            "'blocking.infobatch.prune_ratio' must be",
        ),
        ("", ["blocking=3"], "'blocking' is a section"),
        ("", ["ratio"], "--set expects key=value"),
        ("blocking: 3\n", [], "config section 'blocking' must be a mapping"),
        ("- a\n- b\n", [], "must hold a mapping of sections"),
        ("model: {name: [unclosed\n", [], "is not valid YAML"),
        ("", ["data.dataset=imagefolder"], "'data.root' is required for dataset 'imagefolder'"),
        ("", ["model.num_classes=-1"], "config key 'model.num_classes' must be >= 1 (or null: the data set's), got -1"),
        (
            "",
            ["blocking.method=pfb", "data.batch_size=16", "blocking.pfb.centres=32"],
            "must be >= 'blocking.pfb.centres'",
        ),
        (
            "",
            ["blocking.method=pfb", "data.batch_size=16", "blocking.pfb.centres=32"],
            "must be >= 'blocking.pfb.centres'",
        ),
        (
            "",
            ["blocking.method=random", "blocking.random.start_epoch=10", "blocking.random.end_epoch=5"],
            "must be greater than 'blocking.random.start_epoch'",
        ),
    ],
)
def test_bad_config_is_one_line_user_error(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bare_name_resolves_to_shipped_configs():
    assert resolve_config_path("demo").name == "demo.yaml"
    assert resolve_config_path("demo.yaml").parent.name == "configs"
    with pytest.raises(UserError, match="config file not found: nope.yaml; shipped configs: .*demo"):
        resolve_config_path("nope.yaml")


def test_shipped_configs_load():
    from pfb_train.config import SHIPPED_CONFIGS

    for path in SHIPPED_CONFIGS.glob("*.yaml"):
        load_config(str(path))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["blocking.pfb.ratio=0.3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["blocking"]["pfb"]["ratio"] == 0.3


def test_base_key_merges_recipe_and_variant(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "name: full\nblocking: {method: none, pfb: {ratio: 0.4, centres: 16}}\nschedule: {epochs: 7}\n"
    )
    (tmp_path / "variant.yaml").write_text(
        "base: recipe.yaml\nname: pfb30\nblocking: {method: pfb, pfb: {ratio: 0.3}}\n"
    )
    cfg = load_config(str(tmp_path / "variant.yaml"))
    assert cfg.name == "pfb30" and cfg.blocking.method == "pfb" and cfg.blocking.chosen().ratio == 0.3
    assert cfg.blocking.chosen().centres == 16 and cfg.schedule.epochs == 7  # kept from the recipe


def test_base_loop_and_missing_base_are_user_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="config file not found: nowhere.yaml"):
        load_config(str(tmp_path / "c.yaml"))


def test_shipped_paper_variants_differ_from_their_recipe_only_where_stated():
    full, pfb = load_config("resnet50_imagenet"), load_config("resnet50_pfb40")
    assert (pfb.blocking.method, pfb.blocking.chosen().ratio, pfb.name) == ("pfb", 0.4, "resnet50_pfb40")
    assert pfb.optim == full.optim and pfb.schedule == full.schedule and pfb.data == full.data
    swin = load_config("swin_tiny_pfb40")
    window = swin.blocking.chosen()
    assert (window.start_epoch, window.end_epoch, swin.schedule.epochs) == (16, 260, 300)
    assert swin.optim.ema_decay and swin.data.mixup > 0 and swin.optim.clip_grad


def test_flat_blocking_keys_of_earlier_versions_are_one_line_naming_where_they_moved(tmp_path, upgrade_run_logs):
    """A config of the versions before method sections is refused, naming the sections its keys moved to;
    scripts/upgrade_run_logs.py rewrites a stored one into them: each flat key to every method that reads
    it, a section's own value winning over a flat key in the same file."""
    import yaml

    old = "blocking: {method: pfb, ratio: 0.3, centers: 16, ema: 0.2, weights: uniform, delta: 0.5, start_epoch: 2}\n"
    with pytest.raises(
        UserError,
        match=r"'blocking.ratio' is a flat key of an earlier version: .*\(blocking.pfb.ratio, "
        r"blocking.random.ratio, blocking.infobatch.prune_ratio, blocking.static_random.drop_fraction\)",
    ):
        load_config(write(tmp_path, old))
    with pytest.raises(UserError, match=r"'blocking.centers' is a flat key .*\(blocking.pfb.centres\)"):
        load_config(None, ["blocking.centers=16"])
    upgraded = {"blocking": upgrade_run_logs.upgrade_blocking(yaml.safe_load(old)["blocking"])}
    cfg = load_config(write(tmp_path, yaml.safe_dump(upgraded)))
    pfb, options = cfg.blocking.chosen(), cfg.blocking.options
    assert (pfb.ratio, pfb.centres, pfb.update_rate, pfb.centre_weights, pfb.start_epoch) == (
        0.3,
        16,
        0.2,
        "uniform",
        2,
    )
    assert options["random"].ratio == 0.3 and options["random"].start_epoch == 2
    assert options["infobatch"].prune_ratio == 0.3 and options["infobatch"].delta == 0.5
    assert options["static_random"].drop_fraction == 0.3
    assert pfb.stratify == "none" and pfb.score_scale == 1.0  # as runs of that version ranked
    both = upgrade_run_logs.upgrade_blocking({"method": "pfb", "ratio": 0.3, "pfb": {"ratio": 0.2}})
    assert both["pfb"]["ratio"] == 0.2


def test_sections_of_other_methods_are_kept_but_do_nothing(tmp_path):
    text = "blocking: {method: random, random: {ratio: 0.2}, pfb: {ratio: 0.5, centres: 999}}\n"
    cfg = load_config(write(tmp_path, text))  # pfb's centres > batch size: not checked, pfb does not run
    assert cfg.blocking.chosen().ratio == 0.2 and cfg.blocking.options["pfb"].centres == 999
    assert list(cfg.to_dict(chosen_only=True)["blocking"]) == ["method", "stage", "mode", "random"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.name=plateau", "'plateau' steps once per epoch"),
        ("schedule.name=cosin", "did you mean 'cosine'"),
        ("optim.name=sgdd", "unknown timm optimizer 'sgdd' (did you mean 'sgd'"),
        ("data.auto_augment=randm9", "'randm9' is not a timm augmentation policy"),
        (
            "blocking.ratio=1.5",
            "config key 'blocking.ratio' is a flat key of an earlier version: each method's options now live in its "
            "own section (blocking.pfb.ratio, blocking.random.ratio, blocking.infobatch.prune_ratio, "
            "blocking.static_random.drop_fraction)",
        ),
        (
            "blocking.pfb.ratio=1.5",
            "'blocking.pfb.ratio' must be in [0, 1), got 1.5 (method 'pfb' reads it; blocking.method is 'none')",
        ),
        ("blocking.infobatch.delta=2", "'blocking.infobatch.delta' must be in (0, 1]"),
    ],
)
def test_values_no_part_of_the_run_can_take_are_one_line_before_any_work(override, message):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)
