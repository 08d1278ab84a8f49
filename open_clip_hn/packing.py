"""The wire format between OpenCLIP's loader, its model and the objective: both halves.

OpenCLIP's loaders call `tokenizer(caption)[0]` per sample and stack the results, its train step
passes the stacked tensor straight to `model(images, texts)`, and only the model's output dict
reaches the loss. So the plugin rides on those three:

* worker half: `PackedNegativeTokenizer` turns one caption into one flat row holding the caption,
  its K negatives and their mask/type metadata (and, with `--hn-mirror`, the mirrored caption, and
  with `--hn-converse-weight`, the converse captions);
* model half: `attach_model_hooks` puts a forward pre-hook on the model that splits the rows again
  (`unpack_texts`) and flips the mirrored images, so OpenCLIP's unmodified train step encodes
  positives, negatives and mirrored pairs in one forward per tower; a forward hook adds the
  metadata to the output dict;
* `PackedOutputs` is what rides in that dict: `write` and `read` are the only places that know
  its keys, and the objective receives it as one typed value.

The metadata travels as tensors, so OpenCLIP's `--accum-freq` path concatenates it along the
batch like the features it belongs to, and it stays glued to its sample through workers and ranks.

Row layout per sample, K negatives, context length L, M = META_COLUMNS:
    (1 + K [+ 1 [+ 2]]) blocks of [L token ids | SENTINEL, valid, type_id, blind]
blocks in order caption, negative_1, ..., negative_K (interleaved per sample after unpacking),
and with `--hn-mirror` one more block: the caption of the mirrored image (`mirror.py`), whose
type_id is the mirror axis and whose `blind` column holds the colour pair of a colour exchange or
a composed axis (`recolour.PAIR_BASE` * first + second colour id; -1 for a flip); with the
converse term two more: the converse of the caption (the same scene said the other way round:
relation reversed, its two objects exchanged) and the converse of the mirrored caption
(`mirror.converse_captions`), both valid or both masked. `blind` is 1 where the plausibility
model (`--hn-plausibility`) scores the negative below its caption, i.e. a text-only reader would
reject it (0: it would not, -1: no model), so the objective can log that share (`Hn_blind`).

Precomputed negatives (`neg.json` members, see `negatives/shards.py`) reach the tokenizer through
the only field OpenCLIP's pipeline carries to it, the caption string: `samples_with_precomputed_
negatives` folds them into it and `PackedNegativeTokenizer` unfolds them, both in this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Collection, Iterable, Iterator, Mapping

import torch

from .mirror import (AXIS_TO_ID, COLOUR_AXES, FLIP_COLOUR_AXES, MirrorPairs, axis_in,
                     converse_captions, flip_images, mirror_pair)
from .negatives.parse import normalise_punctuation
from .negatives.shards import NEGATIVES_EXTENSION, read_negatives
from .negatives.taxonomy import NEGATIVE_TYPES, TYPE_TO_ID
from .recolour import exchange_colours

if TYPE_CHECKING:
    from .negatives import NegativeGenerator

META_COLUMNS = 4
SENTINEL = -0x48_4E_48_4E  # never a token id: marks a packed row
PRECOMPUTED_PREFIX = "\x00open_clip_hn\x00"  # marks a caption that carries its precomputed negatives


@dataclass(frozen=True)
class UnpackedTexts:
    tokens: torch.Tensor  # [B * (1 + K), L], per-sample interleaved
    neg_mask: torch.Tensor  # [B, K] bool
    neg_types: torch.Tensor  # [B, K] long, -1 where masked
    neg_blind: torch.Tensor  # [B, K] long: 1 a text-only reader rejects it, 0 not, -1 unknown
    mirror_tokens: torch.Tensor | None = None  # [B, L] caption of each mirrored image
    mirror_axis: torch.Tensor | None = None  # [B] long: mirror.AXIS_TO_ID, -1 none
    mirror_colours: torch.Tensor | None = None  # [B] long: colour pair code of a colour axis, else -1
    converse_tokens: torch.Tensor | None = None  # [B, 2, L] converse of the caption, of the mirrored one
    converse_mask: torch.Tensor | None = None  # [B] bool: the sample has both


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
    `mirror_axes` the row ends with the mirrored image's caption (masked when there is none), and
    with a `converse` parser (which needs mirror axes) with the two converse captions.
    """

    def __init__(self, tokenizer: Callable, num_negatives: int,
                 generator: "NegativeGenerator | None", types: Collection[str] = NEGATIVE_TYPES,
                 mirror_axes: Collection[str] = (), converse: "NegativeGenerator | None" = None,
                 parser: "NegativeGenerator | None" = None):
        """`converse`: the parser that makes converse captions (None: none are packed);
        `parser`: the one that phrases the composed mirror axes' captions (default: `converse`)."""
        if converse is not None and not mirror_axes:
            raise ValueError("converse captions are made from mirrored captions: give mirror_axes")
        self.parser = parser or converse
        if set(mirror_axes) & set(FLIP_COLOUR_AXES) and self.parser is None:
            raise ValueError("the composed mirror axes (horizontal+colour, vertical+colour) need a "
                             "caption parser: give parser")
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.generator = generator
        self.types = frozenset(types)
        self.mirror_axes = tuple(mirror_axes)
        self.converse = converse
        self._warned_twins = False

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
        # the form negatives are made from (a dash or curly quote would tell them apart)
        caption = normalise_punctuation(caption) if isinstance(caption, str) else ""
        negatives = self.negatives_for(caption, precomputed) if self.num_negatives else []
        k = self.num_negatives
        texts = [caption] + [n["text"] for n in negatives] + [""] * (k - len(negatives))
        mirrored = mirror_pair(caption, self.mirror_axes, self.parser) if self.mirror_axes else None
        if self.mirror_axes:
            texts.append(mirrored[0] if mirrored else "")
        converse = None
        if self.converse is not None:
            converse = converse_captions(caption, mirrored[:2] if mirrored else None, self.converse)
            texts.extend(converse or ("", ""))
        tokens = self.tokenizer(texts)
        meta = torch.full((len(texts), META_COLUMNS), SENTINEL, dtype=tokens.dtype)
        meta[:, 1] = 0
        meta[:, 2] = -1
        meta[1:1 + len(negatives), 1] = 1
        meta[1:1 + len(negatives), 2] = torch.tensor([TYPE_TO_ID[n["type"]] for n in negatives],
                                                     dtype=tokens.dtype)
        meta[:, 3] = -1
        blind_reader = getattr(self.generator, "plausibility", None) if precomputed is None else None
        if blind_reader is not None and negatives:
            meta[1:1 + len(negatives), 3] = torch.tensor(
                [int(blind_reader.prefers_positive(caption, n["text"])) for n in negatives],
                dtype=tokens.dtype)
        mirror_block = 1 + k
        if mirrored:
            meta[mirror_block, 1], meta[mirror_block, 2] = 1, AXIS_TO_ID[mirrored[1]]
            meta[mirror_block, 3] = mirrored[2]
        if converse:
            meta[mirror_block + 1:, 1] = 1
        self._mask_twins(tokens, meta, mirror_block, caption)
        return torch.cat([tokens, meta], dim=1).reshape(1, -1)

    def _mask_twins(self, tokens: torch.Tensor, meta: torch.Tensor, mirror_block: int,
                    caption: str) -> None:
        """Mask a negative or mirrored caption that tokenizes like the caption itself, and the
        converse captions where any two of the converse term's four texts (caption, mirrored,
        their converses) tokenize alike: texts that differ only past the context length (a long
        caption cut by the tokenizer) would train the image away from its own caption. Warned
        once per loader worker."""
        twins = (tokens == tokens[0]).all(dim=1) & (meta[:, 1] == 1)
        twins[0] = False
        if self.converse is not None and meta[mirror_block + 1, 1] == 1:
            four = tokens[[0, mirror_block, mirror_block + 1, mirror_block + 2]]
            alike = (four[:, None] == four[None]).all(dim=-1)
            if bool(alike.sum() > 4):  # beyond each text with itself
                twins[mirror_block + 1:] = True
        if not twins.any():
            return
        meta[twins, 1] = 0
        if not self._warned_twins:
            self._warned_twins = True
            logging.warning("%d text(s) packed with a caption as its negatives (generated, "
                            "mirrored or converse captions) tokenize exactly like the caption "
                            "(it is cut at the tokenizer's context length, %d tokens: %r); they are "
                            "masked, not trained as negatives. Captions this long lose the edits "
                            "made past the cut (this warning is shown once per loader worker)",
                            int(twins.sum()), tokens.shape[1], caption[:120])

    def __call__(self, texts: Any) -> torch.Tensor:
        """Like an OpenCLIP tokenizer: a list of captions -> one row each; anything else -> one row."""
        items = texts if isinstance(texts, (list, tuple)) else [texts]
        return torch.cat([self.pack(t) for t in items], dim=0)


def unpack_texts(texts: torch.Tensor, num_negatives: int, mirror: bool = False,
                 converse: bool = False) -> UnpackedTexts | None:
    """Split packed rows back into token rows and metadata; None for ordinary token tensors."""
    if texts.dim() != 2 or texts.dtype not in (torch.int64, torch.int32):
        return None
    blocks = 1 + num_negatives + int(mirror) + 2 * int(converse)
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
        return UnpackedTexts(tokens.flatten(0, 1), meta[:, 1:, 1] == 1, meta[:, 1:, 2].long(),
                             meta[:, 1:, 3].long())
    m = 1 + num_negatives  # the mirrored caption's block
    has_mirror = meta[:, m, 1] == 1
    return UnpackedTexts(
        tokens=tokens[:, :m].flatten(0, 1),
        neg_mask=meta[:, 1:m, 1] == 1,
        neg_types=meta[:, 1:m, 2].long(),
        neg_blind=meta[:, 1:m, 3].long(),
        mirror_tokens=tokens[:, m],
        mirror_axis=torch.where(has_mirror, meta[:, m, 2].long(), -1),
        mirror_colours=torch.where(has_mirror, meta[:, m, 3].long(), -1),
        converse_tokens=tokens[:, m + 1:] if converse else None,
        converse_mask=(has_mirror & (meta[:, m + 1, 1] == 1)) if converse else None,
    )


def _folded(text: Any) -> bool:
    prefix = PRECOMPUTED_PREFIX.encode("utf-8") if isinstance(text, bytes) else PRECOMPUTED_PREFIX
    return isinstance(text, (bytes, str)) and text.startswith(prefix)


def samples_with_precomputed_negatives(samples: Iterable[dict], handler: Callable) -> Iterator[dict]:
    """Webdataset stage: fold each sample's `neg.json` into its caption (see module docstring).

    A sample without a readable neg.json keeps its caption and gets all slots masked, never
    silently: an unreadable one goes through webdataset's handler like any corrupt member, and
    missing ones are counted in a warning (at the 1st, 2nd, 4th, ... and every 10,000th) naming the shard.
    Samples folded already (by an earlier instance of this stage) pass through unchanged.
    """
    missing = 0
    for sample in samples:
        raw, text = sample.pop(NEGATIVES_EXTENSION, None), sample.get("txt")
        if raw is None and text is not None and not _folded(text):
            missing += 1
            if missing & (missing - 1) == 0 or missing % 10_000 == 0:
                logging.warning("--hn-negatives precomputed: %d sample(s) without a neg.json member "
                                "so far (latest: %s in %s) train with masked slots; precompute "
                                "those shards", missing, sample.get("__key__"), sample.get("__url__"))
        if raw is not None and text is not None:
            try:
                caption = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                sample["txt"] = encode_precomputed_caption(caption, read_negatives(raw)).encode("utf-8")
            except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not handler(exn):
                    raise
        yield sample


# ---------------------------------------------------------------------------- model half


@dataclass(frozen=True)
class PackedOutputs:
    """What the model hooks add to OpenCLIP's output dict, as the objective receives it.

    Tensors under private keys, because OpenCLIP's `--accum-freq` path concatenates every value
    of the dict along the batch; `write` and `read` are the only code that knows the keys.
    """

    neg_mask: torch.Tensor | None = None   # [B, K] bool: valid negative slots
    neg_types: torch.Tensor | None = None  # [B, K] long: type id, -1 where masked
    mirrors: MirrorPairs | None = None     # the mirrored pairs' features (--hn-mirror)
    neg_blind: torch.Tensor | None = None  # [B, K] long: 1 text-only reader rejects it, 0 not, -1 unknown
    teacher_image: torch.Tensor | None = None  # [B, D] --hn-distill's teacher, this batch's images
    teacher_text: torch.Tensor | None = None   # [B, D] ... and positive captions
    teacher_logit_scale: torch.Tensor | None = None  # [B]: the teacher's scale, once per sample
    # (a 0-d value would not survive --accum-freq's torch.cat)
    image_tokens: torch.Tensor | None = None  # [B, P, D] projected patch tokens (`local` term)
    text_tokens: torch.Tensor | None = None   # [B, 1 + K, L, D] projected caption token features
    text_token_mask: torch.Tensor | None = None  # [B, 1 + K, L] bool: the tokens that count

    _KEYS: ClassVar[dict[str, str]] = {"neg_mask": "hn_neg_mask", "neg_types": "hn_neg_types",
                                       "neg_blind": "hn_neg_blind",
                                       "teacher_image": "hn_teacher_image_features",
                                       "teacher_text": "hn_teacher_text_features",
                                       "teacher_logit_scale": "hn_teacher_logit_scale",
                                       "image_tokens": "hn_image_tokens",
                                       "text_tokens": "hn_text_tokens",
                                       "text_token_mask": "hn_text_token_mask"}
    _MIRROR_KEYS: ClassVar[dict[str, str]] = {"image": "hn_mirror_image_features",
                                              "text": "hn_mirror_text_features",
                                              "mask": "hn_mirror_mask",
                                              "converse": "hn_mirror_converse_features",
                                              "converse_mask": "hn_mirror_converse_mask"}

    @property
    def empty(self) -> bool:
        return all(getattr(self, field) is None for field in self._KEYS) and self.mirrors is None

    def write(self, output: dict) -> dict:
        """Put the values into a model output dict (in place; returned for chaining)."""
        for field, key in self._KEYS.items():
            if getattr(self, field) is not None:
                output[key] = getattr(self, field)
        if self.mirrors is not None:
            for field, key in self._MIRROR_KEYS.items():
                if getattr(self.mirrors, field) is not None:
                    output[key] = getattr(self.mirrors, field)
        return output

    @classmethod
    def read(cls, outputs: Mapping[str, Any]) -> "PackedOutputs":
        """The values a loss received as keyword arguments (absent ones are None)."""
        values = {field: outputs.get(key) for field, key in cls._KEYS.items()}
        mirrors = None
        if outputs.get(cls._MIRROR_KEYS["mask"]) is not None:
            mirrors = MirrorPairs(**{field: outputs.get(key) for field, key in cls._MIRROR_KEYS.items()})
        return cls(**values, mirrors=mirrors)


def _normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's images were normalised with: OpenCLIP's `create_model` stores
    them on the visual tower; OpenCLIP's defaults otherwise."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    config = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    return tuple(config.get("mean", OPENAI_DATASET_MEAN)), tuple(config.get("std", OPENAI_DATASET_STD))


def mirror_images(images: torch.Tensor, axis: torch.Tensor, colours: torch.Tensor,
                  mean: Collection[float], std: Collection[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mirrored images of the rows with a pair, in row order; each row's axis afterwards).

    Rows of a spatial axis are flipped; rows of the colour axis get their colours exchanged
    (`recolour.exchange_colours`); rows of a composed axis are flipped, then exchanged. Where the
    image does not show both colours the row's axis becomes -1: the pair is dropped, not trained
    with an image that still matches its caption.
    """
    axis = axis.to(images.device).clone()
    rows = (axis >= 0).nonzero().flatten()
    mirrored, row_axis = images[rows], axis[rows]
    flip = ~axis_in(row_axis, ("colour",))
    mirrored[flip] = flip_images(mirrored[flip], row_axis[flip])
    exchange = axis_in(row_axis, COLOUR_AXES)
    if exchange.any():
        recoloured, ok = exchange_colours(mirrored[exchange], colours.to(images.device)[rows][exchange],
                                          tuple(mean), tuple(std))
        mirrored[exchange] = recoloured
        axis[rows[exchange][~ok]] = -1
        mirrored = mirrored[axis[rows] >= 0]
    return mirrored, axis


def attach_model_hooks(model: torch.nn.Module, num_negatives: int, mirror: bool = False,
                       converse: bool = False) -> None:
    """Unpack packed text rows before the model's forward; add `PackedOutputs` to its output.

    With `mirror`, the flipped images and their captions ride in the same forward (one encoder
    call per tower) and come out as [B, D] features beside a [B] mask, zero rows where a sample
    has no mirror; with `converse` (rows packed with the converse captions) so do those, as
    [B, 2, D] features beside their own mask.
    """
    pending: dict[str, Any] = {}

    def unpack(module, args, kwargs):
        pending.clear()
        positional = len(args) > 1
        text = args[1] if positional else kwargs.get("text")
        if not isinstance(text, torch.Tensor):
            return None
        unpacked = unpack_texts(text, num_negatives, mirror, converse)
        if unpacked is None:
            return None
        pending["meta"] = unpacked
        tokens = unpacked.tokens
        image = args[0] if args else kwargs.get("image")
        if unpacked.mirror_axis is not None and isinstance(image, torch.Tensor):
            mirrored, axis = mirror_images(image, unpacked.mirror_axis, unpacked.mirror_colours,
                                           *_normalisation(module))
            axis = axis.to(unpacked.mirror_axis.device)
            converse_mask = (None if unpacked.converse_mask is None  # a dropped pair has none
                             else unpacked.converse_mask & (axis >= 0))
            unpacked = replace(unpacked, mirror_axis=axis, converse_mask=converse_mask)
            pending["meta"] = unpacked
            rows = (unpacked.mirror_axis >= 0).nonzero().flatten()
            pending["mirror_rows"] = rows
            image = torch.cat([image, mirrored])
            tokens = torch.cat([tokens, unpacked.mirror_tokens[rows]])
            if unpacked.converse_mask is not None:
                converse_rows = unpacked.converse_mask.nonzero().flatten()
                pending["converse_rows"] = converse_rows
                tokens = torch.cat([tokens, unpacked.converse_tokens[converse_rows].flatten(0, 1)])
        if positional:
            args = (image, tokens, *args[2:])
        else:
            kwargs = {**kwargs, "text": tokens}
            if "image" in kwargs:
                kwargs["image"] = image
        return args, kwargs

    def add_outputs(module, args, kwargs, output):
        meta = pending.pop("meta", None)
        rows = pending.pop("mirror_rows", None)
        converse_rows = pending.pop("converse_rows", None)
        if meta is None:
            return output
        if not isinstance(output, dict):  # the mask would be lost and every slot read as valid
            raise TypeError("the model returned a tuple, so the hard-negative mask has nowhere to "
                            "go: build it with output_dict=True (open_clip.create_model_and_transforms"
                            "(..., output_dict=True)), as open_clip_train does")
        device = output["text_features"].device
        mirrors = None
        if rows is not None:
            batch = meta.neg_mask.shape[0]
            rows = rows.to(device)
            split = {"image_features": batch, "text_features": batch * (1 + num_negatives)}
            all_text = output["text_features"]
            mirrored = {}
            for key, size in split.items():
                features = output[key]
                output[key] = features[:size]
                mirrored[key] = features.new_zeros(batch, features.shape[1]).index_copy(
                    0, rows, features[size:size + rows.shape[0]])
            converse_features = converse_mask = None
            if converse_rows is not None:  # after the positives, negatives and mirrored captions
                extra = all_text[split["text_features"] + rows.shape[0]:].view(-1, 2, all_text.shape[1])
                converse_mask = meta.converse_mask.to(device)
                converse_features = extra.new_zeros(batch, 2, extra.shape[2]).index_copy(
                    0, converse_rows.to(device), extra)
            mirrors = MirrorPairs(mirrored["image_features"], mirrored["text_features"],
                                  (meta.mirror_axis >= 0).to(device), converse_features, converse_mask)
        return PackedOutputs(meta.neg_mask.to(device), meta.neg_types.to(device), mirrors,
                             meta.neg_blind.to(device)).write(output)

    model.register_forward_pre_hook(unpack, with_kwargs=True)
    model.register_forward_hook(add_outputs, with_kwargs=True)
