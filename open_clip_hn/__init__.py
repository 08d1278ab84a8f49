"""open_clip_hn: hard-negative contrastive training as a set of flags on OpenCLIP's own trainer.

Importing the package is cheap (no torch, no OpenCLIP): `install()` loads the hooks on demand,
so the pure-Python parts (e.g. `open_clip_hn.negatives`) stay fast to import in loader workers.
"""

import importlib

__version__ = "0.1.0"

# the library API, imported when first used (PEP 562), so `import open_clip_hn` stays cheap
_EXPORTS = {"HNConfig": ".config", "HardNegativeLoss": ".objective", "PackedOutputs": ".packing",
            "register_term": ".terms", "LoggedValue": ".terms", "NegativeGenerator": ".negatives",
            "MemoryBank": ".memory_bank"}
__all__ = ["install", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def install() -> None:
    """Install the plugin's hooks into `open_clip_train.main` (idempotent).

    Call this before `open_clip_train.main.main(argv)` in your own launcher; the `--hn-*`
    flags are then accepted and, when given, change the data, the loss and the checkpoints.
    """
    from .hooks import install as _install

    _install()
