"""The towers' token features for the `local` term (FSC-CLIP's local hard negatives).

OpenCLIP's CLIP returns one pooled feature per image and per caption; the `local` term scores a
caption token by token against the image's patches, so it needs what the towers had before
pooling. Two forward hooks keep them, projected into the shared embedding space the way the
pooled features are: the ViT's patch tokens after `ln_post` (times `visual.proj`), and every
text position after `ln_final` (times `text_projection`). On the model, a pre-hook keeps the
caption token ids (for the mask) and a forward hook adds the features to the output dict
(`packing.PackedOutputs`) for the first B images and B·(1+K) caption rows, the positives and
their negatives, so they travel with their samples through `--accum-freq` and to the objective
like every other per-sample output. Only training forwards of packed rows keep anything.
"""

from __future__ import annotations

from typing import Any

import torch

from .argtypes import InputError
from .packing import PackedOutputs

PAD_TOKEN = 0  # OpenCLIP's SimpleTokenizer pads with 0 and puts start-of-text at position 0


_ARGMAX_LAYOUT = ("not argmax: its tokenizer is not OpenCLIP's SimpleTokenizer (start token first, "
                  "padding 0), whose layout the token mask reads")


def _refusal(problems: list[str]) -> InputError:
    return InputError("--hn-loss local scores captions token by token against image patches and "
                      "reads them from OpenCLIP's ViT image tower and built-in text transformer "
                      f"(SimpleTokenizer); this model does not fit: {'; '.join(problems)}. Use a "
                      "ViT model (e.g. ViT-B-32) or leave local out of --hn-loss")


def check_token_model_config(model_config: dict[str, Any]) -> None:
    """Refuse, from its OpenCLIP config alone, a model whose towers the hooks cannot read: at
    parse time, before any work (`check_token_model` checks the built model again)."""
    vision, text = model_config.get("vision_cfg", {}), model_config.get("text_cfg", {})
    problems = []
    if vision.get("timm_model_name"):
        problems.append(f"its image tower is the timm model {vision['timm_model_name']}, not "
                        "OpenCLIP's VisionTransformer")
    elif isinstance(vision.get("layers"), (list, tuple)):
        problems.append("its image tower is a ResNet (ModifiedResNet), not OpenCLIP's VisionTransformer")
    elif vision.get("attentional_pool") or vision.get("final_ln_after_pool"):
        problems.append("its ViT pools with attention or normalises after pooling")
    if model_config.get("custom_text") or text.get("hf_model_name"):
        problems.append("its text tower is not OpenCLIP's built-in text transformer")
    elif text.get("pool_type", "argmax") != "argmax":
        problems.append(f"its text tower pools with {text['pool_type']!r}, {_ARGMAX_LAYOUT}")
    if problems:
        raise _refusal(problems)


def check_token_model(model: torch.nn.Module) -> None:
    """Refuse a model whose towers the hooks cannot read, before any training."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"its image tower is {type(visual).__name__}, not OpenCLIP's VisionTransformer")
    elif visual.attn_pool is not None or visual.final_ln_after_pool:
        problems.append("its ViT pools with attention or normalises after pooling")
    if not isinstance(getattr(model, "ln_final", None), torch.nn.LayerNorm):
        problems.append("its text tower is not OpenCLIP's built-in text transformer")
    elif getattr(model, "text_pool_type", None) != "argmax":
        # argmax pooling goes with SimpleTokenizer's layout, the one token_mask reads; the
        # worldwide, mT5, SigLIP and CLIPA text towers use other tokenizers
        problems.append(f"its text tower pools with {getattr(model, 'text_pool_type', None)!r}, "
                        f"{_ARGMAX_LAYOUT}")
    if problems:
        raise _refusal(problems)


def _projected(features: torch.Tensor,
               projection: torch.Tensor | torch.nn.Linear | None) -> torch.Tensor:
    """Features in the shared embedding space, as the tower projects its pooled feature."""
    if projection is None:
        return features
    if isinstance(projection, torch.nn.Linear):
        return projection(features)
    return features @ projection


def token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[rows, L] bool: the text positions the local score counts (not padding, not start)."""
    mask = tokens != PAD_TOKEN
    mask[:, 0] = False
    return mask


def attach_token_hooks(model: torch.nn.Module, num_negatives: int) -> None:
    """Add the patch and caption token features of each training forward to the output dict.

    Registered after `packing.attach_model_hooks`, so the pre-hook sees the unpacked caption rows
    and the output hook runs after the packing hook has cut the mirrored rows off.
    """
    check_token_model(model)
    kept: dict[str, Any] = {}
    visual = model.visual

    def keep_patches(module, args, output):
        if module.training:
            kept["patches"] = _projected(visual._global_pool(output)[1], visual.proj)

    def keep_text(module, args, output):
        if module.training:
            kept["text"] = _projected(output, model.text_projection)

    def keep_ids(module, args, kwargs):
        kept.clear()
        text = args[1] if len(args) > 1 else kwargs.get("text")
        if module.training and isinstance(text, torch.Tensor):
            kept["ids"] = text

    def add_tokens(module, args, kwargs, output):
        patches, text, ids = kept.pop("patches", None), kept.pop("text", None), kept.pop("ids", None)
        if not isinstance(output, dict) or patches is None or text is None or ids is None:
            return output
        batch, rows = output["image_features"].shape[0], 1 + num_negatives
        if PackedOutputs.read(output).neg_mask is None or ids.shape[0] < batch * rows:
            return output  # not packed rows (a caller's own forward): the term says what is missing
        text = text[:batch * rows]
        mask = token_mask(ids[:batch * rows]).to(text.device)
        return PackedOutputs(image_tokens=patches[:batch],
                             text_tokens=text.view(batch, rows, *text.shape[1:]),
                             text_token_mask=mask.view(batch, rows, -1)).write(output)

    visual.ln_post.register_forward_hook(keep_patches)
    model.ln_final.register_forward_hook(keep_text)
    model.register_forward_pre_hook(keep_ids, with_kwargs=True)
    model.register_forward_hook(add_tokens, with_kwargs=True)
