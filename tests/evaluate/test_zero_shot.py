import math

import pytest
import torch

from plait.evaluate import build_prompts, zero_shot_classifier, zero_shot_metrics


def test_build_prompts():
    prompts = build_prompts(["cat", "sea lion"], ["a photo of a {}.", "a drawing of the {}", "{c}!"])
    assert prompts == [
        ["a photo of a cat.", "a drawing of the cat", "cat!"],
        ["a photo of a sea lion.", "a drawing of the sea lion", "sea lion!"],
    ]
    with pytest.raises(ValueError, match="template"):
        build_prompts(["cat"], ["no slot"])
    with pytest.raises(ValueError, match="class_names"):
        build_prompts("cat", ["{}"])


def test_template_averaging_by_hand():
    features = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[-1.0, 0.0], [0.0, -5.0]]])
    # class 0: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9); class 1: (-0.5, -0.5) -> (-1, -1)/sqrt 2
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [-1 / math.sqrt(2), -1 / math.sqrt(2)]])
    classifier = zero_shot_classifier(features.double())
    assert classifier.dtype == torch.float32 and classifier.shape == (2, 2)
    torch.testing.assert_close(classifier, expected.float())
    torch.testing.assert_close(zero_shot_classifier(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ValueError, match="class_text_features"):
        zero_shot_classifier(torch.randn(2, 3, 4, 5))


def test_noisy_class_embeddings_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    classes = torch.randn(8, 64, generator=g)
    labels = torch.arange(8).repeat(5)
    images = classes[labels] + 0.05 * torch.randn(40, 64, generator=g)
    templates = classes[:, None, :] + 0.01 * torch.randn(8, 4, 64, generator=g)
    m = zero_shot_metrics(images, zero_shot_classifier(templates), labels)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_permuted_classifier_has_known_accuracy():
    # One-hot class embeddings; swapping classifier rows 0 <-> 1 and 2 <-> 3 leaves 4 and 5 right.
    # An image is e_y + 0.5 e_partner(y), so a swapped class still ranks 2nd: acc2 = 1.
    eye = torch.eye(6)
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 4, 4, 0, 1, 5, 2])
    images = eye[labels] + 0.5 * eye[partner[labels]]
    m = zero_shot_metrics(images, eye[[1, 0, 3, 2, 4, 5]], labels, ks=(1, 2))
    assert m["acc1"] == pytest.approx(5 / 12)  # the images labelled 4 or 5
    assert m["acc2"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx(2 / 6)
    assert set(m) == {"acc1", "acc2", "mean_per_class_recall"}
    assert zero_shot_metrics(images, eye, labels)["acc1"] == 1.0


def test_topk_hand_case_with_ties_and_ignored_labels():
    # classifier = one-hot rows, so the scores order like the image features themselves
    images = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 0: last (rank 6)
            [0.5, 0.9, 0.8, 0.7, 0.6, 0.1],  # label 0: rank 5
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # label 3: rank 1
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # label 2: all tied, classes 0 and 1 first -> rank 3
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label -1: ignored
        ]
    )
    labels = torch.tensor([0, 0, 3, 2, -1])
    m = zero_shot_metrics(images, torch.eye(6), labels, ks=(1, 3, 5))
    assert m["acc1"] == 0.25 and m["acc3"] == 0.5 and m["acc5"] == 0.75
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)  # classes 0, 2, 3: recalls 0, 0, 1
    assert zero_shot_metrics(images, torch.eye(6), labels, ks=(1, 3, 5), chunk_size=2) == m


def test_acc5_needs_five_classes_and_errors():
    m = zero_shot_metrics(torch.eye(3), torch.eye(3), torch.arange(3))
    assert m == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    with pytest.raises(ValueError, match="labels"):
        zero_shot_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="labels"):
        zero_shot_metrics(torch.eye(3), torch.eye(3), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="dim"):
        zero_shot_metrics(torch.eye(3), torch.eye(4), torch.arange(3))
