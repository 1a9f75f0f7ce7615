"""The parts of ``FusionModel.pretrain_step``, one function each, in the order the step calls them.

- ``check_pretrain_batch``: the batch's shapes and dataset indices.
- ``PretrainStates``: what the shared encoding (``FusionModel._encode_pairs``) hands to the three terms.
- ``itc_term`` (``plugged_itc``): image-text contrast over the (gathered) ITC features; ALBEF's
  momentum ITC with its queue, or a plugged loss.
- ``fuse_with_hard_negatives``: ITM's hard negatives, then the one fusion call of 4B sequences that
  ITM and MLM share.
- ``itm_term``: image-text matching over the 3B fused pairs.
- ``mlm_term``: masked language modelling at the masked positions, with momentum distillation.

The order of the calls is the order of the random draws (masking, then the two negative draws, on
one generator) and of the autograd graph, so a step is bitwise what it was when it was one function.
The loss formulas are in ``objectives.py`` and docs/fusion.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plait import distributed
from plait._checks import integer_vector
from plait.models.contract import ObjectiveError, apply_objective
from plait.models.fusion.encoders import FusionEncoder
from plait.models.fusion.layers import MLMHead
from plait.models.fusion.objectives import IGNORE, momentum_itc_loss, same_caption, sample_hard_negatives
from plait.models.fusion.queue import FeatureQueue
from plait.types import PairFeatures


@dataclass
class PretrainStates:
    """What one pre-training batch's encoders give ITC, ITM and MLM (B pairs, T tokens, P patches,
    D text width, D_v image width)."""

    image: Tensor  # (B, 1 + P, D_v) image tokens
    text: Tensor  # (B, T, D) text-encoder states of the captions
    text_masked: Tensor  # (B, T, D) the same of MLM's masked captions
    mask: Tensor  # (B, T) bool attention mask, on the model's device
    labels: Tensor  # (B, T) MLM labels, on the CPU: the original id at the chosen positions, IGNORE elsewhere
    image_m: Tensor  # (B, 1 + P, D_v) the momentum image encoder's tokens
    text_m: Tensor  # (2B, T, D) the momentum text encoder's states, captions then masked ones ((B, T, D) without distillation)
    scale: Tensor  # () exp(logit_scale) clamped at 100
    features: PairFeatures  # ITC's (B, embed_dim) float32 features: a=z_image, b=z_text, a_aug=m_image, b_aug=m_text


def check_pretrain_batch(images: Tensor, texts: list[str], index: Tensor, device: torch.device) -> Tensor:
    """``index`` as a (B,) integer tensor on ``device``, once the batch is checked: one caption per
    image (B images (B, 3, S, S)), B >= 2 (ITM draws its negatives from the batch), indices >= 0."""
    batch = images.shape[0]
    if isinstance(texts, str) or len(texts) != batch:
        raise ValueError(f"pretrain_step needs one caption per image: {batch} images, "
                         f"{'a string' if isinstance(texts, str) else len(texts)} texts")
    if batch < 2:
        raise ValueError("pretrain_step needs a batch of at least 2 pairs (ITM draws negatives from the batch)")
    index = integer_vector(index, "index", batch, device, " (one dataset index per pair)")
    if bool((index < 0).any()):
        raise ValueError("dataset indices must be >= 0")
    return index


def itc_term(features: PairFeatures, itc_loss: nn.Module | None, alpha: float, queue: FeatureQueue, *,
             enqueue: bool, independent: bool) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """ITC over the (gathered, (B_all, embed_dim)) features, in float32 even under autocast (the
    project's losses keep their internals float32).

    ``itc_loss=None``: ``momentum_itc_loss`` over [batch; queue] with distillation weight ``alpha``,
    then, with ``enqueue`` (training mode), the batch's momentum features written to ``queue``.
    Otherwise ``plugged_itc``, and the logits s z_image m_text^T, s z_text m_image^T computed
    without gradient. Returns (itc, this rank's (B, B) block of those two logits, for the hard
    negatives, and the plugged objective's stats as ``itc/<name>``)."""
    mine = distributed.local_rows(features.a.shape[0])
    stats: dict[str, Tensor] = {}
    with torch.autocast(device_type=features.a.device.type, enabled=False):
        if itc_loss is None:
            itc, logits_i2t, logits_t2i = momentum_itc_loss(
                features.a, features.b, features.a_aug, features.b_aug, features.logit_scale, alpha, features.index,
                queue.contents() if queue.size else None)
            if enqueue:
                queue.enqueue(features.a_aug, features.b_aug, features.index)
        else:
            with torch.no_grad():
                logits_i2t = features.logit_scale * features.a @ features.b_aug.T
                logits_t2i = features.logit_scale * features.b @ features.a_aug.T
            itc, stats = plugged_itc(features, itc_loss, independent=independent)
    return itc, logits_i2t[mine, mine], logits_t2i[mine, mine], stats


def plugged_itc(features: PairFeatures, itc_loss: nn.Module, *, independent: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """A plugged ITC on the in-batch features (no queue) and its stats: a ``ContrastiveObjective`` is
    called with the ``PairFeatures`` (``independent``: the model has the independent heads that feature
    separation needs); any other loss module as ``itc_loss(z_image, z_text, scale, index=index)``, whose
    ValueError becomes an ``ObjectiveError`` carrying the features (so the trainer names the items)."""
    from plait.losses.objective import ContrastiveObjective

    if isinstance(itc_loss, ContrastiveObjective):
        if itc_loss.needs_independent and not independent:
            raise ValueError("the feature separation regulariser needs FusionModel(independent=True)")
        itc = apply_objective(itc_loss, features)  # a refusal names the batch's features
        return itc, {f"itc/{k}": v for k, v in itc_loss.stats.items() if torch.is_tensor(v)}
    try:
        return itc_loss(features.a, features.b, features.logit_scale, index=features.index), {}
    except ValueError as error:
        raise ObjectiveError(str(error), features) from error


def fuse_with_hard_negatives(fusion: FusionEncoder, states: PretrainStates, texts: list[str], index: Tensor,
                             logits_i2t: Tensor, logits_t2i: Tensor,
                             generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """ITM's hard negatives and the one call of ``fusion`` on 4B sequences that ITM and MLM share.

    For each image a negative text, and for each text a negative image, is drawn by
    ``sample_hard_negatives`` (with ``generator``) from the softmax of this rank's ITC logits
    (B, B), the positive and every item with the same caption or dataset index excluded. Returns
    the fused states (4B, T, D) of, in blocks of B: the positive pairs, (negative text, image),
    (text, negative image) and (masked caption, image) for MLM; and text_ok, image_ok (B,) bool on
    the CPU: whether the row had a negative to draw."""
    forbidden = same_caption(list(texts), index)
    negative_text, text_ok = sample_hard_negatives(logits_i2t, forbidden, generator)  # a text per image
    negative_image, image_ok = sample_hard_negatives(logits_t2i, forbidden, generator)  # an image per text
    device = states.text.device
    negative_text, negative_image = negative_text[:, 0].to(device), negative_image[:, 0].to(device)
    text, mask, image = states.text, states.mask, states.image
    fused = fusion(
        torch.cat([text, text[negative_text], text, states.text_masked]),
        torch.cat([mask, mask[negative_text], mask, mask]),
        torch.cat([image, image, image[negative_image], image]),
    )
    return fused, text_ok, image_ok


def itm_term(itm_head: nn.Module, fused_cls: Tensor, text_ok: Tensor, image_ok: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """ITM from the fused [CLS] states (3B, D) of the B positives (label 1), then the B negative texts
    and the B negative images (label 0):

        itm = sum_k w_k CE(itm_head(h_k), y_k) / sum_k w_k,   w_k = 0 for a negative that could not be
                                                              drawn (``text_ok`` / ``image_ok`` False), else 1

    Returns (itm, {"itm_accuracy": the same weighted mean of argmax == label})."""
    batch, device = text_ok.shape[0], fused_cls.device
    itm_logits = itm_head(fused_cls).float()
    itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(device)
    pair_weight = torch.cat([torch.ones(batch, dtype=torch.bool), text_ok, image_ok]).float().to(device)
    itm = (F.cross_entropy(itm_logits, itm_labels, reduction="none") * pair_weight).sum() / pair_weight.sum()
    with torch.no_grad():
        accuracy = ((itm_logits.argmax(1) == itm_labels).float() * pair_weight).sum() / pair_weight.sum()
    return itm, {"itm_accuracy": accuracy}


def mlm_term(mlm_head: MLMHead, word_embeddings: Tensor, fused: Tensor, states: PretrainStates, alpha: float,
             teacher: nn.ModuleDict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """MLM from the masked captions' fused states, ``fused[3B:]`` (B, T, D): the tied decoder
    (``mlm_head`` with ``word_embeddings`` (V, D)) at the M chosen positions only (the (M, V) logits
    over 30k tokens are the costly part) and

        mlm = CE(logits, labels)                                     (M,) targets, mean over M
        mlm = (1 - alpha) CE + alpha mean_M -sum_V q log softmax(logits)   with a ``teacher``, alpha > 0

    q the softmax of the momentum model's logits on the same masked input (``teacher``: the momentum
    copies, with "fusion", "mlm_head" and "text_encoder"). Without a masked token: 0 with the graph
    kept (DDP needs every parameter in it). Returns (mlm, {"mlm_accuracy" (NaN without a masked
    token), "masked_tokens": M})."""
    batch, device = states.text.shape[0], fused.device
    chosen = (states.labels != IGNORE).to(device)
    targets = states.labels.to(device)[chosen]
    mlm_logits = mlm_head(fused[3 * batch:][chosen], word_embeddings).float()
    if targets.numel() == 0:
        mlm = fused[3 * batch:].sum() * 0.0
        if distributed.active():  # DDP needs every parameter in every step's graph: the head's (zero) gradient
            mlm = mlm + mlm_logits.sum() * 0.0
    else:
        mlm = F.cross_entropy(mlm_logits, targets)
        if teacher is not None and alpha > 0:
            with torch.no_grad():
                fused_m = teacher["fusion"](states.text_m[batch:], states.mask, states.image_m)
                logits_m = teacher["mlm_head"](fused_m[chosen], teacher["text_encoder"].embeddings.word.weight)
                soft = F.softmax(logits_m.float(), dim=-1)
            distill = -(soft * F.log_softmax(mlm_logits, dim=-1)).sum(-1).mean()
            mlm = (1 - alpha) * mlm + alpha * distill
    with torch.no_grad():
        if targets.numel():
            accuracy = (mlm_logits.argmax(1) == targets).float().mean()
        else:
            accuracy = torch.tensor(float("nan"), device=device)
    return mlm, {"mlm_accuracy": accuracy, "masked_tokens": torch.tensor(float(targets.numel()), device=device)}


__all__ = ["PretrainStates", "check_pretrain_batch", "fuse_with_hard_negatives", "itc_term", "itm_term", "mlm_term",
           "plugged_itc"]
