"""open_clip_hn: hard-negative contrastive training as a set of flags on OpenCLIP's own trainer.

Importing the package is cheap (no torch, no OpenCLIP): `install()` loads the hooks on demand,
so the pure-Python parts (e.g. `open_clip_hn.negatives`) stay fast to import in loader workers.
"""

__version__ = "0.1.0"


def install() -> None:
    """Install the plugin's hooks into `open_clip_train.main` (idempotent).

    Call this before `open_clip_train.main.main(argv)` in your own launcher; the `--hn-*`
    flags are then accepted and, when given, change the data, the loss and the checkpoints.
    """
    from .hooks import install as _install

    _install()
