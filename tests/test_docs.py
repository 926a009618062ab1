"""The documentation cannot go stale where code can say what it must hold: the config reference
(docs/configuration.md) names every key of config.py with its default, and the README stays short."""

import re
from pathlib import Path

import yaml

from pfb_train.config import Config, flatten

ROOT = Path(__file__).resolve().parents[1]


def reference_rows() -> dict:
    """{key: documented default} from the table of docs/configuration.md: a row names one or more keys
    in backticks and their defaults in the same order (one default for all of them, or one each)."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        if len(defaults) == 1:
            defaults *= len(keys)
        rows.update(zip(keys, defaults if len(defaults) == len(keys) else [None] * len(keys)))
    return rows


def as_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-5 as a string
        except ValueError:
            return value
    return value


def test_the_config_reference_names_every_key_with_its_default():
    documented = reference_rows()
    defaults = {k: v for k, v in flatten(Config().to_dict()).items() if not k.startswith("blocking.")}
    defaults.update({f"blocking.{k}": getattr(Config().blocking, k) for k in ("method", "stage", "mode")})
    missing = sorted(set(defaults) - set(documented))
    assert not missing, f"keys of config.py missing from docs/configuration.md: {missing}"
    stale = sorted(k for k in documented if k not in defaults and not k.startswith("blocking.<"))
    assert not stale, f"docs/configuration.md documents keys config.py does not have: {stale}"
    wrong = {k: (documented[k], v) for k, v in defaults.items() if as_value(documented[k]) != v}
    assert not wrong, f"documented defaults that differ from config.py's (documented, actual): {wrong}"


def test_the_readme_fits_on_a_few_screens_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for doc in ["README.md", *[f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")]]:
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (ROOT / doc).parent.joinpath(target).exists(), f"{doc} links to {target}, which is not there"
