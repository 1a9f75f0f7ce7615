"""The pieces of ALBEF's pre-training losses, as plain functions (tested one by one).

- ``momentum_itc_loss``: image-text contrastive loss over [batch; queue] with momentum distillation.
- ``same_caption``, ``negative_probabilities``, ``sample_hard_negatives``: ITM's hard negatives.
- ``mask_tokens``: BERT's masking for MLM (15%; 80% [MASK], 10% random, 10% kept).

Every random draw takes a ``torch.Generator`` (CPU) so a run is reproducible and resumable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # all-MiniLM-L6-v2's WordPiece special tokens
IGNORE = -100  # label of positions without an MLM target (F.cross_entropy's ignore_index)


def momentum_itc_loss(z_image: Tensor, z_text: Tensor, m_image: Tensor, m_text: Tensor, scale: Tensor,
                      alpha: float, index: Tensor | None = None, queue: tuple[Tensor, Tensor, Tensor] | None = None,
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF's ITC with momentum distillation.

    Candidates are the momentum features of the batch and the queue: T = [m_text; queue_text],
    I = [m_image; queue_image] ((B + n, E)); with s = ``scale`` (1 / temperature)::

        p_i2t = softmax(s z_image T^T)             (B, B + n), the online image against every text
        q_i2t = alpha softmax(s m_image T^T) + (1 - alpha) y         (the momentum model's soft targets)
        L = 1/2 [ mean_i -sum_j q_i2t[i, j] log p_i2t[i, j] + (the same, text -> image) ]

    y is the one-hot positive; with ``index`` (B,) every candidate carrying the anchor's dataset
    index is a positive (a queue row of an earlier visit of the same item), y uniform over them.
    alpha = 0 is InfoNCE of the online anchors over [batch; queue] momentum candidates. The targets
    carry no gradient; the gradient flows into z_image, z_text and the scale.

    ``queue``: (image (n, E), text (n, E), index (n,)) or None. Returns (loss, the batch part of the
    logits s z_image m_text^T (B, B) and s z_text m_image^T (B, B), detached) for ITM's hard negatives.
    """
    batch = z_image.shape[0]
    dtype = torch.promote_types(z_image.dtype, torch.float32)
    z_image, z_text, m_image, m_text = (t.to(dtype) for t in (z_image, z_text, m_image, m_text))
    scale = scale.to(dtype)
    own = torch.arange(batch, device=z_image.device) if index is None else index.to(z_image.device)
    images, texts, indices = m_image, m_text, own
    if queue is not None and queue[2].numel():
        q_image, q_text, q_index = queue
        images = torch.cat([m_image, q_image.to(device=z_image.device, dtype=dtype)])
        texts = torch.cat([m_text, q_text.to(device=z_image.device, dtype=dtype)])
        # without dataset indices a queue row is never a positive (-1 matches no arange index >= 0)
        q_index = q_index.to(z_image.device) if index is not None else torch.full_like(q_index, -1, device=z_image.device)
        indices = torch.cat([own, q_index])
    with torch.no_grad():
        positive = (own[:, None] == indices[None, :]).to(dtype)
        if index is None:
            positive[:, :batch] = torch.eye(batch, dtype=dtype, device=z_image.device)
        positive = positive / positive.sum(1, keepdim=True)
        s = scale.detach()
        target_i2t = alpha * F.softmax(s * m_image @ texts.T, dim=1) + (1 - alpha) * positive
        target_t2i = alpha * F.softmax(s * m_text @ images.T, dim=1) + (1 - alpha) * positive
    logits_i2t = scale * z_image @ texts.T
    logits_t2i = scale * z_text @ images.T
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * target_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * target_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, logits_i2t[:, :batch].detach(), logits_t2i[:, :batch].detach()


def same_caption(texts: list[str], index: Tensor | None = None) -> Tensor:
    """(B, B) bool, True where items i and j have the identical caption string or (with ``index``)
    the same dataset index; the diagonal is True. Such pairs are never each other's ITM negative."""
    codes: dict[str, int] = {}
    ids = torch.tensor([codes.setdefault(t, len(codes)) for t in texts])
    same = ids[:, None] == ids[None, :]
    if index is not None:
        index = index.cpu()
        same |= index[:, None] == index[None, :]
    return same


def negative_probabilities(logits: Tensor, forbidden: Tensor) -> Tensor:
    """ALBEF's hard-negative distribution, float64: P[i, j] = exp(l_ij) / sum_{k allowed} exp(l_ik)
    over the allowed j (``forbidden`` (B, B) False), 0 elsewhere; a row with no allowed j is all 0."""
    logits = logits.detach().to(device="cpu", dtype=torch.float64).masked_fill(forbidden.cpu(), float("-inf"))
    empty = torch.isinf(logits).all(1, keepdim=True)
    return torch.softmax(logits.masked_fill(empty, 0.0), dim=1).masked_fill(empty, 0.0)


def sample_hard_negatives(logits: Tensor, forbidden: Tensor, generator: torch.Generator | None = None,
                          draws: int = 1) -> tuple[Tensor, Tensor]:
    """For each row i, ``draws`` column(s) j ~ ``negative_probabilities(logits, forbidden)[i]``
    (with replacement across draws): row i's hard negative, never a forbidden j (the positive and
    same-caption items). Returns (choice (B, draws) int64, valid (B,) bool); a row with no allowed
    column (every item shares its caption) is not valid and its choice is meaningless (0).
    Drawn on the CPU with ``generator``: the same draws on every device."""
    probabilities = negative_probabilities(logits, forbidden)
    valid = probabilities.sum(1) > 0
    weights = torch.where(valid[:, None], probabilities, torch.ones_like(probabilities))
    choice = torch.multinomial(weights, draws, replacement=True, generator=generator)
    return choice.masked_fill(~valid[:, None], 0), valid


def mask_tokens(ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None, *,
                vocab_size: int = 30522, probability: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """BERT's MLM corruption of ids (B, T) (CPU): each real token other than [CLS], [SEP], [PAD]
    is chosen with ``probability``; a chosen token becomes [MASK] with ``mask_fraction``, a
    uniformly random vocabulary id with ``random_fraction``, and stays itself otherwise.

    Returns (corrupted ids (B, T), labels (B, T)): labels hold the original id at the chosen
    positions and -100 (ignored by cross-entropy) everywhere else."""
    if not (0 <= probability <= 1 and 0 <= mask_fraction and 0 <= random_fraction and mask_fraction + random_fraction <= 1):
        raise ValueError(f"MLM fractions must be probabilities with mask + random <= 1, got "
                         f"{probability}, {mask_fraction}, {random_fraction}")
    ids, attention_mask = ids.cpu(), attention_mask.cpu().bool()
    special = ~attention_mask | (ids == PAD) | (ids == CLS) | (ids == SEP)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    kind = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    to_mask = chosen & (kind < mask_fraction)
    to_random = chosen & (kind >= mask_fraction) & (kind < mask_fraction + random_fraction)
    corrupted = ids.masked_fill(to_mask, MASK).where(~to_random, random_ids)
    labels = ids.masked_fill(~chosen, IGNORE)
    return corrupted, labels
