"""Optional masked-LM route (`--hn-lm PATH`): a local masked LM proposes the replacement word.

The LM only proposes; proposals pass the same validity tables as the rule route (co-hyponym
nouns, same-category attributes, never synonyms, hypernyms or hyponyms), so a bad or random
model can reorder valid negatives but never create invalid ones. Nothing is downloaded.
"""

from __future__ import annotations

import os
import random

from ..argtypes import InputError
from .edits import match_case, noun_form, splice
from .lexicon import Resources
from .parse import Parse

TOP_K = 50
FIX = "pass a folder holding a masked LM and its tokenizer, written by transformers' save_pretrained"


class LMError(InputError):
    """A masked-LM path that cannot be loaded. The message starts with the path: the caller puts
    its flag (--lm, --hn-lm) in front."""


def _load(path: str) -> tuple:
    """The tokenizer and model at `path`; LMError says why not in our words (transformers' own
    errors speak of hub repo ids for a missing path, of sentencepiece for an empty folder)."""
    if not os.path.isdir(path):
        raise LMError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such folder'}; {FIX}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LMError(f"{path}: no config.json, so not a saved transformers model; {FIX}")
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True)
    except Exception as err:  # whatever transformers raises, the folder is the cause: name it
        reason = (str(err).strip().splitlines() or [""])[0]
        raise LMError(f"{path}: not a loadable masked LM ({type(err).__name__}: {reason}); {FIX}") from None
    if tokenizer.mask_token_id is None or len(tokenizer) <= len(tokenizer.all_special_ids):
        raise LMError(f"{path}: its tokenizer has no mask token or no words (only special tokens: "
                      f"are its tokenizer files there?), so the model cannot propose words; {FIX}")
    return tokenizer, model.eval()


def check_masked_lm(path: str, flag: str) -> None:
    """Load the LM at `path` once, now: refused here it is named as `flag`, whereas the generator
    loads it lazily inside the loader workers, whose failure names no flag."""
    try:
        _load(path)
    except LMError as err:
        raise InputError(f"{flag} {err}") from None


class MaskedLMProposer:
    """Wraps a local transformers masked LM (and its tokenizer) saved with save_pretrained."""

    def __init__(self, path: str):
        self.tokenizer, self.model = _load(path)

    def propose(self, words: list[str], index: int, top: int = TOP_K) -> list[str]:
        """Whole-word proposals for the masked unit `index`, most likely first."""
        import torch

        masked = [w.lower() for w in words]
        masked[index] = self.tokenizer.mask_token
        encoded = self.tokenizer(" ".join(masked), return_tensors="pt", truncation=True)
        positions = (encoded["input_ids"][0] == self.tokenizer.mask_token_id).nonzero()
        if len(positions) == 0:
            return []
        with torch.no_grad():
            logits = self.model(**encoded).logits[0, positions[0, 0]]
        ids = logits.topk(min(top, logits.numel())).indices.tolist()
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return [t for t in tokens if t.isalpha()]

    def edits(self, res: Resources, parse: Parse, name: str, rng: random.Random) -> list:
        """replace_object / replace_attribute edits whose new word the LM proposed (and is valid)."""
        out = []
        present = {w.lower() for w in parse.words} | {np.lemma for np in parse.nps}
        if name == "replace_object":
            for np in parse.nps:
                valid = set(res.noun_candidates.get(np.lemma, ())) - present
                for word in self.propose(parse.words, np.head):
                    lemma = res.nouns.get(word, (word, False))[0]
                    if lemma in valid:
                        new = match_case(parse.words[np.head], noun_form(res, lemma, np.plural))
                        out.append(splice(parse, [(np.head, np.head + 1, [new], None)]))
                        break
        elif name == "replace_attribute":
            for np in parse.nps:
                for i in np.attrs:
                    valid = set(res.attr_candidates.get(parse.words[i].lower(), ())) - present
                    choice = next((w for w in self.propose(parse.words, i) if w in valid), None)
                    if choice:
                        out.append(splice(parse, [(i, i + 1, [match_case(parse.words[i], choice)], None)]))
        rng.shuffle(out)
        return out
