"""Caption analysis: cleaning, tokenisation, POS tagging, multi-word units and noun phrases.

Two taggers give the same universal tags (NOUN, VERB, ADJ, ADV, ADP, DET, NUM, PRON, CONJ, PRT,
'.'): NLTK's averaged perceptron when its model is installed, else `LexiconTagger`, built from
WordNet's POS sets, the visual lexicons and closed-class word lists (fast, no model download).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .lexicon import Resources

MAX_CHARS = 1000
MIN_KNOWN_SHARE = 0.6
# words (hyphens inside), contractions ('s: a quote right after a letter), digits run into
# letters as one token ("3-year-old", "49ers", "4x4"), numbers, then single punctuation marks
TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*|(?<=[A-Za-z])'[A-Za-z]+|"
                   r"\d+(?:[.,]\d+)*(?:-?[A-Za-z][A-Za-z\d]*)+(?:-[A-Za-z\d]+)*|\d+(?:[.,]\d+)*|[^\sA-Za-z\d]")
_MIXED = re.compile(r"\d.*[A-Za-z]|[A-Za-z].*\d")
_QUOTES = ("'", '"')
_FORBIDDEN = re.compile(r"[^A-Za-z0-9 .,;:!?'\"()/&-]")
_HTML_ENTITY = re.compile(r"&#?\w+;")
# a web address or file name ("https://...", "www.x", "example.com/a.jpg"): edited as words, its
# pieces would move around the caption ("com on a beach https://example.a dog/x.jpg")
_WEB_ADDRESS = re.compile(r"(?i)\b[a-z][a-z\d+.-]*://|\bwww\.|\b[a-z\d-]+\.(?:com|org|net|edu|gov|io|"
                          r"co|uk|de|fr|info|html?|php|aspx?|jpe?g|png|gif|webp)\b")
_UNICODE_PUNCT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                                "\u2013": "-", "\u2014": "-", "\u00a0": " "})
_PENN_TO_UNIVERSAL = {
    "NN": "NOUN", "NNS": "NOUN", "NNP": "NOUN", "NNPS": "NOUN", "VB": "VERB", "VBD": "VERB",
    "VBG": "VERB", "VBN": "VERB", "VBP": "VERB", "VBZ": "VERB", "MD": "VERB", "JJ": "ADJ",
    "JJR": "ADJ", "JJS": "ADJ", "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "WRB": "ADV",
    "IN": "ADP", "TO": "PRT", "RP": "PRT", "POS": "PRT", "DT": "DET", "PDT": "DET", "WDT": "DET",
    "PRP$": "DET", "WP$": "DET", "EX": "PRON", "PRP": "PRON", "WP": "PRON", "CD": "NUM",
    "CC": "CONJ", "UH": "X", "FW": "X", "SYM": "X", "LS": "X",
}
_PLURAL_VERBS = frozenset(("are", "were", "have"))
_BE = frozenset(("is", "are", "was", "were", "be", "been", "being", "'s", "looks", "look", "seems", "appears"))
# Attribute categories whose words are also nouns ("a wood floor" / "made of wood"): outside the
# position before a noun they are read as nouns. Colours stay adjectives ("a man in black").
_ADJECTIVE_ONLY = frozenset(("color",))
_WORDNET_TAG = {"n": "NOUN", "v": "VERB", "a": "ADJ", "s": "ADJ", "r": "ADV"}


def clean_caption(caption: object) -> str | None:
    """The caption as plain English-alphabet text, or None when it is not a usable caption.

    Why reject rather than repair: a negative must be the positive with one meaning change, so
    captions we cannot read (HTML, emoji, control characters, other scripts, huge blobs) get no
    negatives and the sample is masked instead.
    """
    if unusable_reason(caption):
        return None
    return normalise_punctuation(caption).strip()


def normalise_punctuation(text: str) -> str:
    """Curly quotes, en and em dashes and no-break spaces as their plain forms. Negatives are
    made from this text, so the caption trained against them must be too: else every negative
    of a caption with a dash differs from it in that token, a shortcut needing no image."""
    return text.translate(_UNICODE_PUNCT)


def unusable_reason(caption: object) -> str | None:
    """Why `clean_caption` rejects a caption (for messages), or None when it is usable."""
    if not isinstance(caption, str):
        return f"it is a {type(caption).__name__}, not text"
    if len(caption) > MAX_CHARS:
        return f"it is longer than {MAX_CHARS} characters ({len(caption)})"
    text = normalise_punctuation(caption).strip()
    if not text:
        return "it is empty"
    forbidden = _FORBIDDEN.search(text)
    if forbidden:
        return f"it holds {forbidden.group()!r}, outside plain English text"
    if _HTML_ENTITY.search(text):
        return "it holds an HTML entity"
    address = _WEB_ADDRESS.search(text)
    if address:
        return f"it holds a web address or file name ({address.group()!r})"
    return None


class LexiconTagger:
    """Universal POS tags from closed-class lists, visual lexicons and WordNet's POS sets."""

    name = "lexicon"  # recorded with precomputed negatives: the two taggers parse differently

    def __init__(self, resources: Resources):
        self.res = resources
        self._cache: dict[str, tuple[str, bool]] = {}

    def lexical(self, word: str) -> tuple[str, bool]:
        """(context-free tag, known English word?) for a lower-case token."""
        hit = self._cache.get(word)
        if hit is None:
            hit = self._cache[word] = self._lookup(word)
        return hit

    def _lookup(self, w: str) -> tuple[str, bool]:
        res = self.res
        if not w[0].isalpha() and w[0] != "'":
            return ("NUM", True) if w[0].isdigit() else (".", True)
        if w in res.closed:
            return res.closed[w], True
        if w in res.counts:
            return "NUM", True
        if w in res.attr_category:
            return "ADJ", True
        if w in res.nouns:
            return "NOUN", True
        if w in res.verb_forms:
            return "VERB", True
        if w in res.pos_of:
            return _WORDNET_TAG[res.pos_of[w][0]], True
        if w in res.exceptions:
            return _WORDNET_TAG[res.exceptions[w][1]], True
        for suffix, repl, tag in (("ing", "", "VERB"), ("ing", "e", "VERB"), ("ed", "", "VERB"),
                                  ("ed", "e", "VERB"), ("ies", "y", "NOUN"), ("es", "", "NOUN"),
                                  ("s", "", "NOUN"), ("ly", "", "ADV"), ("er", "", "ADJ"),
                                  ("est", "", "ADJ")):
            if w.endswith(suffix) and len(w) > len(suffix) + 1:
                stem = w[: -len(suffix)] + repl
                if tag == "VERB" and len(stem) > 2 and stem[-1] == stem[-2] and stem[:-1] in res.pos_of:
                    stem = stem[:-1]
                if stem in res.pos_of:
                    letters = res.pos_of[stem]
                    if tag == "NOUN" and "n" not in letters and "v" in letters:
                        return "VERB", True
                    return tag, True
        return "NOUN", False

    def tag(self, words: list[str]) -> list[str]:
        """Tags for a token list, with a few left-context rules for noun/verb/adjective ambiguity."""
        res, tags = self.res, []
        lowers = [w.lower() for w in words]
        for i, lower in enumerate(lowers):
            tag = self.lexical(lower)[0]
            prev = tags[-1] if tags else None
            if tag == "VERB" and prev in ("DET", "ADJ", "NUM") and "n" in res.pos_of.get(lower, "n") and \
                    lower not in res.closed:  # "that are", "this is": never the noun "are"
                tag = "NOUN"
            elif tag == "VERB" and prev == "ADP" and lower.endswith("s") and not lower.endswith("ss") and \
                    "n" in res.pos_of.get(res.verb_forms.get(lower, (lower,))[0], ""):
                tag = "NOUN"  # "near slices of bread", "with cuts": a plural noun after a preposition
            elif tag == "NOUN" and prev in ("PRT",) and lowers[i - 1] == "to" and "v" in res.pos_of.get(lower, ""):
                tag = "VERB"
            elif tag == "NOUN" and prev == "NOUN" and self._present_verb(lowers, i):
                tag = "VERB"  # "a photo shows a man", "a cat creeps along a fence"
            tags.append(tag)
        for i, tag in enumerate(tags):  # "a yellow square", "a glass of water": the noun reading
            if tag == "ADJ" and self._noun_reading(lowers, tags, i):
                tags[i] = "NOUN"
        return tags

    def _present_verb(self, lowers: list[str], i: int) -> bool:
        """An -s form right after a singular noun and before an object or a preposition is a verb
        ("shows a", "creeps along"); "street signs on a pole" keeps its noun (sign is mostly a noun)."""
        word, res = lowers[i], self.res
        prev = lowers[i - 1]
        if not word.endswith("s") or word.endswith("ss") or noun_lemma(res, prev)[1] or i + 1 == len(lowers):
            return False
        stem = word[:-2] if word.endswith(("ches", "shes", "sses", "xes")) else word[:-1]
        if word.endswith("ies"):
            stem = word[:-3] + "y"
        letters = res.pos_of.get(stem, "")
        if "v" not in letters or stem in res.nouns and word in res.nouns and letters[0] != "v":
            return False
        nxt = self.lexical(lowers[i + 1])[0]
        return nxt in ("DET", "PRON") or (nxt == "ADP" and letters[0] == "v")

    def _noun_reading(self, lowers: list[str], tags: list[str], i: int) -> bool:
        """Whether an attribute word that is also a noun is the noun here: not before a noun or a
        coordinated adjective ("a wood and metal bench"), nor predicative ("the floor is wood")."""
        word, res, n = lowers[i], self.res, len(tags)
        nxt = tags[i + 1] if i + 1 < n else None
        if nxt in ("NOUN", "ADJ") or i == 0:
            return False
        if word in res.nouns and tags[i - 1] in ("DET", "ADJ", "NUM"):
            return True
        if res.attr_category.get(word) in _ADJECTIVE_ONLY or not res.pos_of.get(word, "a").startswith("n"):
            return False
        if tags[i - 1] == "ADV" or lowers[i - 1] in _BE:
            return False
        return not (lowers[i + 1] in (",", "and", "or") if i + 1 < n else False) or not (
            i + 2 < n and tags[i + 2] == "ADJ")


class NLTKTagger:
    """NLTK's averaged perceptron tagger, mapped to universal tags (used when its model exists)."""

    name = "nltk"

    def __init__(self):
        from nltk.tag import PerceptronTagger

        from .nltk_data import broken_tagger

        try:
            self._tagger = PerceptronTagger()
            self._tagger.tag(["a", "red", "car"])
        except Exception as err:  # NLTK raises what its loader meets: OSError, ValueError, ...
            raise broken_tagger(nltk_tagger_path(), err) from None

    def tag(self, words: list[str]) -> list[str]:
        tags = [_PENN_TO_UNIVERSAL.get(t, "." if not t[:1].isalpha() else "X")
                for _, t in self._tagger.tag(words)]
        return ["PRT" if w.lower() == "to" else t for w, t in zip(words, tags)]


def nltk_tagger_path() -> str | None:
    """Where NLTK's averaged perceptron tagger model is installed, or None."""
    from .nltk_data import find_resource

    for name in ("taggers/averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger"):
        path = find_resource(name)
        if path:
            return path
    return None


def nltk_tagger_available() -> bool:
    """True when NLTK's averaged perceptron tagger model is installed (its folder exists; a
    damaged one is an error when loaded, not a silent switch to the other tagger)."""
    return nltk_tagger_path() is not None


@dataclass
class NounPhrase:
    start: int  # first unit (determiner, count, attribute or noun)
    end: int  # one past the head noun
    det: int | None
    num: int | None
    attrs: list[int]  # adjectives only
    head: int
    lemma: str
    plural: bool
    attr_start: int = -1  # first unit of the attribute group ("very tall", "black and white")
    nouns_start: int = -1  # first noun unit; the attribute group is [attr_start, nouns_start)


@dataclass
class Parse:
    """A caption split into units (words or multi-word units) with the text between them."""

    words: list[str]
    gaps: list[str]
    tail: str
    tags: list[str]
    kinds: list[str]  # "rel" for spatial relations, "noun" for vocabulary nouns, "" otherwise
    capitalized: bool
    nps: list[NounPhrase] = field(default_factory=list)

    def render(self, words: list[str], gaps: list[str]) -> str:
        text = "".join(g + w for g, w in zip(gaps, words)) + self.tail
        text = text.strip()
        if self.capitalized and text:
            text = text[0].upper() + text[1:]
        return text


_ES_PLURAL_STEMS = ("s", "x", "z", "ch", "sh", "o")  # the singulars English pluralises with -es


def noun_lemma(res: Resources, word: str) -> tuple[str, bool]:
    """(lemma, plural?) of a noun form, from the vocabulary, WordNet exceptions or suffix rules."""
    if word in res.nouns:
        return res.nouns[word]
    exception = res.exceptions.get(word)
    if exception and exception[1] == "n":
        return exception[0], True
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 1 and not word.endswith("ss"):
            stem = word[: -len(suffix)] + repl
            if suffix == "es" and not stem.endswith(_ES_PLURAL_STEMS):
                continue  # "pipes" is pipe + s, not pip + es
            if "n" in res.pos_of.get(stem, ""):
                return stem, True
    return word, False


def parse_caption(text: str, res: Resources, tagger) -> Parse | None:
    """Tokenise, tag, merge multi-word units and chunk noun phrases; None for non-English text."""
    spans = [(m.start(), m.end()) for m in TOKEN.finditer(text)]
    tokens = [text[a:b] for a, b in spans]
    lowers = [t.lower() for t in tokens]
    lexical = getattr(tagger, "lexical", None) or LexiconTagger(res).lexical
    alpha = [w for w in lowers if w[0].isalpha()]
    if len(alpha) < 2 or sum(lexical(w)[1] for w in alpha) < MIN_KNOWN_SHARE * len(alpha):
        return None
    if len(alpha) > 3 and not any(w in res.closed for w in alpha):
        return None  # English captions have function words; "le chat est sur la table" has none
    tags = _pin_literal_tokens(tokens, spans, text, tagger.tag(tokens), res)
    words, gaps, unit_tags, kinds = [], [], [], []
    previous_end, i = 0, 0
    while i < len(tokens):
        length, kind = 1, ""
        for sequence in () if tags[i] == "X" else res.multiword.get(lowers[i], ()):
            if tuple(lowers[i:i + len(sequence)]) == sequence:
                length = len(sequence)
                phrase = " ".join(sequence)
                kind = "rel" if phrase in res.relations else "attr" if phrase in res.attr_category else "noun"
                break
        start, end = spans[i][0], spans[i + length - 1][1]
        words.append(" ".join(tokens[i:i + length]))  # "in front  of" is the unit "in front of"
        gaps.append(text[previous_end:start])
        if kind == "rel":
            unit_tags.append("ADP")
        elif kind == "attr":
            unit_tags.append("ADJ")
            kind = ""
        elif kind == "noun":
            unit_tags.append("NOUN")
        else:
            unit_tags.append(tags[i])
            if tags[i] == "ADP" and lowers[i] in res.relations:
                kind = "rel"
        kinds.append(kind)
        previous_end = end
        i += length
    first_letter = next((c for c in text if c.isalpha()), "")
    capitalized = bool(words) and (unit_tags[0] == "X" and first_letter.isupper() or (
        words[0][:1].isupper() and (len(words[0]) == 1 or words[0][1:].islower())))
    if capitalized and unit_tags[0] != "X":  # a pinned name keeps its capitals wherever it moves
        words[0] = words[0].lower()
    parse = Parse(words, gaps, text[previous_end:], unit_tags, kinds, capitalized)
    parse.nps = chunk_noun_phrases(parse, res)
    return parse


def _pin_literal_tokens(tokens: list[str], spans: list[tuple[int, int]], text: str, tags: list[str],
                        res: Resources) -> list[str]:
    """`tags` with X (no edit moves or replaces it) for tokens that are not plain words: digits
    run into letters ("3-year-old", "49ers"), words between a pair of quotes ("a sign reading
    'no parking'") and proper names ("the Eiffel Tower", "New York City skyline"), which edits
    broke apart ("the Eiffel Building") or traded with the quotes left behind."""
    tags = list(tags)
    i = 0
    while i < len(tokens):
        close = _closing_quote(tokens, spans, text, i)
        if close is not None:
            tags[i:close + 1] = ["X"] * (close + 1 - i)
            i = close + 1
            continue
        if _MIXED.search(tokens[i]):
            tags[i] = "X"
        i += 1
    for i in _proper_names(tokens, tags, res):
        tags[i] = "X"
    return tags


def _closing_quote(tokens: list[str], spans: list[tuple[int, int]], text: str, i: int) -> int | None:
    """Index of the quote closing the one opening at token i, or None when token i opens no
    quote. A quote opens before a word it touches ("'no"), after a space or the start; one
    right after a word is a possessive ("the dogs' bowl") or a closing quote."""
    if tokens[i] not in _QUOTES or i + 1 >= len(tokens) or spans[i + 1][0] != spans[i][1]:
        return None
    if i > 0 and spans[i - 1][1] == spans[i][0] and tokens[i - 1][-1:].isalnum():
        return None
    for k in range(i + 2, len(tokens)):
        if tokens[k] == tokens[i] and spans[k - 1][1] == spans[k][0]:
            return k
    return None


_SENTENCE_ENDS = frozenset((".", "!", "?", ":", ";"))


def _proper_names(tokens: list[str], tags: list[str], res: Resources) -> list[int]:
    """Indices of the words of proper names in a caption whose common nouns are in lower case: a
    capitalised word inside a sentence ("next to the Eiffel Tower"), and a capitalised
    sentence-initial word that runs on into one ("New York City skyline", "Times Square at
    night") unless it is a function word ("A Boeing 747"). None where no noun is in lower case
    (capitals, title case: "A Dog on the Couch"), since capitals there say nothing of names."""
    if not any(tag == "NOUN" and token.islower() for token, tag in zip(tokens, tags)):
        return []
    capital = [t[0].isupper() and t != "I" and not (t.isupper() and t.lower() in res.nouns)  # "TV"
               for t in tokens]
    names = []
    for i, token in enumerate(tokens):
        if not capital[i]:
            continue
        starts_sentence = i == 0 or tokens[i - 1] in _SENTENCE_ENDS
        if not starts_sentence:
            names.append(i)
        elif i + 1 < len(tokens) and capital[i + 1] and token.lower() not in res.closed:
            names.append(i)
    return names


def _attribute_group(tags: list[str], words: list[str], j: int) -> tuple[int, list[int]]:
    """End of the attribute group starting at j and its adjectives: intensifiers ("very tall") and
    coordination ("black and white", "green, white, and red") stay inside the group."""
    n, attrs = len(tags), []
    while j < n:
        if tags[j] == "ADJ":
            attrs.append(j)
            j += 1
        elif tags[j] == "ADV" and j + 1 < n and tags[j + 1] == "ADJ":
            j += 1
        elif attrs and attrs[-1] == j - 1 and words[j].lower() in (",", "and", "or"):
            k = j + 1 + (words[j] == "," and j + 1 < n and words[j + 1].lower() in ("and", "or"))
            if k < n and tags[k] == "ADJ":
                j = k
            else:
                break
        else:
            break
    return j, attrs


def _possessive(parse: Parse, owner: NounPhrase, i: int) -> bool:
    """The unit before i is a possessive ending owner ("the dog's", "the dogs'"), so the phrase
    at i is what owner has. A determiner after "'s" makes it "is" ("the dog's a puppy")."""
    k = owner.end
    if k + 1 != i or parse.gaps[k]:
        return False
    mark = parse.words[k].lower()
    return mark == "'s" or (mark == "'" and parse.words[k - 1].lower().endswith("s"))


def chunk_noun_phrases(parse: Parse, res: Resources) -> list[NounPhrase]:
    """Noun phrases: [determiner] [count] [pinned] attribute-group noun+ (the last noun is the
    head; pinned tokens, tagged X, stay in place inside the phrase).

    A collective noun and its "of" phrase form one noun phrase headed by the inner noun ("a bunch
    of sheep" is sheep), so swaps and replacements act on the objects themselves.
    """
    nps, tags, words, i, n = [], parse.tags, parse.words, 0, len(parse.words)
    while i < n:
        j, det, num = i, None, None
        if tags[j] == "DET":
            det, j = j, j + 1
        if j < n and tags[j] == "NUM":
            num, j = j, j + 1
        while j < n and tags[j] == "X":  # "a 3-year-old girl", "the Eiffel Tower": inside, never edited
            j += 1
        attr_start = j
        j, attrs = _attribute_group(tags, words, j)
        nouns_start = j
        while j < n and tags[j] == "NOUN" and parse.kinds[j] != "rel":
            j += 1
        if j > nouns_start:
            head = j - 1
            lemma, plural = noun_lemma(res, words[head].lower())
            if num is not None and not plural and words[num].lower() not in ("one", "1"):
                plural = True  # "two sheep"
            elif not plural and res.plurals.get(lemma) == lemma and j < n and words[j].lower() in _PLURAL_VERBS:
                plural = True  # "the sheep are"
            np = NounPhrase(i, j, det, num, attrs, head, lemma, plural, attr_start if attrs else nouns_start,
                            nouns_start)
            outer = nps[-1] if nps else None
            if outer is not None and outer.lemma in res.collective and outer.end + 1 == i and \
                    words[outer.end].lower() == "of":
                np.start, np.det, np.num = outer.start, outer.det, outer.num
                nps[-1] = np
            elif outer is not None and det is None and _possessive(parse, outer, i):
                np.start = outer.start  # "the dog's bowl": one object, the bowl
                nps[-1] = np
            else:
                nps.append(np)
            i = j
        else:
            i += 1
    return nps
