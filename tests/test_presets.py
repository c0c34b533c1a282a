"""Each preset says where its system message comes from; a published one is quoted exactly, with its citation."""

from orca2_space.presets import CAUTIOUS, PRESETS, SYSTEM_PRESETS, TYPED, Source, preset_of

# The names /chat's `preset` has always taken, the first four in Compare's (and the bench's) order.
EARLIER = [
    "Cautious (model card default)",
    "Empty (paper's evaluation setting)",
    "Step-by-step",
    "Explain, then answer",
    "Direct answer",
]


def test_the_earlier_presets_keep_their_names_order_and_text():
    assert list(PRESETS)[:5] == EARLIER
    assert SYSTEM_PRESETS["Cautious (model card default)"] == CAUTIOUS
    assert SYSTEM_PRESETS["Empty (paper's evaluation setting)"] == ""


def test_every_preset_names_its_source_and_the_page_shows_it():
    assert {preset.source for preset in PRESETS.values()} == set(Source)
    for preset in PRESETS.values():
        assert preset.asks in preset.info
        if preset.source is Source.THIS_APP:
            assert preset.citation == "" and preset.info.endswith("this app's wording")
        elif preset.source is Source.ORCA1_PAPER:
            assert "Table 2" in preset.citation and "arXiv:2306.02707" in preset.citation
            assert preset.info.endswith(f"quoted from {preset.citation}")
        else:
            assert preset.info.endswith(f"from {preset.source}")
    assert PRESETS["Cautious (model card default)"].source is Source.MODEL_CARD
    assert PRESETS["Empty (paper's evaluation setting)"].source is Source.ORCA2_PAPER


def test_the_orca_1_system_messages_are_quoted_exactly_typos_included():
    # Mukherjee et al. (2023), "Orca: Progressive Learning from Complex Explanation Traces of GPT-4",
    # arXiv:2306.02707, Table 2, system messages 7 and 10, as printed.
    seventh = PRESETS["Orca 1: step-by-step (Table 2, #7)"]
    assert seventh.text == (
        "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully "
        "as you can. While performing the task think step-by-step and justify your steps."
    )
    assert seventh.citation.endswith("system message 7")
    tenth = PRESETS["Orca 1: explain your answer (Table 2, #10)"]
    assert tenth.text == (
        "You are an AI assistant. You should describe the task and explain your answer. While answering a multiple "
        "choice question, first output the correct answer(s). Then explain why other answers are wrong. You might "
        "need to use additional knowledge to answer the question."
    )
    assert tenth.citation.endswith("system message 10")


def test_a_presets_text_is_known_by_its_name_and_anything_else_is_typed():
    for name, preset in PRESETS.items():
        assert preset_of(preset.text) == name
    assert preset_of("You are a pirate.") == TYPED
