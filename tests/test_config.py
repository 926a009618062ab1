import pytest
import yaml

from pfb_train.config import Config, load_config, resolve_config_path, save_config
from pfb_train.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "blocking: {method: pfb}\n"),
                      ["blocking.ratio=0.3", "schedule.epochs=7", "optim.lr=1e-3", "blocking.stage=layer2",
                       "runtime.channels_last=true", "model.num_classes=null"])
    assert cfg.blocking.ratio == 0.3 and cfg.schedule.epochs == 7
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-3  # "1e-3" is a YAML string: coerced
    assert cfg.blocking.stage == "layer2" and cfg.runtime.channels_last is True
    assert cfg.model.num_classes is None
    assert cfg.data.batch_size == Config().data.batch_size


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path):
    assert load_config(write(tmp_path, "optim: {lr: 1}\n")).optim.lr == 1.0
    with pytest.raises(UserError, match="'schedule.epochs': expected int, got True"):
        load_config(write(tmp_path, "schedule: {epochs: true}\n"))


@pytest.mark.parametrize("text,overrides,message", [
    ("blocking: {ratoi: 0.4}\n", [], "unknown config key 'blocking.ratoi' (did you mean 'blocking.ratio'?)"),
    ("modle: {name: resnet18}\n", [], "unknown config key 'modle' (did you mean 'model'?)"),
    ("", ["data.batchsize=3"], "unknown config key 'data.batchsize' (did you mean 'data.batch_size'?)"),
    ("", ["blocking.ratio=abc"], "config key 'blocking.ratio': expected float, got 'abc'"),
    ("", ["blocking.method=pfbb"], "config key 'blocking.method': expected one of 'none', 'random', 'pfb'"),
    ("", ["blocking.ratio=1.0"], "'blocking.ratio' must be in [0, 1)"),
    ("", ["blocking.ratio=-0.1"], "'blocking.ratio' must be in [0, 1)"),
    ("", ["blocking=3"], "'blocking' is a section"),
    ("", ["ratio"], "--set expects key=value"),
    ("blocking: 3\n", [], "config section 'blocking' must be a mapping"),
    ("- a\n- b\n", [], "must hold a mapping of sections"),
    ("model: {name: [unclosed\n", [], "is not valid YAML"),
    ("", ["data.dataset=imagefolder"], "'data.root' is required for dataset 'imagefolder'"),
    ("", ["blocking.method=pfb", "data.batch_size=16", "blocking.centers=32"], "must be >= 'blocking.centers'"),
    ("", ["blocking.start_epoch=10", "blocking.end_epoch=5"], "must be greater than 'blocking.start_epoch'"),
])
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
    cfg = load_config("demo", ["blocking.ratio=0.3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["blocking"]["ratio"] == 0.3


def test_base_key_merges_recipe_and_variant(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: full\nblocking: {method: none, ratio: 0.4, centers: 16}\n"
                                          "schedule: {epochs: 7}\n")
    (tmp_path / "variant.yaml").write_text("base: recipe.yaml\nname: pfb30\nblocking: {method: pfb, ratio: 0.3}\n")
    cfg = load_config(str(tmp_path / "variant.yaml"))
    assert cfg.name == "pfb30" and cfg.blocking.method == "pfb" and cfg.blocking.ratio == 0.3
    assert cfg.blocking.centers == 16 and cfg.schedule.epochs == 7  # kept from the recipe


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
    assert (pfb.blocking.method, pfb.blocking.ratio, pfb.name) == ("pfb", 0.4, "resnet50_pfb40")
    assert pfb.optim == full.optim and pfb.schedule == full.schedule and pfb.data == full.data
    swin = load_config("swin_tiny_pfb40")
    assert (swin.blocking.start_epoch, swin.blocking.end_epoch, swin.schedule.epochs) == (16, 260, 300)
    assert swin.optim.ema_decay and swin.data.mixup > 0 and swin.optim.clip_grad
