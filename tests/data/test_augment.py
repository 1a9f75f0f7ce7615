import pickle

import pytest
import torch

from plait.data import ImageAugment, TextAugment, default_synonyms
from plait.data.augment import EXCLUDED_PAIRS, GENERAL_SYNONYMS, _emoji_pairs

CAPTIONS = [
    "a photo of a small car next to a big house",
    "grinning face with smiling eyes",
    "the digit seven",
    "woman light skin tone",
    "telephone",
]
ALTERNATIVES = [["a picture of a car"], ["grinning"], ["seven", "a handwritten seven"], [], ["phone"]]


def batches(n=3):
    generator = torch.Generator().manual_seed(5)
    return [torch.rand(6, 3, 20, 24, generator=generator) for _ in range(n)]


def test_image_same_seed_same_outputs_over_calls():
    a, b = ImageAugment(16, seed=3), ImageAugment(16, seed=3)
    for x in batches():
        out_a, out_b = a(x), b(x)
        assert out_a.shape == (6, 3, 16, 16) and out_a.dtype == torch.float32
        assert out_a.min() >= 0 and out_a.max() <= 1
        assert torch.equal(out_a, out_b)


def test_image_different_seeds_and_calls_differ():
    x = batches(1)[0]
    a, b = ImageAugment(16, seed=3), ImageAugment(16, seed=4)
    first = a(x)
    assert not torch.equal(first, b(x))
    assert not torch.equal(first, a(x)), "each call draws new parameters"
    assert not torch.equal(first[0], first[1]), "each image gets its own parameters"


def test_image_state_resumes_and_global_rng_untouched():
    augment = ImageAugment(16, seed=0)
    x = batches(1)[0]
    augment(x)
    state = pickle.loads(pickle.dumps(augment.get_state()))
    expected = [augment(x) for _ in range(2)]
    fresh = ImageAugment(16, seed=99)
    fresh.set_state(state)
    assert all(torch.equal(e, fresh(x)) for e in expected)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    augment(x)
    assert torch.equal(before, torch.get_rng_state())


def test_image_single_image_probability_one_and_bad_inputs():
    x = torch.rand(3, 10, 10)
    assert ImageAugment(8)(x).shape == (1, 3, 8, 8)
    flip_only = ImageAugment(10, crop_scale=(1.0, 1.0), flip=1.0, jitter=0.0, blur=0.0)
    image = torch.rand(1, 3, 10, 10)
    out = flip_only(image)
    torch.testing.assert_close(out, image.flip(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        ImageAugment(8)(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="crop_scale"):
        ImageAugment(8, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip"):
        ImageAugment(8, flip=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_image_on_cuda_matches_itself():
    x = batches(1)[0].cuda()
    a, b = ImageAugment(16, seed=1), ImageAugment(16, seed=1)
    out = a(x)
    assert out.is_cuda and torch.equal(out, b(x))


def strong(seed=0, **kwargs):
    options = dict(p_delete=0.2, p_swap=0.2, p_insert=0.2, p_synonym=0.3, p_alternative=0.3, seed=seed)
    options.update(kwargs)
    return TextAugment(**options)


def test_text_same_seed_same_outputs_different_seed_differs():
    a, b, c = strong(1), strong(1), strong(2)
    outs_a = [a(CAPTIONS, ALTERNATIVES) for _ in range(5)]
    outs_b = [b(CAPTIONS, ALTERNATIVES) for _ in range(5)]
    outs_c = [c(CAPTIONS, ALTERNATIVES) for _ in range(5)]
    assert outs_a == outs_b and outs_a != outs_c
    assert any(out != CAPTIONS for out in outs_a)
    assert all(all(text.strip() for text in out) and len(out) == len(CAPTIONS) for out in outs_a)


def test_text_state_resumes():
    augment = strong(7)
    augment(CAPTIONS)
    state = augment.get_state()
    expected = [augment(CAPTIONS, ALTERNATIVES) for _ in range(3)]
    other = strong(0)
    other.set_state(pickle.loads(pickle.dumps(state)))
    assert [other(CAPTIONS, ALTERNATIVES) for _ in range(3)] == expected


def test_text_operations_one_at_a_time():
    words = "one two three four five six seven eight nine ten".split()
    text = " ".join(words)
    swapped = TextAugment(0, 1.0, 0, 0, 0, seed=0)([text])[0].split()
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = TextAugment(0.5, 0, 0, 0, 0, seed=0)([text])[0].split()
    assert 0 < len(deleted) < len(words) and all(w in words for w in deleted)
    assert [w for w in words if w in deleted] == deleted, "deletion keeps the order"
    synonyms = {"car": ["automobile"], "house": ["home"]}
    replaced = TextAugment(0, 0, 0, 1.0, 0, synonyms=synonyms)(["a car and a house."])[0]
    assert replaced == "a automobile and a home."
    inserted = TextAugment(0, 0, 0.5, 0, 0, synonyms=synonyms)(["my car"])[0].split()
    assert len(inserted) == 3 and "automobile" in inserted
    alternative = TextAugment(0, 0, 0, 0, p_alternative=1.0)(["x", "y"], [["alt x"], []])
    assert alternative == ["alt x", "y"]
    assert TextAugment(1.0, 0, 0, 0, 0)(["single"]) == ["single"]
    assert len(TextAugment(1.0, 0, 0, 0, 0)(["two words"])[0].split()) == 1


def test_synonym_table():
    table = default_synonyms()
    assert "automobile" in table["car"] and "car" in table["automobile"]
    assert "telephone" in table["phone"] and "number" in table["digit"]
    assert all(word not in synonyms for word, synonyms in table.items())
    assert len(_emoji_pairs()) >= 30 and not EXCLUDED_PAIRS & set(_emoji_pairs())
    assert "bride" not in table.get("woman", [])
    assert all(len(group) >= 2 for group in GENERAL_SYNONYMS)


def test_text_bad_arguments():
    with pytest.raises(ValueError, match="p_swap"):
        TextAugment(p_swap=1.5)
    with pytest.raises(ValueError, match="list of captions"):
        TextAugment()("a caption")
    with pytest.raises(ValueError, match="alternatives"):
        TextAugment()(["a", "b"], [[]])
