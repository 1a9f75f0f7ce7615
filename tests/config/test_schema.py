"""What a resume may change and what cannot change a result, as the schema declares them."""

from dataclasses import fields

from plait.config import ALWAYS_MAY_CHANGE, DATA_LOCATION, NO_EFFECT, RESUME_MAY_CHANGE, SCHEDULE_KEYS, RunConfig
from plait.config.schema import FIXED, FREE, keys_with


def test_the_resume_policy_is_read_from_the_fields():
    # written out by hand: the settings that alter what is logged, saved or evaluated, or where the run executes
    assert set(RESUME_MAY_CHANGE) == {
        "name", "output_dir", "optim.max_steps", "data.num_workers", "train.device", "train.deterministic",
        "train.log_every", "train.eval_every_epochs", "train.staleness_every_epochs", "train.checkpoint_every_epochs",
        "train.checkpoint_every_steps", "train.tensorboard", "train.progress", "train.on_nonfinite", "train.dist_timeout_s",
        "train.grad_cache_chunk", "eval"}
    assert SCHEDULE_KEYS == ("optim.epochs", "optim.steps")
    assert ALWAYS_MAY_CHANGE == ("data.options.cache_dir", "train.precision")
    assert DATA_LOCATION == ("data.options.path", "data.options.test_path")
    assert set(NO_EFFECT) == {"train.dist_timeout_s", "train.progress", "train.tensorboard"}


def test_a_section_with_a_policy_is_named_whole_and_the_rest_is_fixed():
    assert "eval" in RESUME_MAY_CHANGE and not any(key.startswith("eval.") for key in RESUME_MAY_CHANGE)
    fixed = keys_with(lambda meta: meta.get("resume") == FIXED)  # fields written with setting() and no policy
    assert fixed == ("data.options",)  # its keys by role: cache_dir may always change, path and test_path with a fingerprint
    assert all(field.metadata.get("resume") in (None, FIXED, FREE) for field in fields(RunConfig))
