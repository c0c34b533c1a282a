"""System-message presets and example prompts shown on the page."""

from dataclasses import dataclass

CAUTIOUS = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. You carefully "
    "follow instructions. You are helpful and harmless and you follow ethical guidelines and promote "
    "positive behavior."
)


@dataclass(frozen=True)
class Preset:
    # The choice the page shows: short enough to read whole in a narrow column.
    label: str
    # What the system message asks of the model, in a few words: shown with the choice.
    asks: str
    text: str


# Orca 2 was trained to pick a reasoning strategy per task ("Cautious Reasoning"); these presets ask
# for the main strategies explicitly. "Empty" is the setting the paper evaluates zero-shot. The names
# are what /chat's `preset` takes.
PRESETS: dict[str, Preset] = {
    "Cautious (model card default)": Preset(
        "Cautious", "The model card's default: be careful, helpful and harmless", CAUTIOUS
    ),
    "Empty (paper's evaluation setting)": Preset(
        "Empty", "The paper's evaluation setting: no system message, Orca 2 picks its own strategy", ""
    ),
    "Step-by-step": Preset(
        "Step-by-step",
        "Reason in justified steps, then answer",
        "You are Orca, an AI language model created by Microsoft. You will be given a task. "
        "Think step by step and justify each step, then state the final answer.",
    ),
    "Explain, then answer": Preset(
        "Explain, then answer",
        "The relevant facts first, the answer last",
        "You are Orca, an AI language model created by Microsoft. First explain the relevant facts and "
        "how they lead to the answer, then give the answer on its own line.",
    ),
    "Direct answer": Preset(
        "Direct answer",
        "Just the answer, no reasoning shown",
        "You are Orca, an AI language model created by Microsoft. Answer directly and concisely, "
        "without showing your reasoning.",
    ),
}
SYSTEM_PRESETS: dict[str, str] = {name: preset.text for name, preset in PRESETS.items()}
# The page's choices: (what it shows, the preset's name).
PRESET_CHOICES: list[tuple[str, str]] = [(preset.label, name) for name, preset in PRESETS.items()]
DEFAULT_PRESET = "Cautious (model card default)"
# What an export calls a system message that is no preset's.
TYPED = "typed"


def preset_of(system_message: str) -> str:
    """The name of the preset whose system message this is, or TYPED."""
    return next((name for name, preset in PRESETS.items() if preset.text == system_message), TYPED)


# The two prompts of the model card, exactly.
EXAMPLES: list[str] = [
    (
        "How can you determine if a restaurant is popular among locals or mainly attracts tourists, and why "
        "might this information be useful?"
    ),
    (
        '" \n :You can\'t just say, ""that\'s crap"" and remove it without gaining a consensus. You already '
        'know this, based on your block history. —/ " \nIs the comment obscene? \nOptions : Yes, No.'
    ),
]
# What the page shows of each: its task, in fewer characters than Gradio cuts a label to (60). The
# second prompt opens with a quoted comment that, cut short, reads like broken CSV and hides the question.
EXAMPLE_LABELS: list[str] = [
    "How to tell if a restaurant is popular with locals",
    "Is the comment obscene? Options: Yes, No",
]
