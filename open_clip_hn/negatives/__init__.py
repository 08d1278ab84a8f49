"""Typed synthetic text hard negatives (plain Python + NLTK/WordNet; no torch, no OpenCLIP).

    from open_clip_hn.negatives import NegativeGenerator
    NegativeGenerator(seed=0).generate("a red cube to the left of a small blue sphere", k=4)

Command line: `python -m open_clip_hn.negatives {show,generate,precompute,vocabulary,plausibility,audit,setup-nltk} --help`.
"""

from .generator import NegativeGenerator, normalise
from .nltk_data import NLTKDataError, WordNetMissingError, ensure_wordnet
from .taxonomy import NEGATIVE_TYPES, TYPE_TO_ID, parse_types

__all__ = ["NegativeGenerator", "normalise", "ensure_wordnet", "NLTKDataError", "WordNetMissingError",
           "NEGATIVE_TYPES", "TYPE_TO_ID", "parse_types"]
