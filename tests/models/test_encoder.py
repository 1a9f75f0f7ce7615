"""The encoder protocol: a registered encoder is built from a config, sized from one item, checked first."""

import pytest
import torch
from torch import nn

from plait.models import ENCODERS, Encoder, build_encoder, build_model
from plait.models.encoder import encoder_class


class WideLinear(Encoder):
    """A test encoder: flattens and maps to out_dim; its input width comes from the sample."""

    modality = "tensor"
    size_options = ("in_dim", "out_dim")

    def __init__(self, in_dim: int, out_dim: int = 8):
        super().__init__()
        self.net = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    @classmethod
    def from_sample(cls, sample, options):
        return {"in_dim": sample.numel(), **options}

    def forward(self, x):
        return self.net(x.flatten(1))

    def preprocessing(self):
        return {"in_dim": self.net.in_features}


@pytest.fixture
def registered():
    ENCODERS.register("wide_linear_test", WideLinear)
    yield
    ENCODERS._objects.pop("wide_linear_test")


def test_a_registered_encoder_is_built_by_name_and_sized_from_the_sample(registered):
    encoder = build_encoder({"name": "wide_linear_test", "out_dim": 5}, torch.empty(3, 4, 4, device="meta"))
    assert isinstance(encoder, WideLinear) and encoder.out_dim == 5 and encoder.preprocessing() == {"in_dim": 48}
    model = build_model({"a": {"name": "wide_linear_test"}, "b": {"name": "bow", "out_dim": 8}, "embed_dim": 4},
                        {"modalities": ["image", "text"], "shapes": [[3, 4, 4], None]})
    assert model.encode_a(torch.rand(2, 3, 4, 4)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"model.a.out_dim=0 is not valid: it must be an integer in \[1, 1048576\]"):
        build_model({"a": {"name": "wide_linear_test", "out_dim": 0}},
                    {"modalities": ["image", "text"], "shapes": [[3, 4, 4], None]})
    with pytest.raises(ValueError, match="encoder 'wide_linear_test' has no option 'depth'; its options: in_dim, out_dim"):
        build_encoder({"name": "wide_linear_test", "depth": 2}, torch.empty(3))


def test_the_builtin_encoders_declare_their_protocol():
    assert list(ENCODERS) == ["mlp", "cnn", "vit", "bow", "transformer", "minilm"]
    assert all(issubclass(cls, Encoder) for cls in ENCODERS.values())
    assert [name for name, cls in ENCODERS.items() if cls.loads_weights] == ["minilm"]
    assert {name: cls.modality for name, cls in ENCODERS.items()} == {
        "mlp": "tensor", "cnn": "image", "vit": "image", "bow": "text", "transformer": "text", "minilm": "text"}
    assert ENCODERS["vit"].from_sample(torch.empty(3, 16, 16, device="meta"), {})["image_size"] == 16
    vit = build_encoder({"name": "vit", "width": 8, "heads": 2, "depth": 0, "patch": 4}, torch.empty(3, 8, 8))
    assert vit.preprocessing() == {"image_size": 8}
    assert build_encoder({"name": "bow", "out_dim": 4, "embed_dim": 4}, "text").preprocessing()["max_length"] == 32
    with pytest.raises(ValueError, match="needs --allow-import"):
        encoder_class("tests.models.test_encoder:WideLinear")
    assert encoder_class("tests.models.test_encoder:WideLinear", allow_import=True) is WideLinear
