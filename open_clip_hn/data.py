"""Hard negatives through OpenCLIP's own data pipeline.

OpenCLIP's loaders call `tokenizer(caption)[0]` per sample and stack the results, and its train
step passes the stacked tensor straight to `model(images, texts)`. So the plugin rides on the
tokenizer: `PackedNegativeTokenizer` turns one caption into one flat row holding the caption, its
K negatives and their mask/type metadata. A forward pre-hook on the model (`unpack_texts`) splits
the row again, so OpenCLIP's unmodified train step encodes positives and negatives in one text
forward, and the metadata stays glued to its sample through workers, ranks and `--accum-freq`.

Row layout per sample, K negatives, context length L, M = META_COLUMNS:
    (1 + K [+ 1]) blocks of [L token ids | SENTINEL, valid, type_id]
blocks in order caption, negative_1, ..., negative_K (interleaved per sample after unpacking),
and with `--hn-mirror` one more block: the caption of the mirrored image (`mirror.py`), whose
type_id is the mirror axis.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Iterator

import torch

from .mirror import AXIS_TO_ID, mirror_caption
from .negatives.taxonomy import NEGATIVE_TYPES, TYPE_TO_ID

if TYPE_CHECKING:
    from .negatives import NegativeGenerator

META_COLUMNS = 3
SENTINEL = -0x48_4E_48_4E  # never a token id: marks a packed row
PRECOMPUTED_PREFIX = "\x00open_clip_hn\x00"  # marks a caption that carries its precomputed negatives
NEGATIVES_MEMBER = "neg.json"


@dataclass(frozen=True)
class UnpackedTexts:
    tokens: torch.Tensor  # [B * (1 + K), L], per-sample interleaved
    neg_mask: torch.Tensor  # [B, K] bool
    neg_types: torch.Tensor  # [B, K] long, -1 where masked
    mirror_tokens: torch.Tensor | None = None  # [B, L] caption of each mirrored image
    mirror_axis: torch.Tensor | None = None  # [B] long: 0 horizontal, 1 vertical, -1 no mirror


def encode_precomputed_caption(caption: str, negatives: list[dict[str, str]]) -> str:
    """Fold a sample's precomputed negatives into its caption string (decoded in the tokenizer)."""
    return PRECOMPUTED_PREFIX + json.dumps({"caption": caption, "negatives": negatives})


def decode_precomputed_caption(text: str) -> tuple[str, list[dict[str, str]] | None]:
    if not text.startswith(PRECOMPUTED_PREFIX):
        return text, None
    payload = json.loads(text[len(PRECOMPUTED_PREFIX):])
    return payload["caption"], payload["negatives"]


def valid_negatives(negatives: Any, caption: str, k: int,
                    types: Collection[str] = NEGATIVE_TYPES) -> list[dict[str, str]]:
    """Keep well-formed, distinct negatives of the wanted types that differ from the caption."""
    kept: list[dict[str, str]] = []
    seen = {" ".join(caption.lower().split())}
    for item in negatives if isinstance(negatives, list) else []:
        if not isinstance(item, dict):
            continue
        text, kind = item.get("text"), item.get("type")
        if not isinstance(text, str) or kind not in types:
            continue
        norm = " ".join(text.lower().split())
        if not norm or norm in seen:
            continue
        seen.add(norm)
        kept.append({"text": text, "type": kind})
        if len(kept) == k:
            break
    return kept


class PackedNegativeTokenizer:
    """Tokenizer wrapper: caption -> a [1, (1+K)*(L+META_COLUMNS)] row with its typed negatives.

    Runs inside loader workers. Negatives come from the caption itself (online, a pure function of
    caption and seed) or from the precomputed payload; missing ones become masked slots. With
    `mirror_axes` the row ends with the mirrored image's caption (masked when there is none).
    """

    def __init__(self, tokenizer: Callable, num_negatives: int,
                 generator: "NegativeGenerator | None", types: Collection[str] = NEGATIVE_TYPES,
                 mirror_axes: Collection[str] = ()):
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.generator = generator
        self.types = frozenset(types)
        self.mirror_axes = tuple(mirror_axes)

    def negatives_for(self, caption: str, precomputed: list | None) -> list[dict[str, str]]:
        if precomputed is not None:
            return valid_negatives(precomputed, caption, self.num_negatives, self.types)
        if self.generator is None:
            return []
        return valid_negatives(self.generator.generate(caption, self.num_negatives), caption,
                               self.num_negatives, self.types)

    def pack(self, text: Any) -> torch.Tensor:
        caption, precomputed = (decode_precomputed_caption(text) if isinstance(text, str)
                                else (text, None))
        caption = caption if isinstance(caption, str) else ""
        negatives = self.negatives_for(caption, precomputed) if self.num_negatives else []
        k = self.num_negatives
        texts = [caption] + [n["text"] for n in negatives] + [""] * (k - len(negatives))
        mirrored = mirror_caption(caption, self.mirror_axes)
        if self.mirror_axes:
            texts.append(mirrored[0] if mirrored else "")
        tokens = self.tokenizer(texts)
        meta = torch.full((len(texts), META_COLUMNS), SENTINEL, dtype=tokens.dtype)
        meta[:, 1] = 0
        meta[:, 2] = -1
        meta[1:1 + len(negatives), 1] = 1
        meta[1:1 + len(negatives), 2] = torch.tensor([TYPE_TO_ID[n["type"]] for n in negatives],
                                                     dtype=tokens.dtype)
        if mirrored:
            meta[-1, 1], meta[-1, 2] = 1, AXIS_TO_ID[mirrored[1]]
        return torch.cat([tokens, meta], dim=1).reshape(1, -1)

    def __call__(self, texts: Any) -> torch.Tensor:
        """Like an OpenCLIP tokenizer: a list of captions -> one row each; anything else -> one row."""
        items = texts if isinstance(texts, (list, tuple)) else [texts]
        return torch.cat([self.pack(t) for t in items], dim=0)


def unpack_texts(texts: torch.Tensor, num_negatives: int, mirror: bool = False
                 ) -> UnpackedTexts | None:
    """Split packed rows back into token rows and metadata; None for ordinary token tensors."""
    if texts.dim() != 2 or texts.dtype not in (torch.int64, torch.int32):
        return None
    blocks = 1 + num_negatives + int(mirror)
    width = texts.shape[1]
    if width % blocks or width // blocks <= META_COLUMNS:
        return None
    rows = texts.reshape(texts.shape[0] * blocks, width // blocks)
    if not bool((rows[:, -META_COLUMNS] == SENTINEL).all()):
        return None
    batch = texts.shape[0]
    meta = rows[:, -META_COLUMNS:].reshape(batch, blocks, META_COLUMNS)
    tokens = rows[:, :-META_COLUMNS].reshape(batch, blocks, -1)
    if not mirror:
        return UnpackedTexts(tokens.flatten(0, 1), meta[:, 1:, 1] == 1, meta[:, 1:, 2].long())
    has_mirror = meta[:, -1, 1] == 1
    return UnpackedTexts(
        tokens=tokens[:, :-1].flatten(0, 1),
        neg_mask=meta[:, 1:-1, 1] == 1,
        neg_types=meta[:, 1:-1, 2].long(),
        mirror_tokens=tokens[:, -1],
        mirror_axis=torch.where(has_mirror, meta[:, -1, 2].long(), -1),
    )


def samples_with_precomputed_negatives(samples: Iterable[dict], handler: Callable) -> Iterator[dict]:
    """Webdataset stage: fold each sample's `neg.json` into its caption (see module docstring).

    A sample without a readable neg.json keeps its caption and gets all slots masked; the
    failure is reported through webdataset's handler like any other corrupt member.
    """
    for sample in samples:
        raw, text = sample.pop(NEGATIVES_MEMBER, None), sample.get("txt")
        if raw is not None and text is not None:
            try:
                caption = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                negatives = json.loads(raw)
                sample["txt"] = encode_precomputed_caption(caption, negatives).encode("utf-8")
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                if not handler(exn):
                    raise
        yield sample


def shard_has_negatives(shard_path: str, max_members: int = 64) -> bool:
    """True if the first samples of a local tar shard carry `neg.json` members."""
    with tarfile.open(shard_path) as tar:
        for i, member in enumerate(tar):
            if member.name.endswith("." + NEGATIVES_MEMBER):
                return True
            if i >= max_members:
                break
    return False

