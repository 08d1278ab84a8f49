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
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its config dump, load report and progress bar: once per
    hf_logging.disable_progress_bar()  # loader worker, on stderr
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, loading = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True,
                                                              output_loading_info=True)
    except Exception as err:  # whatever transformers raises, the folder is the cause: name it
        reason = (str(err).strip().splitlines() or [""])[0]
        raise LMError(f"{path}: not a loadable masked LM ({type(err).__name__}: {reason}); {FIX}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise LMError(f"{path}: the saved model lacks weights of a masked LM ({', '.join(missing[:3])}"
                      f"{', ...' if len(missing) > 3 else ''}), so they would be random and propose "
                      f"random words: is it a base model saved without its masked-LM head? {FIX}")
    if tokenizer.mask_token_id is None or len(tokenizer) <= len(tokenizer.all_special_ids):
        raise LMError(f"{path}: its tokenizer has no mask token or no words (only special tokens: "
                      f"are its tokenizer files there?), so the model cannot propose words; {FIX}")
    return tokenizer, model.eval()


def word_start_marker(tokenizer) -> str | None:
    """The prefix that marks a vocabulary entry as the start of a word: 'Ġ' for byte-level BPE
    (RoBERTa), '▁' for SentencePiece (ALBERT, DeBERTa-v3, XLM-R); None for WordPiece (BERT),
    whose word pieces after the first start with '##' instead."""
    second = (tokenizer.tokenize("a a") or [""])[-1]  # how a word after a space starts
    return second[0] if second[:1] in ("Ġ", "▁") else None


def whole_words(tokens: list[str], marker: str | None, first: bool = False) -> list[str]:
    """The tokens that are whole words, as words: a proposal must be a word the lexicons know,
    and a piece of one ('##ne', or 'ne' without BPE's marker) is not. A caption's `first` word
    has no space before it, so BPE writes it without its marker."""
    if marker is not None:
        words = [t[len(marker):] if t.startswith(marker) else t for t in tokens
                 if first or t.startswith(marker)]
    else:
        words = [t for t in tokens if not t.startswith("##")]
    return [w for w in words if w.isalpha()]


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
        self.word_start = word_start_marker(self.tokenizer)

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
        return whole_words(self.tokenizer.convert_ids_to_tokens(ids), self.word_start, first=index == 0)

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
