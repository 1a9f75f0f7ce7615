"""The rules across sections, read from what the model and the regularisers declare."""

import pytest

from plait._checks import check_int
from plait.config import load_config, validate, validate_eval


@pytest.mark.parametrize("overrides, message", [
    (["loss.name=momentum_itc"], "loss.name=momentum_itc is the fusion model's own ITC; it needs model.kind=fusion"),
    (["model.kind=fusion", "train.grad_cache_chunk=4"], "train.grad_cache_chunk is for two-tower models"),
    (["model.kind=fusion", "train.bank_momentum=0.5"], "train.bank_momentum is for two-tower models"),
    (["eval.features=both"], "eval.features='both' needs a model with independent heads"),
    (["train.bank_momentum=1.0"], "train.bank_momentum must be in [0, 1), got 1.0"),
    (["model.kind=fusion", "loss.name=momentum_itc", "loss.in_modal=true"], "loss.in_modal needs a base loss"),
    (["model.kind=fusion", "loss.name=momentum_itc", "loss.options={alpha: 0.1}"], "takes no loss.options"),
    (["model.kind=nope"], "model.kind='nope' is not a model kind; valid: two_tower, fusion"),
    (["eval.tasks=[retrieval, nope]"], "eval.tasks has unknown task(s) 'nope'; valid: retrieval, zero_shot"),
])
def test_cross_section_rules_are_one_line_naming_the_keys(overrides, message):
    with pytest.raises(ValueError) as caught:
        validate(load_config("tiny", overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_valid_combinations_pass():
    validate(load_config("tiny", ["regularizers=[{name: separation}]", "eval.features=both"]))
    validate(load_config("fusion", ["loss.name=momentum_itc"]))
    validate(load_config("fusion", ["loss.name=gamma", "regularizers=[{name: consistency}]"]))
    validate_eval(load_config("tiny", ["eval.tasks=[knn]"]))


def test_integer_checks_say_the_rule():
    with pytest.raises(ValueError, match=r"^k=0 is not valid: it must be a positive integer$"):
        check_int("k", 0, minimum=1)
    with pytest.raises(ValueError, match=r"^k=True is not valid: it must be an integer >= 0 \(0: off\)$"):
        check_int("k", True, minimum=0, note=" (0: off)")
    with pytest.raises(ValueError, match=r"it must be an integer in \[1, 8\]"):
        check_int("k", 9, minimum=1, maximum=8)
    check_int("k", None, minimum=1, allow_none=True)
