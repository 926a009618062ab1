"""pfb-train: train timm image classifiers with Partial Forward Blocking.

The public API, for a training loop of one's own (docs/methods.md: "PFB in your own training loop"):
`Blocking` (a split model plus a selection method: forward, loss, observe), `BlockedBatch`,
`split_model` / `BlockedModel`, the method registry (`methods`, `register`, `Method`,
`Selector`) and `UserError`. Names load on first use, so the CLI starts without torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Blocking": "pfb_train.blocking",
    "BlockedBatch": "pfb_train.blocking",
    "BlockedModel": "pfb_train.models",
    "split_model": "pfb_train.models",
    "Method": "pfb_train.selection",
    "Selector": "pfb_train.selection",
    "methods": "pfb_train.selection",
    "register": "pfb_train.selection",
    "build_selector": "pfb_train.selection",
    "UserError": "pfb_train.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pfb_train' has no attribute {name!r}")
    import importlib  # here, with the lookup: importing the package loads nothing (CLI start-up)

    return getattr(importlib.import_module(_EXPORTS[name]), name)
