"""plait.registry.Registry by hand, and the four registries built on it."""

import pytest

from plait.registry import Registry


class Small:
    def __init__(self, width: int = 2, seed: int = 0, dataset_size: int | None = None):
        self.width, self.seed, self.dataset_size = width, seed, dataset_size


class Plain:
    def __init__(self, temperature: float = 0.1, mode: str = "bimodal"):
        self.temperature, self.mode = temperature, mode


def _registry() -> Registry:
    things = Registry("thing")
    things.register("small", Small, aliases=("tiny", "Wee"))
    things.register("plain", Plain, aliases=("clip",))
    things.alias("ntxent", "plain", defaults={"mode": "unimodal"})
    return things


def test_names_and_aliases_are_case_insensitive():
    things = _registry()
    assert things.resolve("SMALL") == things.resolve("Tiny") == things.resolve("wee") == "small"
    assert "PLAIN" in things and "clip" in things and "ntxent" in things
    assert "nothing" not in things and None not in things and 3 not in things
    assert things["TINY"] is Small and things.get("Clip") is Plain and things.get("nope") is None
    assert list(things) == ["small", "plain"] and len(things) == 2  # canonical names, in registration order
    assert things.names() == ["clip", "ntxent", "plain", "small", "tiny", "wee"]
    assert dict(things.aliases) == {"tiny": "small", "wee": "small", "clip": "plain", "ntxent": "plain"}
    with pytest.raises(TypeError):
        things.aliases["x"] = "small"  # read-only view
    with pytest.raises(KeyError):
        things["nope"]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown thing 'Huge'; valid names: clip, ntxent, plain, small, tiny, wee$"):
        _registry().resolve("Huge")
    with pytest.raises(ValueError, match="unknown thing 'huge'"):
        _registry().build("huge")


def test_options_are_checked_against_the_signature():
    things = _registry()
    assert things.accepted("tiny") == ["width", "seed", "dataset_size"]
    assert things.build("small", width=5).width == 5
    with pytest.raises(ValueError,
                       match=r"thing 'small' has no option 'colour', 'depth'; its options: width, seed, dataset_size$"):
        things.build("Wee", depth=3, colour=1)


def test_fill_only_where_the_constructor_takes_it_and_options_win():
    things = _registry()
    small = things.build("small", fill={"seed": 7, "dataset_size": 30})
    assert (small.seed, small.dataset_size) == (7, 30)
    assert things.build("small", fill={"seed": 7}, seed=1).seed == 1  # a given option wins
    plain = things.build("plain", fill={"seed": 7, "dataset_size": 30}, temperature=0.5)  # not taken: not passed
    assert plain.temperature == 0.5 and plain.mode == "bimodal"


def test_defaults_of_a_name_or_alias_come_first():
    things = _registry()
    assert things.build("ntxent").mode == "unimodal"
    assert things.build("NTXent", mode="bimodal").mode == "bimodal"  # options win over defaults
    assert things.build("clip").mode == "bimodal" and things.build("plain").mode == "bimodal"
    things.register("wide", Small, defaults={"width": 9}, aliases=("broad",))
    assert things.build("wide").width == 9 and things.build("broad").width == 9 and things.build("wide", width=1).width == 1


def test_decorator_registration_and_duplicates():
    things = Registry("thing")

    @things.register("deco", aliases=("d",))
    class Deco:
        def __init__(self, size: int = 1):
            self.size = size

    assert Deco.__name__ == "Deco" and things["D"] is Deco and things.build("d", size=4).size == 4
    with pytest.raises(ValueError, match="already registered"):
        things.register("DECO", Small)
    with pytest.raises(ValueError, match="already registered"):
        things.alias("d", "deco")
    with pytest.raises(ValueError, match="unknown thing 'nope'"):
        things.alias("x", "nope")


def test_internal_parameters_and_renamed_options():
    class Folder:
        def __init__(self, folder: str, split: str = "train", image_size: int = 32):
            self.folder, self.split, self.image_size = folder, split, image_size

    data = Registry("dataset", internal=("split",))
    data.register("folder", Folder, rename={"path": "folder"})
    assert data.accepted("folder") == ["path", "image_size"]
    built = data.build("folder", fill={"split": "all"}, path="/x")
    assert (built.folder, built.split) == ("/x", "all")
    with pytest.raises(ValueError, match=r"dataset 'folder' has no option 'split'; its options: path, image_size$"):
        data.build("folder", path="/x", split="test")


def test_functions_and_keyword_catch_alls():
    kinds = Registry("model kind")
    kinds.register("two_tower", lambda config, device=None: ("two_tower", config, device))
    assert kinds.build("two_tower", fill={"config": 1, "device": "cpu", "allow_import": True}) == ("two_tower", 1, "cpu")

    class Loose:
        def __init__(self, a: int = 0, **rest):
            self.a, self.rest = a, rest

    loose = Registry("loose")
    loose.register("loose", Loose)
    assert loose.accepted("loose") == ["a"] and loose.build("loose", b=2).rest == {"b": 2}


def test_plait_registries_are_registry_instances():
    from plait.data.registry import ALIASES as DATA_ALIASES
    from plait.data.registry import DATASETS
    from plait.losses.registry import ALIASES as LOSS_ALIASES
    from plait.losses.registry import LOSSES
    from plait.losses.regularizers import REGULARIZER_ALIASES, REGULARIZERS
    from plait.models import ENCODERS, MODEL_KINDS

    assert all(isinstance(r, Registry) for r in (DATASETS, LOSSES, REGULARIZERS, ENCODERS, MODEL_KINDS))
    assert DATA_ALIASES["jsonl"] == "csv" and LOSS_ALIASES.get("ntxent") == "infonce"
    assert REGULARIZER_ALIASES["gc"] == "consistency"
    assert list(DATASETS) == ["emoji", "uci", "digits", "csv", "folder", "gap"]
    assert list(LOSSES) == ["infonce", "gamma", "sogclr"] and list(REGULARIZERS) == ["separation", "bridge", "consistency"]
    assert list(ENCODERS) == ["mlp", "cnn", "vit", "bow", "transformer", "minilm"]
    assert list(MODEL_KINDS) == ["two_tower", "fusion"]
