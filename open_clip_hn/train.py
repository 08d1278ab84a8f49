"""`python -m open_clip_hn.train`: OpenCLIP's own trainer with the plugin's hooks installed.

Takes every flag of `python -m open_clip_train.main` plus the `--hn-*` flags; without any
`--hn-*` flag the run is exactly OpenCLIP's.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    """Install the hooks and run `open_clip_train.main.main(argv)` (returns what it returns).
    A plugin state that cannot be used (`StateError`: damaged, foreign, non-finite, or a resume
    without the flags it needs), a word list or plausibility model that cannot be built from
    the given captions, and an input found unusable once OpenCLIP has set up the run
    (`InputError`: precomputed shards, evaluation sets) end the run as `error: ...` with exit
    status 2, before the first step, as does a run whose weights diverged (`TrainingDiverged`,
    before the checkpoint that would hold them) or whose checkpoint could not be written
    (`CheckpointWriteError`: a full disk); the error goes to OpenCLIP's log too, and names the
    experiment folder OpenCLIP made for the run, which blocks its --name until removed."""
    import logging

    from .argtypes import InputError
    from .hooks import made_experiment_folder, run_openclip_main
    from .negatives.lexicon import VocabularyError
    from .negatives.plausibility import PlausibilityError
    from .run import TrainingDiverged
    from .state import CheckpointWriteError, StateError

    try:
        return run_openclip_main(sys.argv[1:] if argv is None else list(argv))
    except (StateError, VocabularyError, PlausibilityError, InputError, TrainingDiverged,
            CheckpointWriteError) as err:
        folder = None if isinstance(err, (TrainingDiverged, CheckpointWriteError)) else made_experiment_folder()
        message = f"error: {err}" + (f" (OpenCLIP made the run's folder {folder} before this check, "
                                     "and refuses its --name while it exists: remove the folder or "
                                     "pass another --name)" if folder else "")
        print(message, file=sys.stderr)
        record = logging.makeLogRecord({"msg": message, "levelno": logging.ERROR, "levelname": "ERROR"})
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):  # the run's out.log, once OpenCLIP set it up
                handler.handle(record)
        sys.exit(2)


def cli() -> None:
    """Console script `open-clip-hn-train`."""
    result = main()
    sys.exit(1 if result == -1 else 0)


if __name__ == "__main__":
    cli()
