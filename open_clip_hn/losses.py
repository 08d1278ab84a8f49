"""The hard-negative loss terms as pure tensor functions.

Every function takes features that are already gathered across ranks (see `distributed.py`),
masks and scales, and returns a scalar (or per-row) tensor: no state, no I/O, no collectives.
That is what lets a test compare one process with N processes term by term.

Shapes: A anchors (the rows this rank averages over), N samples in the global batch, K hard
negatives per sample, D embedding width. Features are L2-normalised (OpenCLIP's outputs are);
`labels[a]` is the global row of anchor a's own pair. Masked slots never contribute: their
logits are -inf, so they carry neither probability mass nor gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def split_text_features(text_features: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-sample interleaved rows [pos_0, neg_0_1..neg_0_K, pos_1, ...] into
    positives [B, D] and negatives [B, K, D] (views, no copy)."""
    rows, dim = text_features.shape
    if rows % batch_size:
        raise ValueError(f"text_features has {rows} rows, not a multiple of the {batch_size} images; "
                         "expected B*(1+K) rows interleaved per sample")
    grouped = text_features.view(batch_size, rows // batch_size, dim)
    return grouped[:, 0], grouped[:, 1:]


def fix_negatives(text_features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The same interleaved rows with the K negatives' rows detached (--hn-negative-grad none):
    the terms can then move the images and the positive captions, never a generated negative."""
    positives, negatives = split_text_features(text_features, batch_size)
    return torch.cat([positives.unsqueeze(1), negatives.detach()], dim=1).reshape(text_features.shape)


def _masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf"))


def contrastive_logits(
        image_anchor: torch.Tensor,
        text_anchor: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        all_negatives: torch.Tensor,
        negative_mask: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NegCLIP logits: image->text over the N positives and the N*K hard negatives (masked ones
    at -inf), text->image over the N images only. Returns ([A, N + N*K], [A, N])."""
    per_image = logit_scale * image_anchor @ all_text.T
    if all_negatives.shape[1]:
        negatives = logit_scale * image_anchor @ all_negatives.flatten(0, 1).T
        negatives = _masked_logits(negatives, negative_mask.flatten().unsqueeze(0))
        per_image = torch.cat([per_image, negatives], dim=1)
    per_text = logit_scale * text_anchor @ all_image.T
    if logit_bias is not None:
        per_image = per_image + logit_bias
        per_text = per_text + logit_bias
    return per_image, per_text


def itc_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE, OpenCLIP's ClipLoss reduction: (CE(i->t) + CE(t->i)) / 2."""
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def importance_weighted_nce(logits: torch.Tensor, labels: torch.Tensor, beta: float,
                            tau_plus: float, min_logit: torch.Tensor) -> torch.Tensor:
    """Per-row HCL/DiHT loss: negatives reweighted by exp(beta * logit), debiased with tau_plus.

    With M valid negatives l_j and positive p (all logits, i.e. scale * cosine):
        Ng = (M * sum_j w_j e^{l_j} - tau_plus * M * e^p) / (1 - tau_plus),  w_j = softmax_j(beta * l_j)
        Ng >= M * e^{min_logit}  (HCL's clamp, so debiasing never makes the denominator vanish)
        loss = log(e^p + Ng) - p
    Computed in log space. beta = tau_plus = 0 is exactly InfoNCE. Rows without negatives give 0.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, labels]
    valid = torch.isfinite(logits).index_put((rows, labels), torch.tensor(False, device=logits.device))
    count = valid.sum(dim=1)
    has_negatives = count > 0
    # rows without negatives get dummy zeros: their result is discarded, but -inf there would
    # turn into NaN gradients (0 * inf) through logsumexp and beta * (-inf)
    valid = valid | ~has_negatives.unsqueeze(1)
    safe = logits.masked_fill(~valid, 0.0)
    log_count = count.clamp(min=1).to(logits.dtype).log()
    weighted = (torch.logsumexp(((1 + beta) * safe).masked_fill(~valid, float("-inf")), dim=1)
                - torch.logsumexp((beta * safe).masked_fill(~valid, float("-inf")), dim=1))
    log_ng = log_count + weighted
    if tau_plus > 0:
        debias = math.log(tau_plus) + log_count + positive
        gap = (debias - log_ng).clamp(max=-1e-6)  # only used where debias < log_ng
        debiased = torch.where(debias < log_ng, log_ng + torch.log1p(-gap.exp()),
                               torch.full_like(log_ng, float("-inf")))
        log_ng = debiased - math.log1p(-tau_plus)
    log_ng = torch.maximum(log_ng, log_count + min_logit)
    loss = torch.logaddexp(positive, log_ng) - positive
    return torch.where(has_negatives, loss, torch.zeros_like(loss))


def importance_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor,
                    beta: float, tau_plus: float, min_logit: torch.Tensor) -> torch.Tensor:
    """Symmetric importance-weighted contrastive loss (both directions, ClipLoss reduction)."""
    return (importance_weighted_nce(logits_per_image, labels, beta, tau_plus, min_logit).mean()
            + importance_weighted_nce(logits_per_text, labels, beta, tau_plus, min_logit).mean()) / 2


def _own_choice_logits(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                       negative_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """[A, 1 + K] logits of `anchor` against its positive and its own (masked) negatives."""
    pos = (anchor * positive).sum(dim=-1, keepdim=True)
    neg = torch.einsum("ad,akd->ak", anchor, negatives)
    # mask after scaling: d(scale * -inf)/d(scale) would be NaN
    return torch.cat([logit_scale * pos, _masked_logits(logit_scale * neg, negative_mask)], dim=1)


def _first_is_target(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _first_choice_loss(logits: torch.Tensor, smoothing: float = 0.0, focal_gamma: float = 0.0
                       ) -> torch.Tensor:
    """Mean over the rows of a choice whose answer is column 0: plain CE, or `soft_cross_entropy`
    where smoothing or focal weighting is asked for. A row whose other columns are all masked
    gives exactly 0."""
    if smoothing or focal_gamma:
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return soft_cross_entropy(logits, labels, smoothing, focal_gamma).mean()
    return _first_is_target(logits).mean()


def choice_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor,
                negative_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Each image picks its caption among that caption's own hard negatives: mean CE over [A].
    A sample without valid negatives contributes exactly 0."""
    return _first_choice_loss(_own_choice_logits(image, text, negatives, negative_mask, logit_scale))


def intra_loss(image: torch.Tensor, text: torch.Tensor, all_negatives: torch.Tensor,
               all_negative_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CE-CLIP's intra-modal contrast (IMC): each caption T is the anchor, its image the positive
    and every valid hard negative of the (gathered) batch the negatives, by text-text similarity:
        -log e^{s<T,I>} / (e^{s<T,I>} + sum_{j,k} e^{s<T,T_jk>}).
    `all_negatives` [N, K, D] with `all_negative_mask` [N, K]; mean CE over the [A] anchors."""
    pos = logit_scale * (text * image).sum(dim=-1, keepdim=True)
    neg = logit_scale * text @ all_negatives.flatten(0, 1).T  # [A, N*K]
    logits = torch.cat([pos, _masked_logits(neg, all_negative_mask.flatten().expand_as(neg))], dim=1)
    return _first_choice_loss(logits)


def mirror_gaps(image: torch.Tensor, text: torch.Tensor, mirror_image: torch.Tensor,
                mirror_text: torch.Tensor) -> torch.Tensor:
    """[A, 4] cosine <a,n> - <a,p> of the four two-way choices inside each (pair, mirrored pair):
    image: caption over mirrored caption; mirrored image: the reverse; caption: image over
    mirrored image; mirrored caption: the reverse. Below 0 where the choice is won."""
    own = (image * text).sum(dim=-1)
    mirror_own = (mirror_image * mirror_text).sum(dim=-1)
    image_mirror_text = (image * mirror_text).sum(dim=-1)
    mirror_image_text = (mirror_image * text).sum(dim=-1)
    return torch.stack([image_mirror_text - own, mirror_image_text - mirror_own,
                        mirror_image_text - own, image_mirror_text - mirror_own], dim=1)


def mirror_loss(image: torch.Tensor, text: torch.Tensor, mirror_image: torch.Tensor,
                mirror_text: torch.Tensor, mirror_mask: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """The four choices of `mirror_gaps`, each -log e^{s<a,p>} / (e^{s<a,p>} + e^{s<a,n>}) =
    softplus(s(<a,n> - <a,p>)); mean of the four over the A rows, where a row without a mirror
    contributes exactly 0 (as `choice_loss` treats a caption without negatives). The
    caption-side choices are what no text negative gives: the image must encode the layout."""
    per_row = F.softplus(logit_scale * mirror_gaps(image, text, mirror_image, mirror_text)).mean(dim=1)
    return (per_row * mirror_mask.to(per_row.dtype)).sum() / max(per_row.shape[0], 1)


def mirror_choice_accuracy(image: torch.Tensor, text: torch.Tensor, mirror_image: torch.Tensor,
                           mirror_text: torch.Tensor, mirror_mask: torch.Tensor) -> torch.Tensor:
    """Share of `mirror_loss`'s four two-way choices that the model gets right (strictly), over
    the rows with a mirror: about 0.5 while the towers cannot tell a pair from its mirror (the
    loss sits at ln 2 per choice; exact ties count as wrong), 1.0 once they read the layout; 0
    when no row has a mirror. Masked arithmetic, no boolean indexing: no host sync on a GPU."""
    gaps = mirror_gaps(image, text, mirror_image, mirror_text)
    rows = mirror_mask.to(gaps.dtype)
    return ((gaps < 0).to(gaps.dtype).sum(dim=1) * rows).sum() / (4 * rows.sum()).clamp(min=1)


def converse_choices(text: torch.Tensor, mirror_text: torch.Tensor, converse: torch.Tensor
                     ) -> torch.Tensor:
    """[A, 2, 3] cosines of the two text-only choices per row, the right answer first: the
    caption against its converse, the mirrored caption, the mirrored caption's converse; the
    mirrored caption against its converse, the caption, the caption's converse. `converse`
    [A, 2, D] holds the caption's converse (the same scene in other words) and the mirrored
    caption's converse."""
    own, mirror_own = converse[:, 0], converse[:, 1]
    caption = torch.stack([(text * c).sum(-1) for c in (own, mirror_text, mirror_own)], dim=1)
    mirrored = torch.stack([(mirror_text * c).sum(-1) for c in (mirror_own, text, own)], dim=1)
    return torch.stack([caption, mirrored], dim=1)


def converse_loss(text: torch.Tensor, mirror_text: torch.Tensor, converse: torch.Tensor,
                  used: torch.Tensor, logit_scale: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Cross-entropy of both `converse_choices` (averaged); with `margin` > 0 instead a hinge
    mean(relu(margin - (cos_right - cos_wrong))) over both choices' two wrong answers, which stops
    pushing once each is won by the margin. Mean over the A rows, where a row without converse
    captions contributes exactly 0 (as `mirror_loss`). The four captions share one bag of words,
    so only a text tower that binds the relation to its two objects can win: what the mirror
    term's image side needs to leave ln 2."""
    choices = converse_choices(text, mirror_text, converse)
    if margin > 0:
        per_row = F.relu(margin - (choices[..., :1] - choices[..., 1:])).mean(dim=(1, 2))
    else:
        per_row = -F.log_softmax(logit_scale * choices, dim=-1)[..., 0].mean(dim=1)
    return (per_row * used.to(per_row.dtype)).sum() / max(per_row.shape[0], 1)


def converse_accuracy(text: torch.Tensor, mirror_text: torch.Tensor, converse: torch.Tensor,
                      used: torch.Tensor) -> torch.Tensor:
    """Share of `converse_choices` won (the converse strictly closest) over the used rows; 0 when
    none is used. Masked arithmetic: no host sync."""
    choices = converse_choices(text, mirror_text, converse)
    won = (choices[..., :1] > choices[..., 1:]).all(dim=-1).to(choices.dtype).sum(dim=1)
    rows = used.to(choices.dtype)
    return (won * rows).sum() / (2 * rows.sum()).clamp(min=1)


def rank_gaps(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Logit gap s*cos(I,T) - s*cos(I,T_k) per hard negative: [A, K]."""
    pos = (image * text).sum(dim=-1, keepdim=True)
    return logit_scale * (pos - torch.einsum("ad,akd->ak", image, negatives))


def rank_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor,
              negative_mask: torch.Tensor, thresholds: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """CE-CLIP's cross-modal rank loss (CMR), in logits as CE-CLIP computes it:
    relu(thr + s*cos(I,T_k) - s*cos(I,T)) per valid negative, averaged over each sample's valid
    negatives, then over samples (no negative -> 0). `thresholds` [A, K] is each slot's
    per-type margin (logit units)."""
    hinge = F.relu(thresholds - rank_gaps(image, text, negatives, logit_scale))
    hinge = torch.where(negative_mask, hinge, torch.zeros_like(hinge))
    count = negative_mask.sum(dim=1).clamp(min=1)
    return (hinge.sum(dim=1) / count).mean()


def mined_loss(image_anchor: torch.Tensor, text_anchor: torch.Tensor, all_image: torch.Tensor,
               all_text: torch.Tensor, labels: torch.Tensor, mined_text: torch.Tensor,
               mined_text_mask: torch.Tensor, mined_image: torch.Tensor, mined_image_mask: torch.Tensor,
               logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose denominators also hold each anchor's mined bank entries:
    image a vs the N texts + its mined texts [A, k, D]; text a vs the N images + its mined
    images. Mined features are constants (detached here, whatever the caller passes)."""
    def direction(anchor, columns, mined, mask):
        in_batch = logit_scale * anchor @ columns.T
        extra = logit_scale * torch.einsum("ad,akd->ak", anchor, mined.detach())
        return F.cross_entropy(torch.cat([in_batch, _masked_logits(extra, mask)], dim=1), labels)

    return (direction(image_anchor, all_text, mined_text, mined_text_mask)
            + direction(text_anchor, all_image, mined_image, mined_image_mask)) / 2


def similarity_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)); the teacher is a constant."""
    teacher = F.log_softmax(teacher_logits.detach(), dim=1)
    return (teacher.exp() * (teacher - F.log_softmax(student_logits, dim=1))).sum(dim=1).mean()


def distill_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor,
                 all_text: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                 teacher_all_image: torch.Tensor, teacher_all_text: torch.Tensor,
                 logit_scale: torch.Tensor, teacher_logit_scale: torch.Tensor) -> torch.Tensor:
    """Similarity distillation over the ordinary batch (positives only): each anchor image's
    softmax over the N captions, and each anchor caption's over the N images, matches the
    teacher's (KL, both directions averaged). Each model's logits use its own logit scale, as
    OpenCLIP's `DistillClipLoss` does; the teacher's side carries no gradient."""
    student_i2t = logit_scale * image @ all_text.T
    student_t2i = logit_scale * text @ all_image.T
    teacher_i2t = teacher_logit_scale * teacher_image @ teacher_all_text.T
    teacher_t2i = teacher_logit_scale * teacher_text @ teacher_all_image.T
    return (similarity_kl(student_i2t, teacher_i2t) + similarity_kl(student_t2i, teacher_t2i)) / 2


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                       focal_gamma: float = 0.0) -> torch.Tensor:
    """Per-row focal cross-entropy with label smoothing (FSC-CLIP's softer hard negatives), over
    the finite (valid) logits of each row only:
        loss = -sum_{valid j} q_j (1 - p_j)^gamma log p_j,
        q_y = 1 - eps + eps / M,  q_j = eps / M otherwise,
    with M the row's valid columns (the target itself included): each column is damped by its
    own probability, so the smoothing targets keep pulling an over-confident target back.
    eps = gamma = 0 is plain CE. Masked (-inf) columns get neither target mass nor gradient."""
    log_p = F.log_softmax(logits, dim=1)
    valid = torch.isfinite(logits)
    target = torch.zeros_like(log_p).scatter_(1, labels.unsqueeze(1), 1.0)
    if smoothing > 0:
        uniform = valid.to(log_p.dtype) / valid.sum(dim=1, keepdim=True)
        target = (1 - smoothing) * target + smoothing * uniform
    per_column = -torch.where(valid, log_p, torch.zeros_like(log_p))
    if focal_gamma > 0:
        # clamped away from 0: (1 - p)^gamma has an infinite slope at p = 1 for gamma < 1
        per_column = (1 - log_p.exp()).clamp(min=1e-6) ** focal_gamma * per_column
    return (target * per_column).sum(dim=1)


def softened_itc_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                      labels: torch.Tensor, smoothing: float, focal_gamma: float) -> torch.Tensor:
    """`itc_loss` whose image->text side (the one holding the text negatives) is
    `soft_cross_entropy`; text->image stays plain CE."""
    return (soft_cross_entropy(logits_per_image, labels, smoothing, focal_gamma).mean()
            + F.cross_entropy(logits_per_text, labels)) / 2


def softened_choice_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor,
                         negative_mask: torch.Tensor, logit_scale: torch.Tensor, smoothing: float,
                         focal_gamma: float) -> torch.Tensor:
    """`choice_loss` with `soft_cross_entropy` (a sample without valid negatives still gives 0)."""
    return _first_choice_loss(_own_choice_logits(image, text, negatives, negative_mask, logit_scale),
                              smoothing, focal_gamma)


def local_alignment_scores(image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                           token_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """FSC-CLIP's token-level score of each caption row against its own image: [A, R].

    image_tokens [A, P, D] (patch tokens, projected), text_tokens [A, R, L, D] (token features,
    projected; R caption rows per image), token_mask [A, R, L] (the tokens that count). Each
    caption token groups the patches it matches: weights min-max normalised over the patches,
    then summed to 1, computed without gradient (they choose, they are not trained); the score is
    the log-sum-exp over the row's tokens of s·cos(token, its grouped patches). Where the composed
    caption binds a word to the wrong object, some token finds no patch group that fits it.
    """
    present = token_mask.flatten(0, 1).any(dim=0).nonzero()
    length = int(present.max()) + 1 if present.numel() else 1  # drop trailing padding columns
    text_tokens, token_mask = text_tokens[:, :, :length], token_mask[:, :, :length]
    similarity = torch.einsum("arld,apd->arlp", text_tokens, image_tokens).detach()
    low = similarity.amin(dim=-1, keepdim=True)
    weights = (similarity - low) / (similarity.amax(dim=-1, keepdim=True) - low).clamp(min=1e-6)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-6)
    grouped = F.normalize(torch.einsum("arlp,apd->arld", weights, image_tokens), dim=-1)
    cosines = (grouped * F.normalize(text_tokens, dim=-1)).sum(dim=-1)
    # mask after scaling (see _own_choice_logits); a row without tokens scores -inf
    return torch.logsumexp(_masked_logits(logit_scale * cosines, token_mask), dim=-1)


def local_choice_loss(scores: torch.Tensor, negative_mask: torch.Tensor, smoothing: float = 0.0,
                      focal_gamma: float = 0.0) -> torch.Tensor:
    """`choice_loss` over token-level scores [A, 1 + K] (caption first): each image picks its
    caption among that caption's valid negatives. A sample without valid negatives gives 0."""
    logits = torch.cat([scores[:, :1], _masked_logits(scores[:, 1:], negative_mask)], dim=1)
    return _first_choice_loss(logits, smoothing, focal_gamma)
