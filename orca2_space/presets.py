"""System-message presets and example prompts shown on the page.

Each preset says where its system message comes from. The Orca 1 paper's are quoted exactly from its
Table 2 (Mukherjee et al. 2023, "Orca: Progressive Learning from Complex Explanation Traces of GPT-4",
arXiv:2306.02707), typos included ("User will you give you a task"): Orca 2 was trained on data made with
those system messages. The wording was checked against several independent copies of Table 2 (the OpenOrca
data-generation code and others quote messages 7 and 10 identically; message 7 also appears verbatim in
torchtune's chat-format tests).
"""

from dataclasses import dataclass
from enum import StrEnum

CAUTIOUS = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. You carefully "
    "follow instructions. You are helpful and harmless and you follow ethical guidelines and promote "
    "positive behavior."
)


ORCA1 = "the Orca 1 paper (Mukherjee et al. 2023, arXiv:2306.02707), Table 2"


class Source(StrEnum):
    MODEL_CARD = "the model card"
    ORCA2_PAPER = "the Orca 2 paper"
    ORCA1_PAPER = "the Orca 1 paper"
    THIS_APP = "this app"


@dataclass(frozen=True)
class Preset:
    # The choice the page shows: short enough to read whole in a narrow column.
    label: str
    # What the system message asks of the model, in a few words: shown with the choice.
    asks: str
    text: str
    source: Source
    # Where exactly, for a quoted message: paper, table and entry.
    citation: str = ""

    @property
    def info(self) -> str:
        """What the page shows under the choice: what it asks, and where its wording comes from."""
        if self.source is Source.THIS_APP:
            return f"{self.asks} · this app's wording"
        if self.citation:
            return f"{self.asks} · quoted from {self.citation}"
        return f"{self.asks} · from {self.source}"


# Orca 2 was trained to pick a reasoning strategy per task ("Cautious Reasoning"); these presets ask
# for the main strategies explicitly. "Empty" is the setting the paper evaluates zero-shot. The names
# are what /chat's `preset` takes; the first four are Compare's default columns, in this order.
PRESETS: dict[str, Preset] = {
    "Cautious (model card default)": Preset(
        "Cautious", "The model card's default: be careful, helpful and harmless", CAUTIOUS, Source.MODEL_CARD
    ),
    "Empty (paper's evaluation setting)": Preset(
        "Empty",
        "The paper's evaluation setting: no system message, Orca 2 picks its own strategy",
        "",
        Source.ORCA2_PAPER,
    ),
    "Step-by-step": Preset(
        "Step-by-step",
        "Reason in justified steps, then answer",
        "You are Orca, an AI language model created by Microsoft. You will be given a task. "
        "Think step by step and justify each step, then state the final answer.",
        Source.THIS_APP,
    ),
    "Explain, then answer": Preset(
        "Explain, then answer",
        "The relevant facts first, the answer last",
        "You are Orca, an AI language model created by Microsoft. First explain the relevant facts and "
        "how they lead to the answer, then give the answer on its own line.",
        Source.THIS_APP,
    ),
    "Direct answer": Preset(
        "Direct answer",
        "Just the answer, no reasoning shown",
        "You are Orca, an AI language model created by Microsoft. Answer directly and concisely, "
        "without showing your reasoning.",
        Source.THIS_APP,
    ),
    "Orca 1: step-by-step (Table 2, #7)": Preset(
        "Orca 1: step-by-step",
        "Complete the task faithfully, justifying each step",
        "You are an AI assistant. User will you give you a task. Your goal is to complete the task as "
        "faithfully as you can. While performing the task think step-by-step and justify your steps.",
        Source.ORCA1_PAPER,
        f"{ORCA1}, system message 7",
    ),
    "Orca 1: explain your answer (Table 2, #10)": Preset(
        "Orca 1: explain answer",
        "Answer first, then explain why the other options are wrong",
        "You are an AI assistant. You should describe the task and explain your answer. While answering a "
        "multiple choice question, first output the correct answer(s). Then explain why other answers are "
        "wrong. You might need to use additional knowledge to answer the question.",
        Source.ORCA1_PAPER,
        f"{ORCA1}, system message 10",
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
