"""The dependency floors setup.cfg declares are at least the releases that brought the APIs the code calls."""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# An API the package calls -> (distribution, the first release that has it, where that is stated).
LATE_APIS = {
    "torch.nn.utils.get_total_norm": ("torch", "2.6", "torch 2.6 release notes: get_total_norm, clip_grads_with_norm_"),
    "clip_grads_with_norm_": ("torch", "2.6", "torch 2.6 release notes"),
    "fp32_precision": ("torch", "2.9", "torch 2.9 CUDA notes: the fp32_precision TF32 settings"),
    "recompile_limit": ("torch", "2.6", "torch._dynamo.config.recompile_limit (was cache_size_limit)"),
    "list_optimizers": ("timm", "1.0.12", "timm 1.0.12: optimizer registry, list_optimizers"),
}
PAIRED = {"2.9": "0.24"}  # torch -> the torchvision built with it


def version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def declared_floors() -> dict:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    floors = {}
    for line in parser["options"]["install_requires"].split("\n"):
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", line)
        if match:
            floors[match.group(1)] = match.group(2)
    return floors


def package_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "pfb_train").rglob("*.py"))


def test_floors_cover_every_late_api_the_code_calls():
    floors, source = declared_floors(), package_source()
    used = [api for api in LATE_APIS if api.split(".")[-1] in source]
    assert "fp32_precision" in used and "torch.nn.utils.get_total_norm" in used  # the table reads the real code
    for api in used:
        dist, first, where = LATE_APIS[api]
        assert dist in floors, f"setup.cfg declares no floor for {dist}"
        assert version(floors[dist]) >= version(first), (
            f"{api} needs {dist}>={first} ({where}); setup.cfg says >={floors[dist]}"
        )


def test_torchvision_floor_pairs_with_the_torch_floor():
    floors = declared_floors()
    assert version(floors["torchvision"]) >= version(PAIRED[floors["torch"]])
