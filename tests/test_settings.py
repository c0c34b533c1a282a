"""Sampling settings from untrusted callers: wrong types refused, ranges clamped and reported."""

import math

import pytest

from orca2_space.settings import GenerationParams, InvalidRequest, Settings, validate_params


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
