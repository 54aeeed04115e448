"""The one dict -> config builder and the one choice check (issue 23 item 6)."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from concept_ext.config.baselines import BaselinesConfig, ProbeConfig, SelectConfig
from concept_ext.config.build import build_config, check_choices
from concept_ext.config.clf import CacheConfig, FineTuneConfig, PromptConfig
from concept_ext.config.run import RunConfig, load_run_config
from concept_ext.config.sae import SAEConfig, TrainConfig

ALL = [RunConfig, SAEConfig, TrainConfig, PromptConfig, FineTuneConfig, CacheConfig, BaselinesConfig,
       ProbeConfig, SelectConfig]


def _literal_fields(cls):
    return {name: typing.get_args(tp) for name, tp in typing.get_type_hints(cls).items()
            if typing.get_origin(tp) is typing.Literal}


@pytest.mark.parametrize("cls", [SAEConfig, TrainConfig, PromptConfig, FineTuneConfig, CacheConfig, ProbeConfig,
                                 SelectConfig, RunConfig], ids=lambda c: c.__name__)
def test_every_choice_field_is_checked(cls):
    """Each Literal field refuses a value outside its choices, on direct construction and through JSON."""
    fields = _literal_fields(cls)
    assert fields, f"{cls.__name__} has no Literal choice field"
    base = {"d": 16, "n_concepts": 4} if cls is SAEConfig else {}
    for name, choices in fields.items():
        for ok in choices:
            check_choices(cls(**base, **{name: ok}))
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be one of"):
            cls(**base, **{name: "no-such-choice"})
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be one of"):
            build_config(cls, {**base, name: "no-such-choice"})


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ValueError, match=r"unknown config key 'lambda_arr' \(did you mean 'lambda_ar'\?\)"):
        build_config(TrainConfig, {"lambda_arr": 0.1})
    with pytest.raises(ValueError, match=r"'train_classifsae.btach_size' \(did you mean 'train_classifsae.batch_size'"):
        build_config(RunConfig, {"train_classifsae": {"btach_size": 8}})
    with pytest.raises(ValueError, match=r"did you mean 'train_rows'"):
        load_run_config(None, ["train_row=5"])
    assert build_config(RunConfig, {"_comment": "documents the file"}) == RunConfig()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_json_round_trip(cls):
    import json

    obj = cls(d=16, n_concepts=4) if cls is SAEConfig else cls()
    data = json.loads(json.dumps(dataclasses.asdict(obj)))
    assert build_config(cls, data) == obj
