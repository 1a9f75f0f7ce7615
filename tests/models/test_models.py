
import pytest
import torch
from torch import nn

from plait.models import (
    BagOfWordsEncoder,
    MLPEncoder,
    SmallCNN,
    SmallViT,
    TransformerTextEncoder,
    TwoTower,
    WordPieceTokenizer,
    build_encoder,
    build_model,
)


class TinyEncoder(nn.Module):
    """A user's own module, plugged in by 'tests.models.test_models:TinyEncoder'."""

    def __init__(self, out_dim: int = 5):
        super().__init__()
        self.linear = nn.LazyLinear(out_dim)
        self.out_dim = out_dim

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("encoder,inputs", [
    (MLPEncoder(12, 7, hidden=(9,)), torch.rand(3, 12)),
    (SmallCNN(7, width=4), torch.rand(3, 3, 16, 16)),
    (SmallViT(16, 7, patch=4, width=16, depth=1, heads=2), torch.rand(3, 3, 16, 16)),
    (BagOfWordsEncoder(7, embed_dim=8), ["a cat", "grinning face", "x"]),
    (TransformerTextEncoder(7, width=16, depth=1, heads=2), ["a cat", "grinning face", "x"]),
])
def test_encoders_map_a_batch_to_out_dim_and_train(encoder, inputs):
    out = encoder(inputs)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_tokenizer_is_minilm_wordpiece_with_padding_mask():
    ids, mask = WordPieceTokenizer(max_length=8)(["grinning face", "a very long caption that will be cut here"])
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0].item() == 101 and mask[0].sum().item() == 4  # [CLS] grinning face [SEP]
    assert mask[1].all()
    with pytest.raises(ValueError, match="list of strings"):
        WordPieceTokenizer()("not a list")


def test_text_encoders_ignore_padding():
    torch.manual_seed(0)
    encoder = TransformerTextEncoder(6, width=16, depth=1, heads=2).eval()
    alone = encoder(["red apple"])
    padded = encoder(["red apple", "a much longer caption with many more tokens"])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_two_tower_normalises_and_clamps_logit_scale():
    model = TwoTower(MLPEncoder(4, 6), MLPEncoder(5, 6), embed_dim=3, init_temperature=0.07)
    za, zb, scale = model(torch.rand(2, 4), torch.rand(2, 5))
    torch.testing.assert_close(za.norm(dim=1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    frozen = TwoTower(MLPEncoder(4, 6), MLPEncoder(5, 6), learn_temperature=False)
    assert not frozen.logit_scale.requires_grad


def test_build_encoder_builtin_plugin_and_errors():
    assert isinstance(build_encoder({"name": "mlp", "out_dim": 4}, torch.rand(3, 8, 8)), MLPEncoder)
    plugged = build_encoder({"name": "tests.models.test_models:TinyEncoder", "out_dim": 3}, torch.rand(5), allow_import=True)
    assert isinstance(plugged, TinyEncoder)
    with pytest.raises(ValueError, match="needs --allow-import"):  # importing code is an explicit opt-in
        build_encoder({"name": "tests.models.test_models:TinyEncoder", "out_dim": 3}, torch.rand(5))
    with pytest.raises(ValueError, match="cannot be imported"):
        build_encoder({"name": "no_such_module_x:Thing"}, torch.rand(5), allow_import=True)
    with pytest.raises(ValueError, match="unknown encoder 'resnet'"):
        build_encoder({"name": "resnet"}, torch.rand(5))
    with pytest.raises(ValueError, match="mlp encoder takes tensors"):
        build_encoder({"name": "mlp"}, "a caption")
    with pytest.raises(ValueError, match="encoder 'cnn'"):
        build_encoder({"name": "cnn", "depth": 3}, torch.rand(3, 8, 8))


def test_allow_import_constructs_only_nn_module_classes(tmp_path):
    """--allow-import is an opt-in to import a module, never to call whatever the name points at."""
    marker = tmp_path / "ran"
    for name, spec in (("os:system", {"command": f"touch {marker}"}), ("subprocess:call", {"args": ["touch", str(marker)]}),
                       ("builtins:dict", {}), ("torch.nn:functional", {}), ("pathlib:Path", {"args": str(marker)})):
        with pytest.raises(ValueError, match=rf"encoder '{name}' is not an nn.Module class") as caught:
            build_encoder({"name": name, **spec}, torch.rand(5), allow_import=True)
        assert "--allow-import only constructs nn.Module subclasses" in str(caught.value)
    assert not marker.exists()
    plugged = build_encoder({"name": "tests.models.test_models:TinyEncoder", "out_dim": 3}, torch.rand(5), allow_import=True)
    assert isinstance(plugged, TinyEncoder)
    with pytest.raises(ValueError, match="has no valid out_dim"):  # a module without one cannot be a tower
        build_encoder({"name": "torch.nn:Identity"}, torch.rand(5), allow_import=True)


@pytest.mark.parametrize("model, message", [
    ({"embed_dim": -5}, "model.embed_dim=-5 is not valid: it must be an integer in [1, 1048576]"),
    ({"embed_dim": 0}, "model.embed_dim=0 is not valid"),
    ({"projection_hidden": -1}, "model.projection_hidden=-1 is not valid: it must be an integer in [0, 1048576]"),
    ({"init_temperature": float("inf")}, "model.init_temperature=inf is not valid"),
    ({"a": {"name": "mlp", "hidden": [-1]}}, "model.a.hidden[0]=-1 is not valid"),
    ({"a": {"name": "mlp", "hidden": [0]}}, "model.a.hidden[0]=0 is not valid"),
    ({"a": {"name": "mlp", "hidden": [1 << 40]}}, "model.a.hidden[0]=1099511627776 is not valid"),
    ({"a": {"name": "mlp", "hidden": 64}}, "model.a.hidden=64 is not valid: it must be a list"),
    ({"a": {"name": "mlp", "out_dim": -3}}, "model.a.out_dim=-3 is not valid"),
    ({"a": {"name": "mlp", "dropout": 1.5}}, "model.a.dropout=1.5 is not valid"),
    ({"a": {"name": "cnn", "width": True}}, "model.a.width=True is not valid"),
    ({"a": {"name": "vit", "width": 10, "heads": 4}}, "model.a: width=10 is not a multiple of heads=4"),
    ({"b": {"name": "bow", "embed_dim": -16}}, "model.b.embed_dim=-16 is not valid"),
    ({"b": {"name": "transformer", "max_length": 0}}, "model.b.max_length=0 is not valid"),
])
def test_bad_sizes_are_one_line_errors_naming_the_key_before_anything_is_allocated(model, message):
    spec = {"modalities": ["image", "text"], "shapes": [[3, 8, 8], None]}
    with pytest.raises(ValueError) as caught:
        build_model({"a": {"name": "mlp"}, "b": {"name": "bow"}, "embed_dim": 8, **model}, spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_model_is_sized_on_the_meta_device_without_memory():
    """Shapes only: a model that would need 4 TB is built on the meta device in no time, and its
    shapes are those of the real model."""
    from plait.models import check_input_spec

    spec = {"modalities": ["image", "text"], "shapes": [[3, 8, 8], None]}
    config = {"a": {"name": "mlp", "hidden": [1 << 20, 1 << 20]}, "b": {"name": "bow", "out_dim": 8, "embed_dim": 8},
              "embed_dim": 8}
    huge = build_model(config, spec, device="meta")
    assert all(t.device.type == "meta" for t in huge.state_dict().values())
    assert huge.state_dict()["encoder_a.net.5.weight"].shape == (1 << 20, 1 << 20)
    small = {"a": {"name": "mlp", "hidden": [6]}, "b": {"name": "bow", "out_dim": 8, "embed_dim": 8}, "embed_dim": 8}
    real, meta = build_model(small, spec), build_model(small, spec, device="meta")
    assert {k: v.shape for k, v in real.state_dict().items()} == {k: v.shape for k, v in meta.state_dict().items()}
    for bad in ([[1 << 20, 1 << 20], None], [[3, 8, 8, 1, 1], None], [[3, 0, 8], None], [None, None], [[3, 8, 8], [4]],
                [[3, True, 8], None]):
        with pytest.raises(ValueError, match="malformed input spec"):
            check_input_spec({"modalities": ["image", "text"], "shapes": bad}, source="f")


def test_build_model_picks_encoders_by_modality():
    class Data:
        modalities = ("image", "text")

        def __getitem__(self, i):
            return i, torch.rand(3, 8, 8), "a caption"

    model = build_model({"a": {}, "b": {}, "embed_dim": 8}, Data())
    assert isinstance(model.encoder_a, SmallCNN) and isinstance(model.encoder_b, BagOfWordsEncoder)


def test_minilm_tower_matches_sentence_transformers_and_memoises():
    from sentence_transformers import SentenceTransformer

    from plait.models import MiniLMEncoder
    from plait.models.text import minilm_path

    encoder = MiniLMEncoder(trainable=False)
    texts = ["a grinning face", "red apple"]
    ours = encoder(texts)
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert set(encoder._memo) == set(texts)
    assert not any(p.requires_grad for p in encoder.parameters())
    trainable = MiniLMEncoder(trainable=True)
    trainable(texts).sum().backward()
    assert any(p.grad is not None for p in trainable.parameters())
