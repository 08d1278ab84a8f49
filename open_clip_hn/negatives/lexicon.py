"""Lexicons (data files) plus the WordNet facts the generator needs, cached on disk.

Loading NLTK's WordNet reader costs seconds, and loader workers start often, so everything the
generator asks WordNet (POS sets, inflection exceptions, which replacements are co-hyponyms and
which are synonyms, hypernyms or hyponyms) is computed once into a pickle keyed by the data files,
the WordNet files and this module's version. Later processes only unpickle it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from ..files import atomic_open

DATA_DIR = Path(__file__).with_name("data")
CACHE_VERSION = 5
# Hypernyms too general to make two nouns co-hyponyms ("a dog" and "a banana" are both organisms).
GENERIC_SYNSETS = frozenset((
    "entity.n.01", "physical_entity.n.01", "abstraction.n.06", "object.n.01", "whole.n.02",
    "artifact.n.01", "living_thing.n.01", "organism.n.01", "matter.n.03", "causal_agent.n.01",
    "instrumentality.n.03", "attribute.n.02", "location.n.01", "substance.n.01", "unit.n.03",
    "group.n.01", "psychological_feature.n.01", "measure.n.02", "relation.n.01", "part.n.02",
    "thing.n.12", "physical_object.n.01", "structure.n.01", "container.n.01", "device.n.01",
    "covering.n.02", "equipment.n.01", "natural_object.n.01", "social_group.n.01",
))
MAX_NOUN_CANDIDATES = 12
# objects.txt's sections ("# people", ...) and the WordNet classes a noun of each may mean, best
# first: "burger" is food, not a "burgher"; "banana" the fruit before the plant; a "tiger" an animal
SECTION_LEXNAMES: dict[str, tuple[str, ...]] = {
    "people": ("noun.person",),
    "people: roles": ("noun.person",),
    "animals": ("noun.animal",),
    "vehicles": ("noun.artifact",),
    "street": ("noun.artifact", "noun.object", "noun.location", "noun.communication"),
    "furniture / indoor": ("noun.artifact", "noun.object", "noun.communication"),
    "sports": ("noun.artifact",),
    "food": ("noun.food", "noun.plant"),
    "nature / places": ("noun.object", "noun.plant", "noun.location", "noun.phenomenon",
                        "noun.substance", "noun.artifact"),
    "shapes (CLEVR-style scenes)": ("noun.shape", "noun.artifact", "noun.object"),
}
# a person named by a role ("doctor", "skier") may be any man, woman or child: never one's negative
ROLE_SECTION = "people: roles"
# people words that can name the same person as another kind or role: a child is a boy or a girl,
# a surfer is a rider, anyone a tourist; never replaced by those or replacing them
COMPATIBLE_PEOPLE = (
    ({"child", "kid", "baby"}, {"boy", "girl"}),
    ({"player", "rider", "student", "worker", "tourist"}, None),  # None: every other person
)
# An indirect antonym ("rainy" is similar to "wet", whose antonym is "dry") is only used when it is a
# common word: rare ones ("unrhetorical") mostly come from a sense a caption does not mean.
MIN_INDIRECT_ANTONYM_TAGS = 3


@dataclass
class Resources:
    """Everything the tagger and the generator look up, as plain dicts and sets."""

    pos_of: dict[str, str]  # lemma -> WordNet POS letters, most frequent first ("nv", "a", ...)
    exceptions: dict[str, tuple[str, str]]  # irregular inflected form -> (lemma, pos letter)
    closed: dict[str, str]  # closed-class word -> universal tag
    nouns: dict[str, tuple[str, bool]]  # noun form (vocabulary) -> (lemma, plural?)
    plurals: dict[str, str]  # vocabulary lemma -> plural form
    noun_lexname: dict[str, str]  # vocabulary lemma -> WordNet lexname of its first sense
    noun_candidates: dict[str, tuple[str, ...]]  # lemma -> co-hyponyms, closest first
    related_nouns: frozenset  # frozenset({a, b}) pairs that are synonyms/hypernyms/hyponyms
    attr_category: dict[str, str]  # attribute word -> category
    attr_candidates: dict[str, tuple[str, ...]]  # attribute -> replacements, opposites first
    antonyms: dict[str, tuple[str, ...]]  # any WordNet adjective -> direct (else indirect) antonyms
    add_categories: dict[str, tuple[str, ...]]  # noun lexname -> attribute categories to add
    categories: dict[str, tuple[str, ...]]  # attribute category -> words
    relations: dict[str, tuple[str, ...]]  # spatial relation -> opposites
    symmetric_relations: frozenset  # relations that hold both ways ("next to")
    verb_forms: dict[str, tuple[str, str]]  # verb form -> (base, form name: base/s/ing/past)
    verb_table: dict[str, dict[str, str]]  # base -> {form name: text}
    verb_candidates: dict[str, tuple[str, ...]]  # base -> replacements, same WordNet class first
    state_verbs: dict[str, tuple[str, ...]]  # posture/expression verb -> replacements in its group
    multiword: dict[str, tuple[tuple[str, ...], ...]]  # first word -> word sequences, longest first
    counts: dict[str, int]  # number word -> value
    max_digit: int
    collective: frozenset  # nouns that head "a bunch of ..." phrases


def _read_json(name: str) -> dict:
    with open(DATA_DIR / name, encoding="utf-8") as handle:
        return json.load(handle)


def _read_objects() -> list[tuple[str, str, str, str]]:
    """(singular, plural, pinned WordNet sense or '', section) rows of objects.txt; a section is
    a comment line naming one of `SECTION_LEXNAMES`."""
    rows, section = [], ""
    for line in (DATA_DIR / "objects.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#") and line[1:].strip() in SECTION_LEXNAMES:
            section = line[1:].strip()
        if not line or line.startswith("#"):
            continue
        singular, plural, sense = (line.split("|") + ["", ""])[:3]
        rows.append((singular, plural or regular_plural(singular), sense, section))
    return rows


def regular_plural(noun: str) -> str:
    """English plural by the regular spelling rules (irregulars are listed in objects.txt)."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if len(noun) > 1 and noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


# The code that builds the tables, as this process loaded it: a process still running older code
# must not write its tables under the key of newer code (another worker reads them).
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _fingerprint(wordnet_path: str) -> str:
    """Cache key: this module's code and version, the data files and WordNet's content (by file
    sizes, so a copy of the same WordNet elsewhere, e.g. after setup-nltk, reuses the cache)."""
    digest = hashlib.sha256(f"{CACHE_VERSION}:{_SOURCE}".encode())
    for item in sorted(DATA_DIR.iterdir()):
        digest.update(item.name.encode() + item.read_bytes())
    root = Path(wordnet_path)
    for name in ("index.noun", "data.noun", "index.adj", "data.verb"):
        probe = root / name
        digest.update(f"{name}:{probe.stat().st_size if probe.exists() else wordnet_path}".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the WordNet cache lives: $OPEN_CLIP_HN_CACHE, else ~/.cache/open_clip_hn."""
    env = os.environ.get("OPEN_CLIP_HN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "open_clip_hn"


def load_resources() -> Resources:
    """Load the cached resources, building the cache from WordNet on first use; a WordNet that
    is present but damaged (a file missing or cut short) is an `NLTKDataError` naming the fix."""
    from .nltk_data import damaged_wordnet, ensure_wordnet

    wordnet_path = ensure_wordnet()
    path = cache_dir() / f"negatives-{_fingerprint(wordnet_path)}.pkl"
    try:
        with open(path, "rb") as handle:
            cached = pickle.load(handle)
        if isinstance(cached, Resources) and all(hasattr(cached, f.name) for f in fields(Resources)):
            return cached
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError):
        pass
    try:
        with warnings.catch_warnings():  # NLTK warns per synset a cut data file lacks, and goes on
            warnings.filterwarnings("error", message="No WordNet synset found", category=UserWarning)
            resources = build_resources()
    except (OSError, LookupError, ValueError, AttributeError, IndexError, UserWarning) as err:
        raise damaged_wordnet(wordnet_path, err) from None
    try:
        with atomic_open(path, "wb") as handle:
            pickle.dump(resources, handle, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:
        pass  # a read-only home still works, it just rebuilds per process
    return resources


def _index_pos(wn) -> dict[str, str]:
    """lemma -> POS letters ordered by tagged-sense count, read from WordNet's index files."""
    scores: dict[str, list[tuple[int, int, str]]] = {}
    for pos, filename in (("n", "index.noun"), ("v", "index.verb"), ("a", "index.adj"), ("r", "index.adv")):
        with wn.open(filename) as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                fields = line.split()
                lemma = fields[0]
                if "_" in lemma or not lemma.isalpha():
                    continue
                pointer_count = int(fields[3])
                synset_count = int(fields[2])
                tagged = int(fields[5 + pointer_count])
                scores.setdefault(lemma, []).append((tagged, synset_count, pos))
    return {lemma: "".join(p for _, _, p in sorted(items, reverse=True)) for lemma, items in scores.items()}


def _exceptions(wn) -> dict[str, tuple[str, str]]:
    table = {}
    for pos, filename in (("n", "noun.exc"), ("v", "verb.exc"), ("a", "adj.exc")):
        with wn.open(filename) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0].isalpha():
                    table.setdefault(fields[0], (fields[1], pos))
    return table


def _ancestors(synset) -> dict:
    """synset -> depth for the synset and all its hypernyms (instance hypernyms too)."""
    seen = {}
    stack = [synset]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen[node] = node.max_depth()
        stack.extend(node.hypernyms() + node.instance_hypernyms())
    return seen


def _related(synsets_a: list, synsets_b: list, closure_a: set, closure_b: set) -> bool:
    """Same synset, or one word's sense is a hypernym of the other's (any senses)."""
    return bool(set(synsets_a) & set(synsets_b)) or bool(set(synsets_b) & closure_a) or bool(
        set(synsets_a) & closure_b)


VISUAL_LEXNAMES = ("noun.Tops", "noun.artifact", "noun.animal", "noun.person", "noun.food", "noun.plant",
                   "noun.object", "noun.shape", "noun.location", "noun.body", "noun.substance",
                   "noun.phenomenon")


def _noun_synsets(wn, noun: str) -> list:
    """Noun senses; a multi-word noun WordNet lacks ("stop sign") falls back to its head word."""
    return wn.synsets(noun.replace(" ", "_"), "n") or wn.synsets(noun.split()[-1], "n")


def _visual_sense(synsets: list, lexnames: tuple[str, ...] = ()):
    """The sense of the first of `lexnames` (the noun's section) that the noun has, the most
    frequent first; else the most frequent sense that names something visible (a 'table' is
    furniture, not data)."""
    for lexname in lexnames:
        sense = next((s for s in synsets if s.lexname() == lexname), None)
        if sense is not None:
            return sense
    return next((s for s in synsets if s.lexname() in VISUAL_LEXNAMES), synsets[0])


def _noun_tables(wn, lemmas: list[str], pinned: dict[str, str], sections: dict[str, str]):
    """Lexnames, co-hyponym candidates and related (never-swap, never-replace) pairs. A noun
    means a sense of its section's classes; candidates of its own section come first; people
    words that may name the same person ("doctor" and "man", "child" and "boy") are never each
    other's replacement."""
    synsets = {w: _noun_synsets(wn, w) for w in lemmas}
    closure = {w: {a for s in synsets[w] for a in _ancestors(s)} for w in lemmas}
    sense = {w: wn.synset(pinned[w]) if pinned.get(w) else
             _visual_sense(synsets[w], SECTION_LEXNAMES.get(sections.get(w, ""), ()))
             for w in lemmas if synsets[w]}
    role = {w: sections.get(w) == ROLE_SECTION for w in lemmas}
    person = {w: sections.get(w, "").startswith("people") for w in lemmas}

    def compatible(a: str, b: str) -> bool:
        """Two people words that may name the same person (a role and a kind, `COMPATIBLE_PEOPLE`)."""
        if not (person[a] and person[b]):
            return False
        if role[a] != role[b]:
            return True
        for one, other in COMPATIBLE_PEOPLE:
            for x, y in ((a, b), (b, a)):
                if x in one and (other is None or y in other):
                    return True
        return False

    first = {w: _ancestors(s) for w, s in sense.items()}
    lexname = {w: s.lexname() for w, s in sense.items()}
    related, candidates = set(), {}
    for a in lemmas:
        scored = []
        for b in lemmas:
            if a == b:
                continue
            if set(synsets[a]) & set(synsets[b]) or (b in sense and sense[b] in closure[a]) or (
                    a in sense and sense[a] in closure[b]):
                related.add(frozenset((a, b)))
            elif a in first and b in first and not compatible(a, b):
                shared = [s for s in first[a].keys() & first[b].keys() if s.name() not in GENERIC_SYNSETS]
                if shared:
                    scored.append((-max(first[a][s] for s in shared), b))
        if scored:
            scored.sort()
            floor = -scored[0][0] - 2
            close = [(d, b) for d, b in scored[:MAX_NOUN_CANDIDATES] if -d >= floor]
            close.sort(key=lambda db: (sections.get(db[1]) != sections.get(a), db))
            candidates[a] = tuple(b for _, b in close)
    for a in first:  # no close co-hyponym: the nearest unrelated nouns of its class (else of its
        if not candidates.get(a):  # section), its section's first
            unrelated = [b for b in first if b != a and frozenset((a, b)) not in related
                         and not compatible(a, b)]
            same = [b for b in unrelated if lexname[b] == lexname[a]] or [
                b for b in unrelated if sections.get(b) == sections.get(a)]
            same.sort(key=lambda b: (sections.get(b) != sections.get(a),
                                     -(sense[a].path_similarity(sense[b]) or 0.0), b))
            candidates[a] = tuple(same[:MAX_NOUN_CANDIDATES])
    return lexname, candidates, frozenset(related)


def _adjective_related(wn, a: str, b: str, synonyms: frozenset) -> bool:
    """Curated synonyms, same adjective synset or linked by similar_to: not negatives."""
    if frozenset((a, b)) in synonyms:
        return True
    sa, sb = set(wn.synsets(a.replace(" ", "_"), "a")), set(wn.synsets(b.replace(" ", "_"), "a"))
    if sa & sb:
        return True
    return any(set(s.similar_tos()) & sb for s in sa) or any(set(s.similar_tos()) & sa for s in sb)


def _adjective_tags(wn) -> dict[str, int]:
    """Adjective lemma -> tagged-sense count in WordNet's index (a corpus frequency)."""
    tags = {}
    with wn.open("index.adj") as handle:
        for line in handle:
            if not line.startswith(" "):
                fields = line.split()
                tags[fields[0]] = int(fields[5 + int(fields[3])])
    return tags


def _adjective_antonyms(wn, lexicon: set[str], pos_of: dict[str, str]) -> dict[str, list[str]]:
    """Antonyms of adjectives. Lexicon words get the direct antonyms of all their senses (only used
    to rank their own category). Other adjectives get those of their first sense, else the common
    antonyms of the head that sense is similar to ("rainy" ~ "wet" -> "dry", "fried" ~ "cooked" ->
    "raw"); relational adjectives ("electrical"), antonyms that are mostly not adjectives ("fallen"
    -> "up"), "non-" words and "un-" + participle ones ("colored" -> "uncolored") are left out as
    unnatural."""
    antonyms: dict[str, list[str]] = {}
    for synset in wn.all_synsets("a"):
        for lemma in synset.lemmas():
            name = lemma.name()
            if name in lexicon:
                for antonym in lemma.antonyms():
                    if antonym.name().isalpha() and antonym.name() not in antonyms.get(name, []):
                        antonyms.setdefault(name, []).append(antonym.name())
    tags = _adjective_tags(wn)
    for word in tags:
        if word in lexicon or not word.isalpha():
            continue
        synsets = wn.synsets(word, "a")
        if not synsets or synsets[0].lexname() == "adj.pert":
            continue
        first = synsets[0]
        found = [a.name() for lemma in first.lemmas() if lemma.name() == word for a in lemma.antonyms()]
        if not found and first.pos() == "s":
            found = [a.name() for head in first.similar_tos() for lemma in head.lemmas() for a in lemma.antonyms()
                     if tags.get(a.name(), 0) >= MIN_INDIRECT_ANTONYM_TAGS]
        found = [a for a in found if a.isalpha() and pos_of.get(a, "")[:1] == "a" and not (
            a.startswith("non") or word.endswith("ed") and a in ("un" + word, "dis" + word))]
        if found:
            antonyms[word] = list(dict.fromkeys(found))
    return antonyms


def _verb_tables(wn, bases: list[str], groups: dict[str, list[str]], synonyms: frozenset):
    """Replacement verbs: never synonyms (WordNet's or curated: captions say "laying" for "lying"),
    hypernyms or troponyms; the verb's own curated group first (posture, motion, ...) in the
    group's order, then its WordNet lexicographer class, then the rest."""
    group_of = {v: name for name, verbs in groups.items() for v in verbs}
    rank = {v: i for verbs in groups.values() for i, v in enumerate(verbs)}
    synsets = {v: wn.synsets(v, "v") for v in bases}
    closure = {v: {a for s in synsets[v] for a in _ancestors(s)} for v in bases}
    lexname = {v: synsets[v][0].lexname() if synsets[v] else "" for v in bases}
    candidates = {}
    for a in bases:
        valid = [b for b in bases if b != a and frozenset((a, b)) not in synonyms
                 and not _related(synsets[a], synsets[b], closure[a], closure[b])]
        same_group = sorted((b for b in valid if a in group_of and group_of.get(b) == group_of[a]), key=rank.get)
        same_class = [b for b in valid if lexname[b] == lexname[a] and b not in same_group]
        candidates[a] = tuple(same_group + same_class + [b for b in valid if b not in same_group + same_class])
    return candidates


def build_resources() -> Resources:
    """Compute every table from the data files and NLTK's WordNet (slow: seconds)."""
    from nltk.corpus import wordnet as wn

    attributes = _read_json("attributes.json")
    relations_data = _read_json("relations.json")
    closed_data = _read_json("closed_class.json")
    counts_data = _read_json("counts.json")
    objects = _read_objects()

    nouns, plurals = {}, {}
    for singular, plural, *_ in objects:
        plurals[singular] = plural
        nouns.setdefault(singular, (singular, False))
        nouns.setdefault(plural, (singular, True))
    noun_lexname, noun_candidates, related_nouns = _noun_tables(
        wn, list(plurals), {s: sense for s, _, sense, _ in objects}, {s: section for s, *_, section in objects})

    categories = {c: tuple(dict.fromkeys(ws)) for c, ws in attributes["categories"].items()}
    attr_category = {w: c for c, ws in categories.items() for w in ws}
    opposites: dict[str, list[str]] = {}
    for a, b in attributes["opposites"]:
        opposites.setdefault(a, []).append(b)
        opposites.setdefault(b, []).append(a)
    synonyms = frozenset(frozenset(pair) for pair in attributes.get("synonyms", ()))
    opposites_only = set(attributes.get("opposites_only", ()))
    pos_of = _index_pos(wn)
    antonyms = _adjective_antonyms(wn, set(attr_category), pos_of)
    attr_candidates = {}
    for word, category in attr_category.items():
        first = [o for o in opposites.get(word, []) + antonyms.get(word, [])
                 if attr_category.get(o) == category]
        rest = [] if category in opposites_only else [
            o for o in categories[category] if o != word and o not in first and not _adjective_related(wn, word, o, synonyms)]
        attr_candidates[word] = tuple(dict.fromkeys(first + rest))
    antonyms_all = {w: tuple(v) for w, v in antonyms.items()}
    for word, others in opposites.items():
        antonyms_all[word] = tuple(dict.fromkeys(list(antonyms_all.get(word, ())) + others))

    relations: dict[str, list[str]] = {}
    for a, b in relations_data["spatial"]:
        relations.setdefault(a, []).append(b)
        relations.setdefault(b, []).append(a)
    verb_table, verb_forms = {}, {}
    for base, third, ing, past in relations_data["verbs"]:
        verb_table[base] = {"base": base, "s": third, "ing": ing, "past": past}
        for name, form in (("ing", ing), ("s", third), ("base", base), ("past", past)):
            verb_forms.setdefault(form, (base, name))

    verb_groups = relations_data.get("verb_groups", {})
    verb_synonyms = frozenset(frozenset(pair) for pair in relations_data.get("verb_synonyms", ()))
    verb_candidates = _verb_tables(wn, list(verb_table), verb_groups, verb_synonyms)
    state_groups = [set(verb_groups[name]) for name in attributes.get("state_verb_groups", ())]
    multiword: dict[str, list[tuple[str, ...]]] = {}
    for phrase in [*relations, *attr_category, *(s for s, *_ in objects), *(p for _, p, *_ in objects)]:
        words = tuple(phrase.split())
        if len(words) > 1:
            multiword.setdefault(words[0], []).append(words)
    closed = {}
    for tag, words in closed_data.items():
        if tag.startswith("_"):
            continue
        for word in words:
            closed.setdefault(word, tag)

    return Resources(
        pos_of=pos_of,
        exceptions=_exceptions(wn),
        closed=closed,
        nouns=nouns,
        plurals=plurals,
        noun_lexname=noun_lexname,
        noun_candidates=noun_candidates,
        related_nouns=related_nouns,
        attr_category=attr_category,
        attr_candidates=attr_candidates,
        antonyms=antonyms_all,
        add_categories={k: tuple(v) for k, v in attributes["add_categories"].items()},
        categories=categories,
        relations={k: tuple(dict.fromkeys(v)) for k, v in relations.items()},
        symmetric_relations=frozenset(relations_data.get("symmetric", ())),
        verb_forms=verb_forms,
        verb_table=verb_table,
        verb_candidates=verb_candidates,
        state_verbs={v: tuple(c for c in verb_candidates[v] if c in group) for group in state_groups for v in group
                     if v in verb_candidates},
        multiword={k: tuple(sorted(set(v), key=len, reverse=True)) for k, v in multiword.items()},
        counts=dict(counts_data["words"]),
        max_digit=int(counts_data["max_digit"]),
        collective=frozenset(closed_data.get("_collective_nouns", ())),
    )


def restrict_to_vocabulary(res: Resources, vocabulary: frozenset[str]) -> Resources:
    """`res` whose replacement tables only offer words of `vocabulary` (lower case).

    A negative that brings in a word the training captions never use ("a red cube" -> "a red
    doughnut") is told apart by the text tower alone; inside the data's own words only the image
    can tell it apart. A multi-word replacement needs all its words; a noun its singular or plural,
    a verb any of its forms (the generator still drops a negative whose rendered form, or an
    article or agreement word it adds, is outside the vocabulary).
    """
    def known(phrase: str) -> bool:
        return all(word in vocabulary for word in words_of(phrase))

    def noun(lemma: str) -> bool:
        return known(lemma) or known(res.plurals.get(lemma, regular_plural(lemma)))

    def verb(base: str) -> bool:
        return any(known(form) for form in res.verb_table.get(base, {base: base}).values())

    def keep(table: dict[str, tuple[str, ...]], ok: Callable[[str], bool]
             ) -> dict[str, tuple[str, ...]]:
        return {key: tuple(w for w in words if ok(w)) for key, words in table.items()}

    return replace(
        res,
        noun_candidates=keep(res.noun_candidates, noun),
        attr_candidates=keep(res.attr_candidates, known),
        antonyms=keep(res.antonyms, known),
        categories=keep(res.categories, known),
        relations=keep(res.relations, known),
        verb_candidates=keep(res.verb_candidates, verb),
        state_verbs=keep(res.state_verbs, verb),
    )


_WORD = re.compile(r"[a-z0-9]+")


def words_of(text: str) -> list[str]:
    """Lower-case alphanumeric runs: the words a vocabulary holds and a negative is checked by."""
    return _WORD.findall(text.lower())


class VocabularyError(ValueError):
    """A vocabulary file that cannot be read or holds no words."""


def read_vocabulary(path: str | os.PathLike) -> frozenset[str]:
    """The lower-case words of a text file (a word list, or captions themselves)."""
    expected = "expected a UTF-8 text file of the words negatives may use (e.g. the training captions)"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise VocabularyError(f"vocabulary file {path}: {getattr(err, 'strerror', None) or err}; "
                              f"{expected}") from err
    words = frozenset(words_of(text))
    if not words:
        raise VocabularyError(f"vocabulary file {path} holds no words; {expected}")
    return words
