"""Sampling settings from untrusted callers: wrong types refused, ranges clamped and reported; the server's
settings: checked when built, immutable, secrets kept out of logs."""

import dataclasses
import math

import pytest

from orca2_space.backends.local.batching import BatchingSettings, batching_settings
from orca2_space.settings import (
    GenerationParams,
    InferenceServerSettings,
    InvalidRequest,
    ModerationSettings,
    Settings,
    validate_params,
)


def test_defaults_are_the_papers_greedy_decoding():
    params, notices = validate_params({}, max_new_tokens_cap=2048)
    assert params == GenerationParams()
    assert params.do_sample is False
    assert notices == []


def test_values_in_range_are_kept():
    raw = dict(do_sample=True, temperature=0.3, top_p=0.5, top_k=10, repetition_penalty=1.1, max_new_tokens=64, seed=7)
    params, notices = validate_params(raw, max_new_tokens_cap=2048)
    assert params == GenerationParams(**raw)
    assert notices == []


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("max_new_tokens", 10**9, 2048),
        ("max_new_tokens", -5, 1),
        ("temperature", 50.0, 2.0),
        ("temperature", 0.0, 0.01),
        ("top_p", 1.5, 1.0),
        ("top_p", -0.2, 0.01),
        ("top_k", 10**6, 1000),
        ("repetition_penalty", 0.1, 1.0),
        ("seed", -7, 0),
    ],
)
def test_out_of_range_values_are_clamped_and_reported(field, value, expected):
    params, notices = validate_params({field: value}, max_new_tokens_cap=2048)
    assert getattr(params, field) == expected
    assert len(notices) == 1 and field in notices[0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", math.nan, "finite"),
        ("temperature", math.inf, "finite"),
        ("max_new_tokens", "100", "must be a number"),
        ("max_new_tokens", 12.5, "whole number"),
        ("top_k", True, "must be a number"),
        ("top_p", [0.5], "must be a number"),
        ("do_sample", "yes", "true or false"),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_refused(field, value, message):
    with pytest.raises(InvalidRequest, match=message) as error:
        validate_params({field: value}, max_new_tokens_cap=2048)
    assert field in str(error.value)


def test_unknown_settings_are_refused():
    with pytest.raises(InvalidRequest, match="unknown setting"):
        validate_params({"beams": 4}, max_new_tokens_cap=2048)


def test_a_seed_of_minus_one_or_none_means_random():
    assert validate_params({"seed": -1}, 2048)[0].seed is None
    assert validate_params({"seed": None}, 2048)[0].seed is None


def test_whole_floats_from_sliders_are_accepted_as_integers():
    params, _ = validate_params({"max_new_tokens": 64.0, "top_k": 5.0}, 2048)
    assert (params.max_new_tokens, params.top_k) == (64, 5)


def test_the_default_max_new_tokens_respects_a_lower_cap():
    assert validate_params({}, max_new_tokens_cap=100)[0].max_new_tokens == 100


def test_settings_refuse_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        Settings(quantization="3bit")


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: Settings(port=0), "greater than or equal to 1"),
        (lambda: Settings(concurrency=0), "greater than or equal to 1"),
        (lambda: Settings(batch_cache_tokens=100), "greater than or equal to 256"),
        (lambda: Settings(port="7860"), "valid integer"),
        (lambda: ModerationSettings(threshold=3), "0, 2, 4 or 6"),
        (lambda: ModerationSettings(categories=("Hate", "Gore")), "Hate"),
        (lambda: ModerationSettings(categories=()), "at least 1"),
        (lambda: ModerationSettings(timeout=0), "greater than 0"),
        (lambda: ModerationSettings(timeout=61), "less than or equal to 60"),
        (lambda: ModerationSettings(retries=6), "less than or equal to 5"),
        (lambda: InferenceServerSettings("gpu-host:8000/v1"), "http://"),
        (lambda: InferenceServerSettings("http://h/v1", read_timeout=math.inf), "finite"),
        (lambda: Settings(backend="inference-server"), "--base-url"),
        (lambda: Settings(inference_server=InferenceServerSettings("http://h/v1")), "inference-server"),
    ],
)
def test_server_settings_refuse_bad_values(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_a_misspelt_server_setting_is_refused():
    with pytest.raises(ValueError, match="max_new_token_cap"):
        Settings(max_new_token_cap=100)


def test_server_settings_cannot_change_once_built():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModerationSettings().threshold = 2


def test_secrets_stay_out_of_repr():
    settings = Settings(
        auth=("ann", "login-secret"),
        backend="inference-server",
        inference_server=InferenceServerSettings("http://h/v1", api_key="server-secret"),
        moderation=ModerationSettings(endpoint="https://safety.example", key="safety-secret"),
    )
    assert "secret" not in repr(settings)
    assert settings.moderation.configured and not ModerationSettings(endpoint="https://safety.example").configured


def test_the_batch_cache_is_sized_for_the_machine_unless_set():
    assert batching_settings(Settings(batch_cache_tokens=4096)) == BatchingSettings(8, 4096)
    assert batching_settings(Settings()) == BatchingSettings(8, 8192)  # no GPU here
    assert batching_settings(Settings(batching=False)) is None
