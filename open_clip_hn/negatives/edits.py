"""The edit kit every negative type is built from: splice new words into a parsed caption and keep
its English right (a/an, the case of the word replaced, singular or plural noun forms).

Shared by the rule route (`generator.py`) and the masked-LM route (`lm.py`). Plain Python.
"""

from __future__ import annotations

from typing import Collection, Iterable

from .lexicon import Resources, regular_plural
from .parse import Parse

Edit = tuple[list[str], list[str]]  # (words, gaps) of a candidate negative
_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "eu", "one", "once", "ur", "uk")
_AN_SILENT_H = ("hour", "honest", "honor", "heir")


def article_for(word: str) -> str:
    """'a' or 'an' by the sound of the next word (spelling heuristics for the common cases)."""
    w = word.lower()
    if w[:1].isdigit():
        return "an" if w.startswith(("8", "11", "18")) else "a"
    if w.startswith(_AN_SILENT_H):
        return "an"
    if w[:1] in "aeiou" and not w.startswith(_AN_EXCEPTIONS):
        return "an"
    return "a"


_ARTICLES = frozenset(("a", "an", "A", "An", "AN"))


def fix_articles(words: list[str], positions: Iterable[int], kept: Collection[tuple[str, str]] = ()
                 ) -> list[str]:
    """The articles at `positions` of `words` made a/an by the sound of the word after each,
    except where the article and that word are a pair in `kept` (the caption's own pairs)."""
    for i in positions:
        if 0 <= i < len(words) - 1 and words[i] in _ARTICLES and (words[i], words[i + 1]) not in kept:
            wanted = article_for(words[i + 1])
            if words[i + 1].isupper() and len(words[i + 1]) > 1:
                words[i] = wanted.upper()  # "A GREEN TABLE WITH AN OLD BLENDER"
            else:
                words[i] = wanted.capitalize() if words[i][0].isupper() else wanted
    return words


def match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        if word.lower().startswith(template.lower()):
            return template + word[len(template):]  # "TV" -> "TVs"
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def noun_form(res: Resources, lemma: str, plural: bool) -> str:
    return (res.plurals.get(lemma) or regular_plural(lemma)) if plural else lemma


def splice(p: Parse, replacements: list[tuple[int, int, list[str], list[str] | None]]) -> Edit:
    """Replace unit ranges [a, b) by new words (new gaps default to the old first gap, then ' ')."""
    words, gaps = list(p.words), list(p.gaps)
    ordered = sorted(replacements, key=lambda r: r[0])
    for a, b, new_words, new_gaps in reversed(ordered):  # from the end: earlier indices hold
        if new_gaps is None:
            first = gaps[a] if a < len(gaps) else " "
            new_gaps = [first] + [" "] * (len(new_words) - 1)
        words[a:b], gaps[a:b] = new_words, new_gaps
    # Only an article before or inside a replaced range can change; inside it, not one that came
    # with its next word from the caption ("a old dog" moved whole stays as the caption has it)
    edges, inner, shift = [], [], 0
    for a, b, new_words, _ in ordered:
        start, end = a + shift, a + shift + len(new_words)
        edges += [start - 1, end - 1]
        inner += range(start, end - 1)
        shift += len(new_words) - (b - a)
    fix_articles(words, inner, kept=set(zip(p.words, p.words[1:])))
    return fix_articles(words, edges), gaps
