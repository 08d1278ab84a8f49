"""Typed text hard negatives: one caption in, up to K captions with one meaning change out.

Each type edits a parsed caption (see parse.py) and keeps English agreement (a/an, singular or
plural nouns, verb number). Replacement words come from tables precomputed from WordNet
(lexicon.py), which already exclude synonyms, hypernyms and hyponyms of the replaced word.
Negatives are a pure function of (caption, seed, types, k) and, with a plausibility filter, of the
filter model's contents: the random generator is seeded from a CRC of the seed and the caption,
never from Python's salted hash().
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import zlib
from typing import Callable, Collection

from .edits import Edit, match_case, noun_form, splice
from .lexicon import Resources, load_resources, restrict_to_vocabulary, words_of
from .parse import LexiconTagger, NLTKTagger, NounPhrase, Parse, clean_caption, nltk_tagger_available, parse_caption
from .plausibility import PlausibilityModel, resolve as resolve_plausibility, select as plausible_order
from .taxonomy import LM_TYPES, NEGATIVE_TYPES, SWAP_TYPES, parse_types

_BE_NUMBER = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has"}
_SINGULAR_VERBS = ("is", "was", "has")
WIDE_OPTIONS = 6  # options per replaced word offered to a plausibility filter (see `wide`)
WIDE_VERBS = 16  # ... per replaced verb (the filter keeps fewer verbs than nouns or attributes)

_PROCESS: dict = {}  # per-process lazily loaded resources, taggers and LMs (never pickled)


def normalise(text: str) -> str:
    """Lower case, punctuation and spacing removed: how negatives are compared to the positive
    (and, word by word, to a vocabulary)."""
    return " ".join(words_of(text))


def _resources() -> Resources:
    if "resources" not in _PROCESS:
        _PROCESS["resources"] = load_resources()
    return _PROCESS["resources"]


def _tagger(kind: str):
    key = f"tagger:{kind}"
    if key not in _PROCESS:
        use_nltk = kind == "nltk" or (kind == "auto" and nltk_tagger_available())
        _PROCESS[key] = NLTKTagger() if use_nltk else LexiconTagger(_resources())
    return _PROCESS[key]


def _agree_verb(res: Resources, p: Parse, np: NounPhrase, plural: bool) -> list:
    """Replacement for the verb right after a subject noun phrase whose number changes."""
    i = np.end
    if i >= len(p.words) or (np.start > 0 and p.words[np.start - 1].lower() == "and"):
        return []  # "a zebra and two elephants are": a coordinated subject stays plural
    lower = p.words[i].lower()
    if lower in _BE_NUMBER and (lower in _SINGULAR_VERBS) == plural:
        return [(i, i + 1, [match_case(p.words[i], _BE_NUMBER[lower])], [p.gaps[i]])]
    form = res.verb_forms.get(lower)
    if p.tags[i] == "VERB" and form and form[1] in ("s", "base"):
        wanted = res.verb_table[form[0]]["base" if plural else "s"]
        if wanted != lower:
            return [(i, i + 1, [match_case(p.words[i], wanted)], [p.gaps[i]])]
    return []


# ---- the nine types: each returns candidate edits, best first --------------------------------

def _group(p: Parse, np: NounPhrase) -> tuple[list[str], list[str]]:
    """The attribute group of a noun phrase as (lower-case words, gaps)."""
    return p.words[np.attr_start:np.nouns_start], p.gaps[np.attr_start:np.nouns_start]


_COORDINATORS = frozenset(("and", ",", "&"))


def _predicate(p: Parse, i: int) -> bool:
    """Unit `i` relates what comes before it to what follows: a relation, a preposition or a verb
    other than a copula ("a dog *under* a chair", "a man *holding* a cup")."""
    return 0 <= i < len(p.words) and (p.kinds[i] == "rel" or p.tags[i] in ("ADP", "VERB")) and (
        p.words[i].lower() not in _COPULAS)


def _coordinated(p: Parse, a: NounPhrase, b: NounPhrase) -> bool:
    """`a` and `b` (a first) are items of one list ("a white toilet and a small sink", "a cat, a
    dog and a bird"): only "and", commas and other items between them, and not two clauses ("a
    cat on *a table* and *a dog* under a chair": the object of one predicate, the subject of the
    next). Their order says nothing, so trading the two phrases keeps the caption true."""
    inside = {i for np in p.nps for i in range(np.start, np.end)}
    between = [p.words[i].lower() for i in range(a.end, b.start) if i not in inside]
    if not between or not set(between) <= _COORDINATORS:
        return False
    return not (_predicate(p, a.start - 1) and _predicate(p, b.end))


def _same_item(p: Parse, a: NounPhrase, b: NounPhrase) -> bool:
    """Two phrases of one noun with the same count ("a large dog and a small dog"): trading their
    attributes only trades their places."""
    count = lambda np: ([w.lower() for w in p.words[np.start:np.attr_start]], np.plural)
    return a.lemma == b.lemma and count(a) == count(b)


def _trade_groups(p: Parse, a: NounPhrase, b: NounPhrase) -> Edit:
    """Whole attribute groups trade places ("a very tall building by lush green grass")."""
    (wa, ga), (wb, gb) = _group(p, a), _group(p, b)
    return splice(p, [(a.attr_start, a.nouns_start, wb, [p.gaps[a.attr_start]] + gb[1:]),
                       (b.attr_start, b.nouns_start, wa, [p.gaps[b.attr_start]] + ga[1:])])


def _move_group(p: Parse, a: NounPhrase, b: NounPhrase) -> Edit:
    """a's attribute group moves to b, which had none ("a striped cat in a tub" -> a striped tub)."""
    words, gaps = _group(p, a)
    n = b.nouns_start
    return splice(p, [(a.attr_start, a.nouns_start, [], []),
                       (n, n + 1, words + [p.words[n]], [p.gaps[n]] + gaps[1:] + [" "])])


_QUANTIFIERS = frozenset(("many", "several", "some", "few", "multiple", "numerous"))
_COPULAS = frozenset(("is", "are"))


def _quantity(res: Resources, p: Parse, np: NounPhrase) -> tuple[int, str] | None:
    """(unit, word) of the count of a noun phrase: a number, a plural quantifier or a/an (one)."""
    if np.num is not None and np.det is None:
        word = p.words[np.num].lower()
        return (np.num, word) if _count_value(res, word) is not None else None
    if np.det is not None and np.num is None and np.nouns_start == np.head:
        word = p.words[np.det].lower()
        if (word in ("a", "an") and not np.plural) or (word in _QUANTIFIERS and np.plural):
            return np.det, word
    return None


def doubled_words(text: str) -> set[str]:
    """Words said twice in a row ("walking walking") or on both sides of "and"/"or" ("walking
    and walking") in a normalised text: an edit that makes one reads wrong at a glance (a
    text-only shortcut), so a negative may only keep those of its caption."""
    words = text.split()
    return {w for i, w in enumerate(words)
            if words[i + 1:i + 2] == [w] or (words[i + 1:i + 2] in (["and"], ["or"]) and words[i + 2:i + 3] == [w])}


def _amount(res: Resources, word: str) -> int | str:
    """What a count word says: its number (a/an/one/1 are all 1), or a quantifier itself."""
    return 1 if word in ("a", "an") else (_count_value(res, word) or word)


def _trade_counts(res: Resources, p: Parse, a: NounPhrase, b: NounPhrase) -> Edit | None:
    """Counts trade places ("two women ... a sofa" -> a woman ... two sofas), agreement kept."""
    qa, qb = _quantity(res, p, a), _quantity(res, p, b)
    if qa is None or qb is None or _amount(res, qa[1]) == _amount(res, qb[1]):
        return None  # "a man with one cat" -> "one man with a cat" says the same
    edits = []
    for np, (unit, _), (_, word) in ((a, qa, qb), (b, qb, qa)):
        plural = word not in ("a", "an", "one", "1")
        edits.append((unit, unit + 1, [match_case(p.words[unit], word)], None))
        if plural != np.plural:
            edits.append((np.head, np.head + 1, [match_case(p.words[np.head], noun_form(res, np.lemma, plural))],
                          None))
            edits.extend(_agree_verb(res, p, np, plural))
    return splice(p, edits)


def swap_attributes(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """Attributes of two objects trade places: whole attribute groups or counts first ("a red cube
    and a blue ball" -> blue cube, red ball; "two cats and a dog" -> a cat and two dogs), then
    single same-category words, then a group moving to an object that had none."""
    groups, words, moves = [], [], []
    for x in range(len(p.nps)):
        for y in range(x + 1, len(p.nps)):
            a, b = p.nps[x], p.nps[y]
            if _same_item(p, a, b) and _coordinated(p, a, b):
                continue  # "a large dog and a small dog" -> "a small dog and a large dog": the same
            counts = _trade_counts(res, p, a, b)
            if counts is not None:
                groups.append(counts)
            if a.attrs and b.attrs:
                if _group(p, a)[0] != _group(p, b)[0]:
                    groups.append(_trade_groups(p, a, b))
                for i in a.attrs:
                    for j in b.attrs:
                        wi, wj = p.words[i].lower(), p.words[j].lower()
                        if wi != wj and res.attr_category.get(wi) == res.attr_category.get(wj) and (
                                len(a.attrs) > 1 or len(b.attrs) > 1) and not (  # no "brown and brown"
                                wj in {p.words[x].lower() for x in a.attrs} or wi in {p.words[x].lower() for x in b.attrs}):
                            words.append(splice(p, [(i, i + 1, [wj], None), (j, j + 1, [wi], None)]))
            elif a.attrs or b.attrs:
                moves.append(_move_group(p, a, b) if a.attrs else _move_group(p, b, a))
    for tier in (groups, words, moves):
        rng.shuffle(tier)
    return groups + words + moves


def _swappable(res: Resources, a: NounPhrase, b: NounPhrase) -> bool:
    return a.lemma != b.lemma and frozenset((a.lemma, b.lemma)) not in res.related_nouns


def _symmetric(res: Resources, p: Parse, a: NounPhrase, b: NounPhrase) -> bool:
    """The subject `a` and `b` are joined by a relation that holds both ways ("a cat next to a
    dog", "a cup is beside a plate"): trading them says the same. Deeper in the caption the
    pair may be what a verb acts on ("cutting a pizza next to a salad"), and there it may trade."""
    between = [w.lower() for w in p.words[a.end:b.start] if w.lower() not in _COPULAS]
    return a is p.nps[0] and " ".join(between) in res.symmetric_relations


def _trade_phrases(res: Resources, p: Parse, a: NounPhrase, b: NounPhrase) -> Edit:
    """Whole noun phrases trade places; the verb after each agrees with its new subject."""
    wa, wb = p.words[a.start:a.end], p.words[b.start:b.end]
    gaps = lambda at, np: [p.gaps[at]] + p.gaps[np.start + 1:np.end]  # "the dog's bowl" keeps its "'s"
    edits = [(a.start, a.end, wb, gaps(a.start, b)), (b.start, b.end, wa, gaps(b.start, a))]
    if a.plural != b.plural:
        edits += _agree_verb(res, p, a, b.plural) + [r for r in _agree_verb(res, p, b, a.plural) if r[0] != a.start]
    return splice(p, edits)


def swap_objects(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """Two objects trade places ("a horse pulling a carriage" -> a carriage pulling a horse).

    Whole noun phrases move (article, count, attributes), the subject's pairs first; then, where
    attributes are involved, only the nouns move and each keeps the other's attributes and number.
    """
    subject, others, heads = [], [], []
    for x in range(len(p.nps)):
        for y in range(x + 1, len(p.nps)):
            a, b = p.nps[x], p.nps[y]
            if not _swappable(res, a, b):
                continue
            # "a toilet and a sink" -> "a sink and a toilet", "a cup by a plate" -> ...: the same
            if not _coordinated(p, a, b) and not _symmetric(res, p, a, b):
                (subject if x == 0 else others).append(_trade_phrases(res, p, a, b))
            if a.attrs or b.attrs:
                heads.append(splice(p, [
                    (a.head, a.head + 1, [match_case(p.words[a.head], noun_form(res, b.lemma, a.plural))], None),
                    (b.head, b.head + 1, [match_case(p.words[b.head], noun_form(res, a.lemma, b.plural))], None)]))
    for tier in (subject, others, heads):
        rng.shuffle(tier)
    return subject + others + heads


def shuffle_order(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """Whole noun phrases (with their attributes) trade places: same words, another order."""
    out = []
    for x in range(len(p.nps)):
        for y in range(x + 1, len(p.nps)):
            a, b = p.nps[x], p.nps[y]
            wa, wb = [w.lower() for w in p.words[a.start:a.end]], [w.lower() for w in p.words[b.start:b.end]]
            if wa != wb and a.lemma != b.lemma and not _coordinated(p, a, b) and not _symmetric(res, p, a, b):
                out.append(_trade_phrases(res, p, a, b))
    rng.shuffle(out)
    return out


def related_phrases(p: Parse, relation_words: Collection[str]) -> tuple[NounPhrase, NounPhrase] | None:
    """(subject, object) noun phrases of the caption's one spatial relation that holds a word of
    `relation_words`. None unless the parse is unambiguous: one such relation, the caption's first
    noun phrase right before it (a copula between is fine) and a noun phrase right after it."""
    words = {w.lower() for w in relation_words}
    relations = [i for i, kind in enumerate(p.kinds)
                 if kind == "rel" and words & set(p.words[i].lower().split())]
    if len(relations) != 1 or not p.nps:
        return None
    at, subject = relations[0], p.nps[0]
    after = [np for np in p.nps if np.start == at + 1]
    between = [w.lower() for w in p.words[subject.end:at]]
    if not after or subject.end > at or any(w not in _COPULAS for w in between):
        return None
    return subject, after[0]


def exchange_related_objects(res: Resources, p: Parse, relation_words: Collection[str]) -> Edit | None:
    """The subject and the object of the caption's one spatial relation that holds a word of
    `relation_words` trade places ("a cube to the left of a cone" -> "a cone to the left of a
    cube"). Applied to a mirrored caption this gives the converse of the original ("a cone to the
    right of a cube": the same scene in other words). None unless `related_phrases` finds the two
    and they differ."""
    phrases = related_phrases(p, relation_words)
    if phrases is None:
        return None
    subject, reference = phrases
    if [w.lower() for w in p.words[subject.start:subject.end]] == \
            [w.lower() for w in p.words[reference.start:reference.end]]:
        return None
    return _trade_phrases(res, p, subject, reference)


_MALE = frozenset(("man", "boy", "guy", "gentleman", "father", "dad", "son", "husband", "brother",
                   "king", "prince", "grandfather", "uncle", "groom", "policeman", "fisherman"))
_FEMALE = frozenset(("woman", "girl", "lady", "mother", "mom", "daughter", "wife", "sister", "queen",
                     "princess", "grandmother", "aunt", "bride", "policewoman"))
_PRONOUNS = {"he": "m", "his": "m", "him": "m", "himself": "m",
             "she": "f", "her": "f", "hers": "f", "herself": "f"}


_YOUTHFUL = frozenset(("girl", "boy", "child", "kid", "baby", "toddler", "infant", "teen", "teenager",
                       "youngster", "puppy", "kitten", "calf", "lamb", "foal", "cub", "chick"))
_PERSON_AGES = frozenset(("young", "old", "elderly"))  # not "an antique woman", "a baby woman"
_COLLECTIVE = frozenset(("family", "crowd", "couple", "group", "team", "audience", "crew", "class",
                         "band", "army", "troop", "gang", "party"))


def _person_like(res: Resources, lemma: str) -> bool:
    return lemma in ("people", "person") or res.noun_lexname.get(lemma) in ("noun.person", "noun.Tops")


def _gender(lemma: str) -> str | None:
    return "m" if lemma in _MALE else "f" if lemma in _FEMALE else None


def _pronoun_gender(p: Parse) -> set[str]:
    """The genders the caption's pronouns give ("his", "she"): a replacement must not contradict them."""
    return {_PRONOUNS[w.lower()] for w in p.words if w.lower() in _PRONOUNS}


def _fits_in_place(res: Resources, np: NounPhrase, choice: str, pronouns: set[str]) -> bool:
    """Whether `choice` can stand where `np`'s noun stands without a text-only tell: no plural-only
    noun after "a" ("a sunglasses"), no person turned into a group or back ("a woman smiles" ->
    "a family smiles", "two people" -> "two crowds"), no gender the caption's pronouns contradict
    ("a man uses his computer" -> "a woman uses his computer")."""
    if not np.plural and res.plurals.get(choice) == choice and choice.endswith("s"):
        return False
    if (np.lemma in _COLLECTIVE) != (choice in _COLLECTIVE) and \
            _person_like(res, np.lemma if choice in _COLLECTIVE else choice):
        return False
    gender = _gender(choice)
    return gender is None or not pronouns or pronouns == {gender}


def replace_object(res: Resources, p: Parse, rng: random.Random, wide: bool = False) -> list[Edit]:
    """One object becomes a co-hyponym (dog -> cat), never a synonym, hypernym or hyponym.
    `wide`: the closest WIDE_OPTIONS co-hyponyms, not one drawn from six (for a plausibility filter)."""
    out = []
    present = {np.lemma for np in p.nps}
    pronouns = _pronoun_gender(p)
    for np in p.nps:
        options = [c for c in res.noun_candidates.get(np.lemma, ()) if c not in present
                   and _fits_in_place(res, np, c, pronouns)]
        for choice in (options[:WIDE_OPTIONS] if wide else [rng.choice(options[:6])] if options else []):
            word = match_case(p.words[np.head], noun_form(res, choice, np.plural))
            out.append(splice(p, [(np.head, np.head + 1, [word], None)]))
    rng.shuffle(out)
    return out


def _attribute_options(res: Resources, word: str, present: set[str]) -> list[str]:
    """Replacements for an attribute word: its opposites if any, else its category; words already
    in the caption last ("a black shirt and white shorts" -> a white shirt ... only if nothing else)."""
    if word in res.attr_candidates:
        options = list(res.attr_candidates[word])
        opposites = [o for o in res.antonyms.get(word, ()) if o in options]
        ranked = [o for o in opposites if o not in present] or [o for o in options if o not in present]
        return ranked or opposites or options
    return list(res.antonyms.get(word, ()))


def _syllables(word: str) -> int:
    return len(re.findall(r"[aeiouy]+", word.rstrip("e")))


def comparative(word: str, suffix: str) -> str | None:
    """'er'/'est' form of a short adjective ("big" -> "bigger", "tiny" -> "tinier"), else None."""
    if word.endswith("y") and _syllables(word[:-1]) == 1:
        return word[:-1] + "i" + suffix
    if _syllables(word) != 1 or not word.isalpha():
        return None
    if word.endswith("e"):
        return word + suffix[1:]
    if len(word) > 2 and word[-1] not in "aeiouwxy" and word[-2] in "aeiou" and word[-3] not in "aeiou":
        return word + word[-1] + suffix  # big -> bigger, thin -> thinnest
    return word + suffix


def _graded(res: Resources, word: str) -> tuple[str, str] | None:
    """(base adjective, 'er' or 'est') of a comparative or superlative attribute ("older" -> old)."""
    for suffix in ("er", "est"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            for base in (stem, stem + "e", stem[:-1] if stem[-1] == stem[-2] else "",
                         stem[:-1] + "y" if stem.endswith("i") else ""):
                if base and (base in res.attr_category or base in res.antonyms) and comparative(base, suffix) == word:
                    return base, suffix
    return None


def _replacements(res: Resources, word: str, present: set[str]) -> list[str]:
    options = _attribute_options(res, word, present)
    if options or word in res.attr_category:
        return options
    graded = _graded(res, word)
    if graded is None:
        return []
    base, suffix = graded
    forms = (comparative(o, suffix) for o in _attribute_options(res, base, present))
    return [f for f in forms if f and f != word]


_ANIMATE = frozenset(("noun.person", "noun.animal", "noun.group"))
_UPRIGHT = {"standing": ("lying",), "lying": ("standing",), "laying": ("standing",)}  # a bicycle, a sign


def _state_participle(res: Resources, p: Parse, i: int) -> list[str]:
    """Replacements for a posture or expression participle describing a person or an animal ("a man
    standing", "dogs that are sitting", "a smiling boy") within its group; a thing only stands or
    lies (sinks "sitting" next to a toilet are only located); [] for any other word."""
    form = res.verb_forms.get(p.words[i].lower())
    if form is None or form[1] != "ing" or form[0] not in res.state_verbs or i == 0:
        return []
    if p.tags[i - 1] in ("DET", "ADJ") and i + 1 < len(p.tags) and p.tags[i + 1] == "NOUN":
        subject = next((np for np in p.nps if np.start <= i + 1 < np.end), None)  # "a smiling boy"
    elif p.tags[i] == "VERB" and p.words[i - 1].lower() in ("while", "and") and p.nps and p.nps[0].end < i:
        subject = p.nps[0]  # "a man wearing a hat while standing": the caption's subject
    elif p.tags[i] == "VERB":
        end = i - 1 if p.words[i - 1].lower() in _BE_NUMBER else i
        if end < i and end > 0 and p.words[end - 1].lower() in ("that", "who", "which"):
            end -= 1
        subject = next((np for np in p.nps if np.end == end), None)
    else:
        subject = None
    if subject is None:
        return []
    if res.noun_lexname.get(subject.lemma, "noun.person") not in _ANIMATE:  # unknown: "a skier"
        return list(_UPRIGHT.get(p.words[i].lower(), ()))
    return [res.verb_table[v]["ing"] for v in res.state_verbs[form[0]]]


_CLOTHED = frozenset(("in", "wearing", "wears", "wear"))


def _attributive(res: Resources, p: Parse, i: int, np_ends: set[int]) -> bool:
    """Whether an adjective outside a chunked noun phrase still describes something: predicative
    ("the car is (very) red"), a lexicon attribute before a noun ("a large number of") or after a
    noun as a participle ("cars parked along"), a colour worn ("a man in white") or a material
    something is made of ("a vase made of clay")."""
    words = [w.lower() for w in p.words]
    if i > 1 and words[i - 2:i] == ["made", "of"] and res.attr_category.get(words[i]) == "material":
        return True
    if p.tags[i] != "ADJ":
        return False
    j = i - 1 if i > 0 and p.tags[i - 1] == "ADV" else i
    if j > 0 and words[j - 1] in _BE_NUMBER:
        return True
    if words[i] not in res.attr_category:
        return False
    return (i + 1 < len(words) and p.tags[i + 1] == "NOUN") or (i in np_ends and words[i].endswith("ed")) or (
        i > 0 and words[i - 1] in _CLOTHED and res.attr_category[words[i]] == "color")


def replace_attribute(res: Resources, p: Parse, rng: random.Random, wide: bool = False) -> list[Edit]:
    """One attribute changes within its category (red -> blue), opposites first (big -> small);
    other adjectives become a WordNet antonym (direct, else of the head they are similar to),
    comparatives stay comparatives (older -> younger), and a subject's posture or expression
    changes within its group (a man standing -> a man sitting). `wide`: WIDE_OPTIONS options."""
    out = []
    present = {w.lower() for w in p.words}
    in_phrase = {i for np in p.nps for i in np.attrs}
    np_ends = {np.end for np in p.nps}
    owner = {i: np for np in p.nps for i in np.attrs}
    for i, tag in enumerate(p.tags):
        if i not in in_phrase and not _attributive(res, p, i, np_ends):
            options = _state_participle(res, p, i)[:4]
        elif i in owner and owner[i].lemma in _YOUTHFUL and res.attr_category.get(p.words[i].lower()) == "age":
            options = []  # "a young girl" -> "an old girl": the noun says its age
        else:
            options = _replacements(res, p.words[i].lower(), present)
        for choice in (options[:WIDE_OPTIONS] if wide else [rng.choice(options[:8])] if options else []):
            out.append(splice(p, [(i, i + 1, [match_case(p.words[i], choice)], None)]))
    rng.shuffle(out)
    return out


_LEVEL_WAYS = frozenset(("street", "road", "sidewalk", "path", "lane", "alley", "avenue", "highway",
                         "walkway", "boulevard", "driveway", "hallway", "corridor", "aisle", "runway"))


def _participle(res: Resources, word: str) -> bool:
    """A past participle ("filled", "topped", "made"): what it is done with is not a relation."""
    form = res.verb_forms.get(word)
    return (form is not None and form[1] == "past") or (word.endswith("ed") and len(word) > 4)


def _animate_before(res: Resources, p: Parse, i: int) -> bool:
    """The noun phrase closest before word i (its subject, as far as a caption tells) names a
    person or an animal, or is unknown; True where there is none."""
    subject = max((np for np in p.nps if np.end <= i), key=lambda np: np.end, default=None)
    return subject is None or res.noun_lexname.get(subject.lemma, "noun.person") in _ANIMATE


def replace_relation(res: Resources, p: Parse, rng: random.Random, wide: bool = False) -> list[Edit]:
    """A spatial relation becomes an opposite or contrasting one (left of -> right of, on -> next
    to) or an action verb another of its group (sitting -> standing). Two choices per relation:
    every relation's first choice comes before any second one. `wide`: every relation choice and
    the WIDE_VERBS first verbs of the group."""
    first, second = [], []
    for i, word in enumerate(p.words):
        lower = word.lower()
        if p.kinds[i] == "rel" or (p.tags[i] == "ADP" and lower in res.relations):
            forms = list(res.relations[lower])
            if lower == "with" and i > 0 and _participle(res, p.words[i - 1].lower()):
                forms = [f for f in forms if f != "without"]  # "filled with" -> "filled without"
            if lower in ("up", "down") and any(np.start == i + 1 and np.lemma in _LEVEL_WAYS for np in p.nps):
                continue  # "walking down a street" is "walking up a street": along it, both
            if not forms:
                continue
        elif p.tags[i] == "VERB" and lower in res.verb_forms:
            base, form = res.verb_forms[lower]
            if form not in ("ing", "s") or not res.verb_candidates.get(base):
                continue
            if base in res.state_verbs and not _animate_before(res, p, i):
                continue  # "chairs sitting in a room": a thing's posture only says where it is
            forms = [res.verb_table[v][form] for v in res.verb_candidates[base][:WIDE_VERBS if wide else 4]]
        else:
            continue
        chosen = forms if wide else rng.sample(forms, min(2, len(forms)))
        for n, choice in enumerate(chosen):
            (first if n == 0 else second).append(splice(p, [(i, i + 1, [match_case(word, choice)], None)]))
    rng.shuffle(first)
    rng.shuffle(second)
    return first + second


def _count_value(res: Resources, word: str) -> int | None:
    if word.isdigit():
        value = int(word)
        return value if 0 < value <= res.max_digit else None
    return res.counts.get(word)


def replace_count(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """A count changes (two dogs -> three dogs), with noun and verb number kept in agreement."""
    out = []
    names = {v: w for w, v in res.counts.items()}
    for np in p.nps:
        if np.num is None:
            continue
        word = p.words[np.num].lower()
        value = _count_value(res, word)
        if value is None:
            continue
        top = res.max_digit if word.isdigit() else max(names)
        options = [v for v in (value + 1, value - 1, value + 2, value - 2) if 1 <= v <= top]
        new = rng.choice(options[:2] if value > 1 else options)
        new_word = str(new) if word.isdigit() else names[new]
        edits = [(np.num, np.num + 1, [match_case(p.words[np.num], new_word)], None)]
        plural = new != 1
        if plural != np.plural:
            edits.append((np.head, np.head + 1, [match_case(p.words[np.head], noun_form(res, np.lemma, plural))], None))
            edits.extend(_agree_verb(res, p, np, plural))
        out.append(splice(p, edits))
    rng.shuffle(out)
    return out


_BEFORE_COLOR = ("size", "age", "state", "texture", "shape")


def add_attribute(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """An object gets an attribute it did not have (a dog -> a brown dog), in English word order."""
    out = []
    present = {w.lower() for w in p.words}
    for np in p.nps:
        lexname = res.noun_lexname.get(np.lemma)
        if lexname is None:
            continue
        have = {res.attr_category.get(p.words[i].lower()) for i in np.attrs}
        categories = [c for c in res.add_categories.get(lexname, res.add_categories["default"]) if c not in have]
        if not categories:
            continue
        if np.lemma in _YOUTHFUL:  # "an old little girl", "an adult child"
            categories = [c for c in categories if c != "age"]
            if not categories:
                continue
        category = rng.choice(categories)
        options = [w for w in res.categories[category] if w not in present
                   and (category != "age" or not _person_like(res, np.lemma) or w in _PERSON_AGES)]
        if not options:
            continue
        first_noun = np.nouns_start
        if category == "material":
            at = first_noun
        elif category == "color":
            at = next((i for i in np.attrs if res.attr_category.get(p.words[i].lower()) == "material"), first_noun)
        else:
            at = np.attrs[0] if np.attrs else first_noun
        # the new word takes the gap before the unit it precedes; that unit gets a plain space
        out.append(splice(p, [(at, at + 1, [rng.choice(options), p.words[at]], [p.gaps[at], " "])]))
    rng.shuffle(out)
    return out


def add_object(res: Resources, p: Parse, rng: random.Random) -> list[Edit]:
    """Another object joins one that is there (a dog on a couch -> a dog and a cat on a couch)."""
    out = []
    present = {np.lemma for np in p.nps}
    for np in reversed(p.nps):
        nxt = p.words[np.end].lower() if np.end < len(p.words) else ""
        if nxt.startswith("'") or nxt in _SINGULAR_VERBS or (np.end < len(p.words) and p.tags[np.end] == "VERB"
                                      and res.verb_forms.get(nxt, ("", ""))[1] == "s"):
            continue  # "a dog and a cat is" would break verb agreement
        options = [c for c in res.noun_candidates.get(np.lemma, ()) if c not in present]
        if options:
            noun = rng.choice(options[:6])
            out.append(splice(p, [(np.end, np.end, ["and", "a", noun], [" ", " ", " "])]))
    return out


GENERATORS: dict[str, Callable[[Resources, Parse, random.Random], list[Edit]]] = {
    "swap_attributes": swap_attributes,
    "swap_objects": swap_objects,
    "replace_attribute": replace_attribute,
    "replace_object": replace_object,
    "replace_relation": replace_relation,
    "replace_count": replace_count,
    "add_attribute": add_attribute,
    "add_object": add_object,
    "shuffle_order": shuffle_order,
}
assert tuple(GENERATORS) == NEGATIVE_TYPES
# with a plausibility filter, these types offer several options per replaced word (`wide`), and
# these are drawn PLAUSIBILITY_DRAWS times: the filter then has more plausible candidates to keep
WIDE_TYPES = frozenset(("replace_object", "replace_attribute", "replace_relation"))
REDRAWN_TYPES = frozenset(("replace_count", "add_attribute", "add_object"))
PLAUSIBILITY_DRAWS = 2



def noun_phrases(parse: Parse) -> list[str]:
    """The caption's noun phrases as lower-case text, sorted: equal for captions that differ only
    in the order of their phrases."""
    return sorted(" ".join(parse.words[n.start:n.end]).lower() for n in parse.nps)


_WORD = re.compile(r"(?<![\w'])[A-Za-z][A-Za-z'-]*")


def _title_case_words(caption: str) -> frozenset[str] | None:
    """For a caption in title case (every word of 4+ letters capitalised, at least two), its
    words as written after the first (capitalised in any case: "A Dog on the Beach" keeps "a"
    lower case); None for any other caption."""
    words = _WORD.findall(caption)
    long = [w for w in words if len(w) >= 4]
    if len(long) < 2 or not all(w[0].isupper() for w in long):
        return None
    return frozenset(words[1:])


def _in_title_case(res: Resources, text: str, caption_words: frozenset[str] | None) -> str:
    """`text` with the words an edit brought in lower case capitalised as its title-case caption's
    are (else a lower-case word in a title-case caption tells the negative apart). Where the
    caption keeps its small words lower case ("A Dog on the Couch"), new function words and
    relations stay lower case too ("A Dog under the Couch")."""
    if caption_words is None:
        return text
    lower = {w for w in caption_words if w[0].islower()}
    relation_words = {w for relation in res.relations for w in relation.split()} if lower else set()
    small = lambda w: w in lower or (bool(lower) and (w in res.closed or w in relation_words) and (
        w[0].upper() + w[1:] not in caption_words))  # "A Dog on the Beach Next To A Ball": "A"
    return _WORD.sub(lambda m: m.group(0) if m.group(0)[0].isupper() or small(m.group(0))
                     else m.group(0)[0].upper() + m.group(0)[1:], text)


class NegativeGenerator:
    """Turns a caption into up to k typed hard negatives `{"text", "type"}`.

    Cheap to build and to pickle (DataLoader workers get a copy); WordNet tables, taggers and the
    optional masked LM load lazily once per process.
    """

    def __init__(self, types: tuple[str, ...] | str | None = NEGATIVE_TYPES, seed: int = 0,
                 lm_path: str | None = None, tagger: str = "auto",
                 vocabulary: frozenset[str] | None = None,
                 plausibility: "str | PlausibilityModel | None" = None, swap_reorders: bool = True,
                 exclude: Collection[str] = ()):
        self.types = parse_types(types if isinstance(types, str) or types is None else ",".join(types))
        if tagger not in ("auto", "nltk", "lexicon"):
            raise ValueError(f"tagger must be auto, nltk or lexicon, got {tagger!r}")
        self.seed = int(seed)
        self.lm_path = lm_path
        self.tagger = tagger
        # None: any word of the lexicons; else negatives only bring in words of this set
        self.vocabulary = None if vocabulary is None else frozenset(w.lower() for w in vocabulary)
        # the process cache's key: a copy pickled into a worker holds an equal, not the same,
        # set, and comparing large sets per caption would cost milliseconds
        self._vocabulary_key = None if vocabulary is None else hashlib.sha1(
            "\n".join(sorted(self.vocabulary)).encode()).hexdigest()
        # None: no filter; else candidates are kept only when they read about as plausibly as
        # their positive (a caption file or saved model path is resolved, cached, here)
        self.plausibility = resolve_plausibility(plausibility) if isinstance(plausibility, (str, os.PathLike)) \
            else plausibility
        # False: swap negatives that only put the caption's noun phrases in another order are
        # dropped (see `reorders`)
        self.swap_reorders = bool(swap_reorders)
        # texts never yielded (normalised): e.g. an evaluation's positive captions
        self.exclude = frozenset(normalise(text) for text in exclude)

    def __repr__(self) -> str:
        words = "" if self.vocabulary is None else f", vocabulary={len(self.vocabulary)} words"
        words += "" if self.plausibility is None else f", plausibility={self.plausibility!r}"
        words += "" if self.swap_reorders else ", swap_reorders=False"
        words += f", exclude={len(self.exclude)} texts" if self.exclude else ""
        return f"NegativeGenerator(types={self.types}, seed={self.seed}, lm_path={self.lm_path!r}{words})"

    def _resources(self) -> Resources:
        """The lexicon tables, restricted to the vocabulary when there is one (once per process)."""
        if self.vocabulary is None:
            return _resources()
        key = f"vocabulary:{self._vocabulary_key}"
        if key not in _PROCESS:
            _PROCESS[key] = restrict_to_vocabulary(_resources(), self.vocabulary)
        return _PROCESS[key]

    @property
    def tagger_name(self) -> str:
        """The POS tagger this process parses with ("nltk" or "lexicon"; auto: whichever has its
        data here). The two parse some captions differently, so it is recorded with outputs."""
        return _tagger(self.tagger).name

    def load(self) -> "NegativeGenerator":
        """Load the per-process resources now (otherwise the first generate() call does it)."""
        self._resources()
        _tagger(self.tagger)
        if self.lm_path:
            self._lm()
        return self

    def _lm(self):
        from .lm import MaskedLMProposer

        key = f"lm:{self.lm_path}"
        if key not in _PROCESS:
            _PROCESS[key] = MaskedLMProposer(self.lm_path)
        return _PROCESS[key]

    def parse(self, caption: object) -> Parse | None:
        text = clean_caption(caption)
        if text is None:
            return None
        return parse_caption(text, _resources(), _tagger(self.tagger))

    def _edits(self, res: Resources, parse: Parse, name: str, rng: random.Random) -> list[Edit]:
        if self.plausibility is not None and name in WIDE_TYPES:
            edits = GENERATORS[name](res, parse, rng, wide=True)
        else:
            edits = GENERATORS[name](res, parse, rng)
        if self.lm_path and name in LM_TYPES:
            edits = self._lm().edits(res, parse, name, rng) + edits
        if self.plausibility is not None:
            edits = self._plausible(res, parse, name, rng, edits)
        return edits

    def _plausible(self, res: Resources, parse: Parse, name: str, rng: random.Random,
                   edits: list[Edit]) -> list[Edit]:
        """More draws (some types), then only the candidates the plausibility model scores within its
        margin of their positive, most plausible first (a caption may keep none of a type: a masked
        slot)."""
        for _ in range(PLAUSIBILITY_DRAWS - 1 if name in REDRAWN_TYPES else 0):
            edits = edits + GENERATORS[name](res, parse, rng)
        unique: dict[tuple, Edit] = {}
        for words, gaps in edits:  # a redraw repeats candidates: score each once, keep the first
            unique.setdefault(tuple(words), (words, gaps))
        edits = list(unique.values())
        # scored on the words alone: the gaps between them hold no word characters
        order = plausible_order(self.plausibility, " ".join(parse.words), [words for words, _ in edits],
                                name.startswith("add_"))
        return [edits[i] for i in order]

    def exchange_related_objects(self, caption: object, relation_words: Collection[str]) -> str | None:
        """`caption` with the two objects of its spatial relation exchanged (see the function of
        that name); None where that is ambiguous or the caption unusable."""
        parse = self.parse(caption)
        if parse is None:
            return None
        edit = exchange_related_objects(_resources(), parse, relation_words)
        return None if edit is None else parse.render(*edit)

    def related_objects(self, caption: object, relation_words: Collection[str]
                        ) -> tuple[list[str], list[str]] | None:
        """The words of the subject and object phrases of `caption`'s one relation along
        `relation_words` (see `related_phrases`); None where that is ambiguous."""
        parse = self.parse(caption)
        phrases = None if parse is None else related_phrases(parse, relation_words)
        return None if phrases is None else tuple(parse.words[np.start:np.end] for np in phrases)

    def candidates(self, caption: object, k: int = 1_000_000) -> dict[str, list[str]]:
        """Every type's valid candidate texts for `caption` (used by `show`), best first."""
        found: dict[str, list[str]] = {}
        for item in self._iterate(caption, k, round_robin=False):
            found.setdefault(item["type"], []).append(item["text"])
        return found

    def generate(self, caption: object, k: int) -> list[dict[str, str]]:
        """Up to k negatives spread over the applicable types; [] for unusable captions."""
        if k <= 0:
            return []
        return list(self._iterate(caption, k, round_robin=True))

    def _in_vocabulary(self, text: str, own_words: set[str]) -> bool:
        """Every word the negative brings in (beyond the caption's own) is in the vocabulary."""
        return self.vocabulary is None or all(
            w in self.vocabulary or w in own_words for w in text.split())

    def reorders(self, caption_phrases: list[str], text: str) -> bool:
        """`text` holds the caption's noun phrases (`noun_phrases` of its parse), only in another
        order ("a dog chasing a cat" -> "a cat chasing a dog"): a relation negative in effect,
        which only an image tower that reads positions can tell apart; every other swap rebinds
        (attributes or nouns move between objects that keep their places)."""
        parse = self.parse(text)  # the caption's own parser (full lexicons), not `res`
        return parse is not None and noun_phrases(parse) == caption_phrases

    def _iterate(self, caption: object, k: int, round_robin: bool):
        """Yield valid negatives type by type (round robin: one per type per round).

        Types are only expanded when reached, so K=4 of nine types does about half the work.
        Nothing equal to the positive (after normalisation), to an earlier negative or to an
        excluded text is yielded.
        """
        parse = self.parse(caption)
        if parse is None:
            return
        res = self._resources()
        rng = random.Random(zlib.crc32(f"{self.seed}\0{k}\0{caption}".encode("utf-8", "replace")))
        positive = parse.render(parse.words, parse.gaps)
        seen = {normalise(positive)}
        shouting = positive.isupper()  # "A DOG ON A COUCH": inserted and re-inflected words too
        title_case = _title_case_words(positive)  # "A Red Car Next To A Blue House": likewise
        own_words = set(next(iter(seen)).split())
        own_doubles = doubled_words(next(iter(seen)))
        caption_phrases = None if self.swap_reorders else noun_phrases(parse)
        order = list(self.types)
        rng.shuffle(order)
        edits: dict[str, list[Edit]] = {}
        cursor = dict.fromkeys(order, 0)
        emitted = 0
        while emitted < k:
            progressed = False
            for name in order:
                if name not in edits:
                    edits[name] = self._edits(res, parse, name, rng)
                pending = edits[name]
                while cursor[name] < len(pending):
                    words, gaps = pending[cursor[name]]
                    cursor[name] += 1
                    text = parse.render(words, gaps)
                    text = text.upper() if shouting else _in_title_case(res, text, title_case)
                    key = normalise(text)
                    if key in seen or key in self.exclude or not self._in_vocabulary(key, own_words) \
                            or not doubled_words(key) <= own_doubles:
                        continue
                    if caption_phrases is not None and name in SWAP_TYPES and \
                            self.reorders(caption_phrases, text):
                        continue
                    seen.add(key)
                    emitted += 1
                    progressed = True
                    yield {"text": text, "type": name}
                    if round_robin or emitted >= k:
                        break
                if emitted >= k:
                    return
            if not progressed:
                return
