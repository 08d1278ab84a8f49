"""How plausible a caption reads without its image: a Kneser-Ney trigram model of the user's captions.

A negative that a text-only model can tell from its positive ("a umbrella holding a flowered
child") teaches the text tower to reject odd sentences instead of looking at the image. The
generator uses this model to keep only candidates that read about as plausibly as their positive
(SugarCrepe's adversarial refinement, done online per caption), and `negatives audit` uses it as a
blind scorer.

The model is learned from the user's own captions, nothing is downloaded. It is *cross-fitted*: the
captions are split in two halves by a hash of their words, one interpolated Kneser-Ney trigram
model is fitted per half, and a caption is always scored by the half it is not in, so the model
never judges a caption it memorised (which would make every edit of it look implausible).

Saved as one .npz (arrays only, no pickle): a format version, the tokenisation version and a
digest of the source captions are checked on every load. Built from a caption file, the model is
cached under `cache_dir()` keyed by that digest, so loader workers only load it (no torch here).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..files import atomic_open
from .lexicon import cache_dir, words_of

FORMAT = "open_clip_hn.plausibility/1"
TOKENISATION = "words_of/1"  # lexicon.words_of: lower-case [a-z0-9]+ runs
MIN_CAPTIONS = 200  # below this a half holds too few trigrams to judge anything
ORDER = 3
UNK, BOS, EOS = 0, 1, 2
_BITS = 21  # ids packed into one int per n-gram: up to 2M word types
_FOLD_SALT = "plausibility-fold"


class PlausibilityError(ValueError):
    """A caption set or saved model that cannot serve as a plausibility model."""


def tokens(text: str) -> list[str]:
    """The words a caption is scored by (TOKENISATION)."""
    return words_of(text)


def fold_of(words: list[str], salt: str = _FOLD_SALT) -> int:
    """0 or 1: the half a caption belongs to (a pure function of its words)."""
    return zlib.crc32(f"{salt}\0{' '.join(words)}".encode()) & 1


def _discount(counts: Iterable[int]) -> float:
    """Kneser-Ney's absolute discount n1 / (n1 + 2 n2) from the counts of counts, kept in [0.1, 0.9]."""
    histogram = Counter(c for c in counts if c <= 2)
    n1, n2 = histogram[1], histogram[2]
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return min(max(d, 0.1), 0.9)


class _Half:
    """One interpolated Kneser-Ney trigram model in back-off form (log probabilities, packed keys).

    p3/p2: log P of seen trigrams/bigrams; g3/g2: log of the weight a seen context gives the lower
    order; p1: log P of each word id (unknown words share id 0)."""

    __slots__ = ("p1", "p2", "g2", "p3", "g3")

    def __init__(self, p1: list[float], p2: dict, g2: dict, p3: dict, g3: dict):
        self.p1, self.p2, self.g2, self.p3, self.g3 = p1, p2, g2, p3, g3

    @classmethod
    def fit(cls, sentences: list[list[int]], size: int) -> "_Half":
        """Fit on id sentences (without padding); `size` ids in the vocabulary (UNK, BOS included)."""
        c3: Counter = Counter()
        for ids in sentences:
            padded = [BOS, BOS, *ids, EOS]
            c3.update(zip(padded, padded[1:], padded[2:]))
        n2: Counter = Counter((v, w) for (_, v, w) in c3)  # N1+(. v w)
        n1: Counter = Counter(w for (_, w) in n2)  # N1+(. w)
        d3, d2, d1 = _discount(c3.values()), _discount(n2.values()), _discount(n1.values())
        # unigram: continuation counts interpolated with uniform over the words (UNK, EOS; not BOS)
        total1, types1 = sum(n1.values()), len(n1)
        uniform = d1 * types1 / total1 / (size - 1)
        p1 = [math.log(max(n1.get(w, 0) - d1, 0.0) / total1 + uniform) for w in range(size)]
        p1[BOS] = 0.0  # never predicted
        total2: Counter = Counter()
        follow2: Counter = Counter()
        for (v, _), n in n2.items():
            total2[v] += n
            follow2[v] += 1
        g2 = {v: math.log(d2 * follow2[v] / total2[v]) for v in total2}
        p2 = {(v << _BITS) | w: math.log((n - d2) / total2[v] + math.exp(g2[v] + p1[w]))
              for (v, w), n in n2.items()}
        total3: Counter = Counter()
        follow3: Counter = Counter()
        for (u, v, _), n in c3.items():
            total3[(u, v)] += n
            follow3[(u, v)] += 1
        g3 = {(u << _BITS) | v: math.log(d3 * follow3[(u, v)] / n) for (u, v), n in total3.items()}
        p3 = {}
        for (u, v, w), n in c3.items():
            lower = math.exp(g3[(u << _BITS) | v] + p2[(v << _BITS) | w])
            p3[(((u << _BITS) | v) << _BITS) | w] = math.log((n - d3) / total3[(u, v)] + lower)
        return cls(p1, p2, g2, p3, g3)

    def log_prob(self, u: int, v: int, w: int) -> float:
        """log P(w | u v)."""
        uv = (u << _BITS) | v
        seen = self.p3.get((uv << _BITS) | w)
        if seen is not None:
            return seen
        lower = self.p2.get((v << _BITS) | w)
        if lower is None:
            lower = self.g2.get(v, 0.0) + self.p1[w]
        return self.g3.get(uv, 0.0) + lower

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}p1": np.asarray(self.p1, dtype=np.float64)}
        for name in ("p2", "g2", "p3", "g3"):
            table = getattr(self, name)
            out[f"{prefix}{name}_k"] = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
            out[f"{prefix}{name}_v"] = np.fromiter(table.values(), dtype=np.float64, count=len(table))
        return out

    @classmethod
    def from_arrays(cls, data, prefix: str) -> "_Half":
        tables = [dict(zip(data[f"{prefix}{n}_k"].tolist(), data[f"{prefix}{n}_v"].tolist()))
                  for n in ("p2", "g2", "p3", "g3")]
        return cls(data[f"{prefix}p1"].tolist(), *tables)


class PlausibilityModel:
    """Cross-fitted Kneser-Ney trigram model of a caption set: `log_prob`, `difference`,
    `prefers_positive`. Pickles as its file path when saved (workers reload it once per process)."""

    def __init__(self, vocabulary: list[str], halves: tuple[_Half, _Half], meta: dict,
                 path: str | None = None):
        self.vocabulary = vocabulary
        self.ids = {w: i for i, w in enumerate(vocabulary)}
        self.halves = halves
        self.meta = meta
        self.path = path
        self._last: tuple = (None, None)  # (positive, prepare(positive)) of the latest call
        self._unit_ids: dict[str, tuple[int, ...]] = {}

    @property
    def identity(self) -> str:
        """Digest of the source captions and the tokenisation: what the negatives depend on."""
        return self.meta["identity"]

    def __repr__(self) -> str:
        return (f"PlausibilityModel({self.meta['captions']} captions, {len(self.vocabulary) - 3} words, "
                f"identity={self.identity[:12]})")

    def __reduce__(self):
        if self.path is None:
            return object.__reduce__(self)
        return load_model, (self.path, self.identity)

    def encode(self, text: str) -> tuple[list[int], int]:
        """(ids padded with BOS BOS ... EOS, the half that scores this caption)."""
        words = tokens(text)
        ids = self.ids
        return [BOS, BOS, *(ids.get(w, UNK) for w in words), EOS], 1 - fold_of(words, self.meta["salt"])

    @staticmethod
    def _scores(half: _Half, ids: list[int], start: int, stop: int) -> float:
        """Sum of log P(ids[i] | ids[i-2], ids[i-1]) for i in [start, stop) (inlined: the hot loop)."""
        p3, g3, p2, g2, p1 = half.p3, half.g3, half.p2, half.g2, half.p1
        total = 0.0
        for i in range(max(start, 2), stop):
            u, v, w = ids[i - 2], ids[i - 1], ids[i]
            uv = (u << _BITS) | v
            seen = p3.get((uv << _BITS) | w)
            if seen is None:
                lower = p2.get((v << _BITS) | w)
                if lower is None:
                    lower = g2.get(v, 0.0) + p1[w]
                seen = g3.get(uv, 0.0) + lower
            total += seen
        return total

    def log_prob(self, text: str, half: int | None = None) -> float:
        """log P(caption) under the half it is not in (or under `half`)."""
        ids, other = self.encode(text)
        return self._scores(self.halves[other if half is None else half], ids, 2, len(ids))

    def prepare(self, positive: str) -> tuple[list[int], int, list[float]]:
        """The positive's ids, half and running log-probabilities, for `difference` against many
        negatives (only the trigrams an edit touches are then scored)."""
        if self._last[0] == positive:  # the generator asks once per type of the same caption
            return self._last[1]
        ids, half = self.encode(positive)
        table = self.halves[half]
        running = [0.0, 0.0]
        for i in range(2, len(ids)):
            running.append(running[-1] + self._scores(table, ids, i, i + 1))
        self._last = (positive, (ids, half, running))
        return ids, half, running

    def unit_ids(self, units: list[str]) -> list[int]:
        """Padded ids of a caption given as units (words or multi-word units, as the generator's
        edits hold them): the ids of their joined text, each unit tokenised once per process."""
        cache = self._unit_ids
        if len(cache) > 200_000:  # distinct units of a long run; the cache only saves time
            cache.clear()
        out = [BOS, BOS]
        for unit in units:
            found = cache.get(unit)
            if found is None:
                found = cache[unit] = tuple(self.ids.get(w, UNK) for w in tokens(unit))
            out.extend(found)
        out.append(EOS)
        return out

    def difference(self, positive: str | tuple, negative: str | list[str], normalise: bool = False) -> float:
        """log P(negative) - log P(positive), both under the half the positive is not in;
        < 0: a blind reader prefers the positive. Only the trigrams an edit touches are scored.
        `normalise`: per-token mean log-probabilities instead (length-fair for added words).
        `positive` may be `prepare(positive)` when one positive is compared with many negatives;
        `negative` may be its list of units (see `unit_ids`)."""
        pos, half, running = self.prepare(positive) if isinstance(positive, str) else positive
        ids = self.ids
        neg = [BOS, BOS, *[ids.get(w, UNK) for w in tokens(negative)], EOS] if isinstance(negative, str) \
            else self.unit_ids(negative)
        shortest = min(len(pos), len(neg))
        a = 0
        while a < shortest and pos[a] == neg[a]:
            a += 1
        if a == len(pos) == len(neg):
            return 0.0
        b = 0
        while b < shortest - a and pos[-1 - b] == neg[-1 - b]:
            b += 1
        stop_pos = min(len(pos) - b + ORDER - 1, len(pos))
        a = max(a, 2)
        diff = (self._scores(self.halves[half], neg, a, min(len(neg) - b + ORDER - 1, len(neg)))
                - (running[stop_pos - 1] - running[a - 1]))
        if not normalise:
            return diff
        return (running[-1] + diff) / (len(neg) - 2) - running[-1] / (len(pos) - 2)

    def prefers_positive(self, positive: str, negative: str) -> bool:
        """Whether a blind reader (this model) scores the positive above the negative."""
        return self.difference(positive, negative) < 0

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as one .npz, atomically."""
        arrays = {"vocabulary": np.asarray(self.vocabulary),
                  "meta": np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)}
        for h, half in enumerate(self.halves):
            arrays.update(half.arrays(f"h{h}_"))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_open(path, "wb") as handle:
            handle.write(buffer.getvalue())
        self.path = str(path)


def captions_identity(captions: list[str], salt: str = _FOLD_SALT) -> str:
    """Digest of the caption words, the tokenisation and the split (what the model's contents
    depend on)."""
    digest = hashlib.sha256(f"{FORMAT}\0{TOKENISATION}\0{salt}\0".encode())
    for caption in captions:
        digest.update(" ".join(tokens(caption)).encode() + b"\n")
    return digest.hexdigest()


def fit(captions: Iterable[str], source: str = "captions", salt: str = _FOLD_SALT,
        purpose: str = "a plausibility model") -> PlausibilityModel:
    """Fit the cross-fitted model on `captions`; refuses fewer than MIN_CAPTIONS usable ones,
    naming `source` and the `purpose` they were for. `salt` picks the split into halves (the
    audit's scorers split otherwise than the filter)."""
    texts = [c for c in captions if isinstance(c, str) and tokens(c)]
    if len(texts) < MIN_CAPTIONS:
        raise PlausibilityError(
            f"{source}: {len(texts)} usable captions; {purpose} needs at least {MIN_CAPTIONS} "
            "(more is better: ideally the training captions themselves)")
    counts: Counter = Counter(w for c in texts for w in tokens(c))
    vocabulary = ["<unk>", "<s>", "</s>", *sorted(counts)]
    ids = {w: i for i, w in enumerate(vocabulary)}
    if len(vocabulary) >= 1 << _BITS:
        raise PlausibilityError(f"{source}: {len(vocabulary)} word types; at most {1 << _BITS} fit")
    halves: tuple[list, list] = ([], [])
    for c in texts:
        words = tokens(c)
        halves[fold_of(words, salt)].append([ids[w] for w in words])
    if not all(halves):
        raise PlausibilityError(f"{source}: all captions fall in one half; pass more varied captions")
    meta = {"format": FORMAT, "tokenisation": TOKENISATION, "order": ORDER, "captions": len(texts),
            "source": str(source), "salt": salt,
            "identity": captions_identity(texts, salt)}
    return PlausibilityModel(vocabulary, tuple(_Half.fit(h, len(vocabulary)) for h in halves), meta)


_LOADED: dict[str, PlausibilityModel] = {}  # per process: path -> model


def load_model(path: str | os.PathLike, identity: str | None = None) -> PlausibilityModel:
    """A saved model (once per process), validated: format, tokenisation and, when given, identity."""
    key = os.path.abspath(path)
    model = _LOADED.get(key)
    if model is None:
        model = _read(path)
        _LOADED[key] = model
    if identity is not None and model.identity != identity:
        raise PlausibilityError(
            f"plausibility model {path} was built from other captions (identity {model.identity[:12]}, "
            f"expected {identity[:12]}); rebuild it with `python -m open_clip_hn.negatives plausibility`")
    return model


def _read(path: str | os.PathLike) -> PlausibilityModel:
    fix = "rebuild it with `python -m open_clip_hn.negatives plausibility --input CAPTIONS --output PATH`"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise PlausibilityError(f"plausibility model {path} has format {meta.get('format')!r}, this "
                                        f"version reads {FORMAT!r}; {fix}")
            if meta.get("tokenisation") != TOKENISATION:
                raise PlausibilityError(f"plausibility model {path} was built with tokenisation "
                                        f"{meta.get('tokenisation')!r}, this version uses {TOKENISATION!r}; {fix}")
            vocabulary = data["vocabulary"].tolist()
            halves = tuple(_Half.from_arrays(data, f"h{h}_") for h in (0, 1))
    except PlausibilityError:
        raise
    except (OSError, ValueError, KeyError, zlib.error, zipfile.BadZipFile) as err:
        raise PlausibilityError(f"plausibility model {path} cannot be read ({err}); {fix}") from err
    if len(halves[0].p1) != len(vocabulary) or vocabulary[:3] != ["<unk>", "<s>", "</s>"]:
        raise PlausibilityError(f"plausibility model {path} is inconsistent (vocabulary vs tables); {fix}")
    return PlausibilityModel(vocabulary, halves, meta, str(path))


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a saved model (an .npz archive) rather than a caption file."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def read_caption_file(path: str, caption_key: str = "caption", key_flag: str = "--caption-key") -> list[str]:
    """The captions of a txt/csv/tsv/jsonl file (the formats `negatives generate` reads);
    `key_flag` names the flag that sets `caption_key` in errors."""
    from ..argtypes import InputError
    from .shards import CAPTION_FILE_SUFFIXES, read_captions

    suffix = Path(path).suffix.lower()
    if suffix == ".npz":  # named as a saved model, but not one (is_saved_model said so)
        raise PlausibilityError(f"{path} is not a saved plausibility model (not an .npz archive: "
                                "damaged, or another file under that name); write it again with "
                                "`python -m open_clip_hn.negatives plausibility`")
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise PlausibilityError(f"{path}: unknown caption file format {suffix!r}; pass a .txt (one caption "
                                "per line), .csv, .tsv or .jsonl file, or a model saved by "
                                "`python -m open_clip_hn.negatives plausibility`")
    try:
        return [c for c in read_captions(path, caption_key, key_flag) if isinstance(c, str)]
    except InputError as err:  # read_captions names a missing column this way
        raise PlausibilityError(f"{err} (or save a model once with `python -m open_clip_hn.negatives "
                                f"plausibility --input {path} --caption-key NAME --output MODEL.npz` and "
                                "pass MODEL.npz)") from None


def model_cache_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where models built from caption files are cached: `directory` (must exist) or the
    default cache folder (made when missing)."""
    if directory is None:
        folder = cache_dir() / "plausibility"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PlausibilityError(f"cannot make the plausibility cache folder {folder} ({err.strerror}); "
                                    "set OPEN_CLIP_HN_CACHE to a writable folder, or save a model once "
                                    "with `python -m open_clip_hn.negatives plausibility` and pass it") from None
        return folder
    folder = Path(directory)
    if not folder.is_dir():
        raise PlausibilityError(f"plausibility cache directory {directory} does not exist; create it "
                                "or leave it unset for the default (~/.cache/open_clip_hn/plausibility)")
    return folder


def _cached(target: Path, build: Callable[[], PlausibilityModel]) -> PlausibilityModel:
    """The model cached at `target`, else `build()` saved there, so loader workers load a file
    instead of refitting."""
    if target.exists():
        try:
            return load_model(target)
        except PlausibilityError:
            pass  # an old or damaged cache entry: rebuilt below
    model = build()
    model.save(target)
    _LOADED[os.path.abspath(target)] = model
    return model


def from_captions(captions: list[str], source: str = "captions",
                  cache: str | os.PathLike | None = None) -> PlausibilityModel:
    """The model of `captions`, cached under a digest of the caption words."""
    target = model_cache_dir(cache) / f"kn{ORDER}-{captions_identity(captions)[:24]}.npz"
    return _cached(target, lambda: fit(captions, source=source))


def resolve(path: str | os.PathLike, caption_key: str = "caption",
            cache: str | os.PathLike | None = None, key_flag: str = "--caption-key") -> PlausibilityModel:
    """A saved model at `path`, or the (cached) model of the caption file at `path` (its
    `caption_key` column or key, set by `key_flag`)."""
    if not os.path.isfile(path):
        raise PlausibilityError(f"plausibility source {path} not found; pass a caption file (txt/csv/tsv/"
                                "jsonl) or a model saved by `python -m open_clip_hn.negatives plausibility`")
    if is_saved_model(path):
        return load_model(path)
    digest = hashlib.sha256(f"{FORMAT}\0{TOKENISATION}\0{caption_key}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    target = model_cache_dir(cache) / f"kn{ORDER}-{digest.hexdigest()[:24]}.npz"
    return _cached(target, lambda: fit(read_caption_file(str(path), caption_key, key_flag), source=str(path)))


MARGIN = 10.0  # nats: how much less plausible than its positive a kept negative may read
MARGIN_PER_TOKEN = 1.0  # the same for added words, on per-token mean log-probabilities


def plausible_order(differences: list[float], margin: float) -> list[int]:
    """Indices of the candidates to keep, most plausible first: those scored at most `margin`
    below their positive (negatives scored above it are kept too).

    Most plausible first rather than nearest to the positive: the candidate pool leans
    implausible and the filter's model and an independent blind reader disagree pair by pair, so a
    candidate next to the positive under the filter still reads below it for the reader (measured
    on SugarCrepe's captions: 0.64-0.77 blind accuracy, against 0.45-0.60 most plausible first)."""
    kept = [i for i, d in enumerate(differences) if d >= -margin]
    return sorted(kept, key=lambda i: (-differences[i], i))


def select(model: PlausibilityModel, positive: str, candidates: list[str] | list[list[str]],
           added_words: bool) -> list[int]:
    """`plausible_order` of the candidates of one positive under `model` (per-token scores for
    types that add words, whose length alone would make them less probable)."""
    prepared = model.prepare(positive)
    diffs = [model.difference(prepared, c, normalise=added_words) for c in candidates]
    return plausible_order(diffs, MARGIN_PER_TOKEN if added_words else MARGIN)
