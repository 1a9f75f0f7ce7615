"""plait.models.fusion.pretraining: each part of pretrain_step on small tensors, against a hand
computation (tests/models/test_fusion.py checks the whole step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.losses import InfoNCELoss
from plait.losses.objective import ContrastiveObjective, PairFeatures
from plait.losses.regularizers import FeatureSeparation
from plait.models.contract import ObjectiveError
from plait.models.fusion import FeatureQueue, momentum_itc_loss, same_caption, sample_hard_negatives
from plait.models.fusion.layers import MLMHead
from plait.models.fusion.objectives import IGNORE
from plait.models.fusion.pretraining import (
    PretrainStates,
    check_pretrain_batch,
    fuse_with_hard_negatives,
    itc_term,
    itm_term,
    mlm_term,
)

B, T, D, V, E = 4, 5, 6, 11, 3  # pairs, tokens, width, vocabulary, embed_dim


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def features(index=None) -> PairFeatures:
    index = torch.arange(B) if index is None else index
    return PairFeatures(unit(B, E, seed=0).requires_grad_(), unit(B, E, seed=1).requires_grad_(), index,
                        torch.tensor(5.0, requires_grad=True), unit(B, E, seed=2), unit(B, E, seed=3))


def states(labels=None, text_m=None, image_m=None) -> PretrainStates:
    """Token states whose values name their row: text row i is i, masked text -i, image 100 + i."""
    rows = torch.arange(B, dtype=torch.float32)[:, None, None]
    text = rows.expand(B, T, D).clone()
    image = (100 + rows).expand(B, 2, D).clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return PretrainStates(image, text, -text, mask, labels, image_m, text_m, torch.tensor(5.0), None)


def cross_entropy_by_hand(logits, target):
    return -(logits[target].item() - math.log(sum(math.exp(v) for v in logits.tolist())))


# ---------------------------------------------------------------------------------- the batch
def test_check_pretrain_batch_returns_the_index_and_refuses_bad_batches():
    images = torch.zeros(B, 3, 8, 8)
    index = check_pretrain_batch(images, ["a"] * B, torch.tensor([3, 1, 4, 1], dtype=torch.int32), torch.device("cpu"))
    assert index.dtype == torch.long and index.tolist() == [3, 1, 4, 1]
    with pytest.raises(ValueError, match="integer torch.Tensor of shape"):
        check_pretrain_batch(images, ["a"] * B, [3, 1, 4, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match="one dataset index per pair"):
        check_pretrain_batch(images, ["a"] * B, torch.arange(3), torch.device("cpu"))
    with pytest.raises(ValueError, match="one caption per image: 4 images, a string texts"):
        check_pretrain_batch(images, "abcd", index, torch.device("cpu"))
    with pytest.raises(ValueError, match="one caption per image: 4 images, 3 texts"):
        check_pretrain_batch(images, ["a"] * 3, index, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        check_pretrain_batch(images[:1], ["a"], torch.tensor([0]), torch.device("cpu"))
    with pytest.raises(ValueError, match=">= 0"):
        check_pretrain_batch(images, ["a"] * B, torch.tensor([0, 1, -1, 2]), torch.device("cpu"))


# ---------------------------------------------------------------------------------- ITC
def test_own_itc_is_momentum_itc_over_batch_and_queue_then_enqueues_in_training_only():
    f = features()
    queue = FeatureQueue(8, E)
    queue.enqueue(unit(3, E, seed=4), unit(3, E, seed=5), torch.tensor([40, 1, 42]))  # 1: a queue positive of item 1
    contents = tuple(t.clone() for t in queue.contents())
    itc, logits_i2t, logits_t2i, stats = itc_term(f, None, 0.4, queue, enqueue=False, independent=False)
    expected, expected_i2t, expected_t2i = momentum_itc_loss(f.a, f.b, f.a_aug, f.b_aug, f.logit_scale, 0.4, f.index, contents)
    assert torch.equal(itc, expected) and stats == {} and itc.requires_grad
    assert torch.equal(logits_i2t, expected_i2t) and torch.equal(logits_t2i, expected_t2i) and logits_i2t.shape == (B, B)
    torch.testing.assert_close(logits_i2t, 5.0 * f.a.detach() @ f.b_aug.T)  # s z_image m_text^T
    assert int(queue.ptr) == 3  # evaluation: the queue is only read
    itc_term(f, None, 0.4, queue, enqueue=True, independent=False)
    assert int(queue.ptr) == 7 and queue.index.tolist()[3:7] == [0, 1, 2, 3]
    assert torch.equal(queue.image[3:7], f.a_aug) and torch.equal(queue.text[3:7], f.b_aug)


def test_a_plugged_loss_is_called_with_open_clips_convention_and_leaves_the_queue_alone():
    calls = []

    class Recorder(nn.Module):
        def forward(self, a, b, scale, index=None):
            calls.append((a, b, scale, index))
            return (a * b).sum() * scale

    f, queue = features(index=torch.tensor([7, 8, 9, 10])), FeatureQueue(8, E)
    itc, logits_i2t, logits_t2i, stats = itc_term(f, Recorder(), 0.4, queue, enqueue=True, independent=False)
    (a, b, scale, index), = calls
    assert a is f.a and b is f.b and scale is f.logit_scale and index is f.index and stats == {}
    assert torch.equal(itc, (f.a * f.b).sum() * f.logit_scale) and itc.requires_grad
    torch.testing.assert_close(logits_t2i, 5.0 * f.b.detach() @ f.a_aug.T)  # s z_text m_image^T, no gradient
    assert not logits_i2t.requires_grad and int(queue.ptr) == 0 and (queue.index < 0).all()

    class Refuses(nn.Module):
        def forward(self, a, b, scale, index=None):
            raise ValueError("index 9 is out of range")

    with pytest.raises(ObjectiveError, match="index 9 is out of range") as caught:
        itc_term(f, Refuses(), 0.4, queue, enqueue=True, independent=False)
    assert caught.value.features is f


def test_a_plugged_objective_reads_the_momentum_features_and_reports_its_terms():
    f = features()
    objective = ContrastiveObjective(InfoNCELoss())
    itc, _, _, stats = itc_term(f, objective, 0.4, FeatureQueue(0, E), enqueue=True, independent=False)
    torch.testing.assert_close(itc, InfoNCELoss()(f.a, f.b, index=f.index, logit_scale=f.logit_scale))
    assert "itc/base" in stats
    separation = ContrastiveObjective(InfoNCELoss(), regularizers=[("sep", 1.0, FeatureSeparation())])
    with pytest.raises(ValueError, match="independent=True"):
        itc_term(f, separation, 0.4, FeatureQueue(0, E), enqueue=True, independent=False)


# ---------------------------------------------------------------------------------- ITM
class Concatenate(nn.Module):
    """A stand-in fusion encoder: what it was called with, as (text, mask, image)."""

    def forward(self, text, mask, image):
        self.called = (text, mask, image)
        return text


def test_fusion_runs_once_on_positives_negative_texts_negative_images_and_masked_captions():
    texts, index = ["a", "b", "a", "c"], torch.arange(B)
    logits_i2t = torch.randn(B, B, generator=torch.Generator().manual_seed(0))
    logits_t2i = torch.randn(B, B, generator=torch.Generator().manual_seed(1))
    fusion, s = Concatenate(), states()
    fused, text_ok, image_ok = fuse_with_hard_negatives(fusion, s, texts, index, logits_i2t, logits_t2i,
                                                        torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)  # the text negatives are drawn first, from the same generator
    forbidden = same_caption(texts, index)
    negative_text = sample_hard_negatives(logits_i2t, forbidden, replay)[0][:, 0]
    negative_image = sample_hard_negatives(logits_t2i, forbidden, replay)[0][:, 0]
    assert not forbidden[torch.arange(B), negative_text].any() and text_ok.all() and image_ok.all()
    text, mask, image = fusion.called
    assert fused.shape == (4 * B, T, D)
    assert text[:, 0, 0].tolist() == [0, 1, 2, 3, *negative_text.tolist(), 0, 1, 2, 3, 0, -1, -2, -3]
    assert image[:, 0, 0].tolist() == [100, 101, 102, 103] * 2 + [100 + j for j in negative_image.tolist()] + [100, 101, 102, 103]
    assert torch.equal(mask, torch.cat([s.mask, s.mask[negative_text], s.mask, s.mask]))


def test_itm_is_the_mean_cross_entropy_over_the_pairs_kept_by_hand():
    torch.manual_seed(0)
    head = nn.Linear(D, 2)
    fused_cls = torch.randn(3 * B, D, requires_grad=True)
    text_ok = torch.tensor([True, False, True, True])  # image 1 had no negative text: its pair 4 + 1 is dropped
    image_ok = torch.ones(B, dtype=torch.bool)
    itm, stats = itm_term(head, fused_cls, text_ok, image_ok)
    logits = head(fused_cls).detach()
    labels = [1] * B + [0] * (2 * B)
    kept = [k for k in range(3 * B) if k != B + 1]
    expected = sum(cross_entropy_by_hand(logits[k], labels[k]) for k in kept) / len(kept)
    assert itm.item() == pytest.approx(expected, rel=1e-5)
    correct = sum(int(logits[k].argmax()) == labels[k] for k in kept)
    assert stats["itm_accuracy"].item() == pytest.approx(correct / len(kept))
    itm.backward()
    assert torch.equal(fused_cls.grad[B + 1], torch.zeros(D)) and fused_cls.grad[B].abs().sum() > 0


# ---------------------------------------------------------------------------------- MLM
def mlm_setup(chosen_positions):
    torch.manual_seed(0)
    head, embeddings = MLMHead(D, V), torch.randn(V, D)
    fused = torch.randn(4 * B, T, D, requires_grad=True)
    labels = torch.full((B, T), IGNORE)
    for (i, t), target in zip(chosen_positions, (3, 7, 10)):
        labels[i, t] = target
    return head, embeddings, fused, labels


class Doubles(nn.Module):
    """A stand-in momentum fusion encoder: 2 x its text."""

    def forward(self, text, mask, image):
        return 2 * text


def teacher() -> nn.ModuleDict:
    text_encoder = nn.Module()
    text_encoder.embeddings = nn.Module()
    text_encoder.embeddings.word = nn.Embedding(V, D)
    return nn.ModuleDict({"fusion": Doubles(), "mlm_head": MLMHead(D, V), "text_encoder": text_encoder})


def test_mlm_is_the_cross_entropy_at_the_chosen_positions_of_the_masked_rows_by_hand():
    positions = [(0, 1), (2, 3), (3, 2)]
    head, embeddings, fused, labels = mlm_setup(positions)
    mlm, stats = mlm_term(head, embeddings, fused, states(labels), alpha=0.4)  # no teacher: plain CE
    rows = torch.stack([fused[3 * B + i, t] for i, t in positions]).detach()
    logits = F.linear(head.transform(rows), embeddings, head.bias).detach()
    expected = sum(cross_entropy_by_hand(logits[k], target) for k, target in enumerate((3, 7, 10))) / 3
    assert mlm.item() == pytest.approx(expected, rel=1e-5)
    assert stats["masked_tokens"].item() == 3.0
    assert stats["mlm_accuracy"].item() == pytest.approx(sum(int(logits[k].argmax()) == y for k, y in enumerate((3, 7, 10))) / 3)
    mlm.backward()
    assert torch.equal(fused.grad[: 3 * B], torch.zeros(3 * B, T, D))  # ITM's rows get nothing from MLM


def test_mlm_distillation_mixes_the_momentum_models_soft_targets_by_hand():
    positions = [(0, 1), (2, 3), (3, 2)]
    head, embeddings, fused, labels = mlm_setup(positions)
    slow = teacher()
    text_m = torch.randn(2 * B, T, D, generator=torch.Generator().manual_seed(5))  # clean, then masked captions
    s = states(labels, text_m=text_m, image_m=torch.zeros(B, 2, D))
    alpha = 0.25
    mlm, _ = mlm_term(head, embeddings, fused, s, alpha, teacher=slow)
    rows = torch.stack([fused[3 * B + i, t] for i, t in positions]).detach()
    log_p = F.log_softmax(F.linear(head.transform(rows), embeddings, head.bias), dim=-1).detach()
    rows_m = torch.stack([2 * text_m[B + i, t] for i, t in positions])  # the momentum fusion on the masked captions
    q = F.softmax(F.linear(slow["mlm_head"].transform(rows_m), slow["text_encoder"].embeddings.word.weight,
                           slow["mlm_head"].bias), dim=-1).detach()
    ce = -sum(log_p[k, y].item() for k, y in enumerate((3, 7, 10))) / 3
    soft = -(q * log_p).sum(-1).mean().item()
    assert mlm.item() == pytest.approx((1 - alpha) * ce + alpha * soft, rel=1e-5)
    plain, _ = mlm_term(head, embeddings, fused, s, 0.0, teacher=slow)  # alpha 0: the teacher is not asked
    assert plain.item() == pytest.approx(ce, rel=1e-5)


def test_mlm_without_a_masked_token_is_zero_with_the_graph_kept():
    head, embeddings, fused, labels = mlm_setup([])
    mlm, stats = mlm_term(head, embeddings, fused, states(labels), alpha=0.4, teacher=teacher())
    assert mlm.item() == 0.0 and mlm.requires_grad
    assert math.isnan(stats["mlm_accuracy"].item()) and stats["masked_tokens"].item() == 0.0
    mlm.backward()
    assert torch.equal(fused.grad, torch.zeros_like(fused))
