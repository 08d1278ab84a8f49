"""Finding NLTK's WordNet, and installing it offline from Debian's WordNet 3.0 packages.

WordNet is the one NLTK resource the generator needs. On machines without internet the
`nltk.downloader` route fails, but Debian's `wordnet-base` + `wordnet-sense-index` packages ship
the same WordNet 3.0 database in /usr/share/wordnet; NLTK's reader only lacks the `lexnames` file,
which we rebuild from the `lexnames(5WN)` man page of the same package.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
from pathlib import Path

from ..files import atomic_open, atomic_write_bytes

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_LEXNAME_LINE = re.compile(r"^(\d\d)\t(\S+)\s*\t")

INSTALL_WORDNET = (
    "    python -m nltk.downloader wordnet\n"
    "or, without internet, from Debian's packages:\n"
    "    apt-get install wordnet-base wordnet-sense-index\n"
    "    python -m open_clip_hn.negatives setup-nltk [--target DIR]\n"
    "(set NLTK_DATA=DIR when DIR is not one of NLTK's default paths)."
)
MISSING_MESSAGE = ("NLTK's WordNet corpus was not found in NLTK's search paths ({paths}). Install "
                   "it with\n" + INSTALL_WORDNET)
DAMAGED_MESSAGE = ("NLTK's WordNet corpus at {path} cannot be read ({reason}): it is damaged or "
                   "incomplete (an interrupted download or copy?). Remove that folder and install "
                   "it again with\n" + INSTALL_WORDNET)
TAGGER_MESSAGE = ("NLTK's POS tagger data at {path} cannot be loaded ({reason}). Install it again "
                  "with\n    python -m nltk.downloader averaged_perceptron_tagger_eng\nor remove "
                  "that folder: without it captions are parsed by the plugin's own tagger.")


class NLTKDataError(LookupError):
    """NLTK data the caption parser needs is missing or damaged; the message says how to fix it."""


class WordNetMissingError(NLTKDataError):
    """WordNet is not installed where NLTK looks for it; the message says how to install it."""


def damaged_wordnet(path: str, err: BaseException) -> NLTKDataError:
    """The error for a WordNet folder whose files are missing, cut short or unreadable."""
    return NLTKDataError(DAMAGED_MESSAGE.format(path=path, reason=f"{type(err).__name__}: {err}"))


def broken_tagger(path: str | None, err: BaseException) -> NLTKDataError:
    """The error for a tagger folder NLTK finds but cannot load (an interrupted download)."""
    return NLTKDataError(TAGGER_MESSAGE.format(path=path, reason=f"{type(err).__name__}: {err}"))


def default_search_paths() -> list[str]:
    """NLTK's data search path (NLTK_DATA first), computed without importing nltk.

    Importing nltk costs over a second (it pulls in scipy); loader workers only need to know
    where the data is, so the common case avoids the import.
    """
    paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    home = os.path.expanduser("~/")
    if home != "~/":
        paths.append(os.path.join(home, "nltk_data"))
    paths += [os.path.join(sys.prefix, "nltk_data"), os.path.join(sys.prefix, "share", "nltk_data"),
              os.path.join(sys.prefix, "lib", "nltk_data"), "/usr/share/nltk_data",
              "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    return paths


def find_resource(resource: str) -> str | None:
    """Path of an NLTK resource ("corpora/wordnet"), dir or .zip, or None when absent.

    When the program already imported nltk, nltk.data.path is authoritative (it may have been
    changed at run time); otherwise NLTK's default paths are, and nltk is not imported.
    """
    if "nltk" not in sys.modules:
        for root in default_search_paths():
            for candidate in (os.path.join(root, resource), os.path.join(root, resource + ".zip")):
                if os.path.exists(candidate):
                    return candidate
        return None
    import nltk

    for name in (resource, resource + ".zip"):
        try:
            return str(nltk.data.find(name))
        except LookupError:
            continue
    return None


def find_wordnet() -> str | None:
    """Path of the WordNet corpus NLTK would load (honours NLTK_DATA), or None when absent."""
    return find_resource("corpora/wordnet")


def ensure_wordnet() -> str:
    """Return WordNet's path, or raise WordNetMissingError naming both ways to install it."""
    path = find_wordnet()
    if path is None:
        import nltk

        raise WordNetMissingError(MISSING_MESSAGE.format(paths=", ".join(nltk.data.path)))
    return path


def lexnames_from_man_page(text: str) -> list[str]:
    """The 45 `NN<TAB>name<TAB>category` lines of WordNet's `lexnames` file, from lexnames(5WN)."""
    lines = []
    for raw in text.splitlines():
        match = _LEXNAME_LINE.match(raw)
        if match:
            number, name = match.groups()
            lines.append(f"{number}\t{name}\t{_CATEGORY[name.split('.', 1)[0]]}")
    if len(lines) != 45:
        raise ValueError(f"expected 45 lexicographer files in the lexnames man page, found {len(lines)}")
    return lines


def _writable_target() -> Path:
    """First entry of nltk.data.path that exists writable or can be created."""
    import nltk

    for entry in nltk.data.path:
        path = Path(entry)
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if os.access(probe, os.W_OK):
            return path
    raise PermissionError(f"no writable directory in nltk.data.path ({nltk.data.path}); pass --target DIR")


def setup_nltk(target: str | os.PathLike | None = None,
               source: str | os.PathLike = DEBIAN_WORDNET_DIR,
               man_page: str | os.PathLike = DEBIAN_LEXNAMES_MAN) -> Path:
    """Install Debian's WordNet 3.0 as `<target>/corpora/wordnet` for NLTK; return that folder.

    Copies the database files (not sub-folders) and writes the `lexnames` file NLTK needs.
    """
    source, man_page = Path(source), Path(man_page)
    if not (source / "index.noun").is_file():
        raise FileNotFoundError(
            f"no WordNet database in {source}; run `apt-get install wordnet-base wordnet-sense-index`"
        )
    if not man_page.is_file():
        raise FileNotFoundError(f"lexnames man page {man_page} not found; it ships in Debian's wordnet-base")
    root = Path(target) if target is not None else _writable_target()
    corpus = root / "corpora" / "wordnet"
    corpus.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file():
            with open(item, "rb") as reader, atomic_open(corpus / item.name, "wb") as writer:
                shutil.copyfileobj(reader, writer)
    opener = gzip.open if man_page.suffix == ".gz" else open
    with opener(man_page, "rt", encoding="utf-8", errors="replace") as handle:
        lexnames = lexnames_from_man_page(handle.read())
    atomic_write_bytes(corpus / "lexnames", ("\n".join(lexnames) + "\n").encode())
    return corpus
