"""What a request costs grows in step with what it sends: 4× the text costs at most about 5× the work,
for showing a message, exporting a conversation and importing one.

No wall-clock thresholds. Export is measured by what it does, deterministically: the characters it
hands the tokenizer and the size of the file (and its CPU time too). Rendering and import are
measured as a ratio of CPU time between the same work on n and 4n characters: the measuring thread's
own (time.thread_time), each the best of several runs, so neither a busy machine nor the session's
other threads count; work that grows with the square of the text gives 16.
"""

import gc
import json
import time
from collections.abc import Callable

import pytest
from support import FIXTURES, FakeBackend, exchange

from orca2_space.chat import Chat
from orca2_space.conversation import Conversation, Export, LookedAt, parse_export
from orca2_space.prompt import OrcaTokenizer
from orca2_space.render import for_display
from orca2_space.settings import GenerationParams, Settings
from orca2_space.ui.adapters import download
from orca2_space.ui.messages import chat_messages

# 4× the input may cost this many times the work: linear, with room for a machine's noise.
MOST = 5.0
RUNS = 5


def cpu_ratio(work: Callable[[object], object], small: object, large: object) -> float:
    """CPU time of work(large) over work(small), in RUNS rounds that each time one right after the other,
    and the smallest round's ratio: this thread's own time, so that the threads the test session keeps
    running elsewhere do not count. A busy machine can slow one run of a round (a CI run once saw 5.1 for
    linear work, taking each size's best run); work that grows with the square of the text gives about
    16 in every round, however the machine's load falls."""
    ratios = []
    gc.disable()  # a collection's cost follows everything the process holds, not the work
    try:
        for _ in range(RUNS):
            times = []
            for value in (small, large):
                start = time.thread_time()
                work(value)
                times.append(time.thread_time() - start)
            ratios.append(times[1] / times[0])
    finally:
        gc.enable()
    return min(ratios)


def rescan_each_opener(text: str) -> None:
    """The rendering's old flaw: from each opener, a search for its closer to the end of the text."""
    start = text.find("\\(")
    while start != -1:
        text.find("\\)", start)
        text.count("\n", start)  # the search for a closer ran to the end, through every line
        start = text.find("\\(", start + 2)


def test_the_measure_tells_work_that_grows_with_the_square_of_the_text():
    small, large = unclosed_inline("\\(", N_CHARS), unclosed_inline("\\(", 4 * N_CHARS)
    assert cpu_ratio(rescan_each_opener, small, large) > 2 * MOST


# --- Showing a message --------------------------------------------------------------------------

N_CHARS = 10_000
OPENERS = ["\\(", "$$", "\\["]
CLOSERS = {"\\(": "\\)", "$$": "$$", "\\[": "\\]"}


def unclosed_inline(opener: str, n: int) -> str:
    """One paragraph of openers that no closer follows."""
    unit = f"a {opener}"
    return unit * (n // len(unit))


def opener_lines(opener: str, n: int) -> str:
    """Lines that each start display math that never closes."""
    return f"{opener}\n" * (n // 3)


def closer_with_text_after(opener: str, n: int) -> str:
    """Opening lines whose only closer has text after it, so that none is display math."""
    return f"{opener}\n" * (n // 3) + f"{CLOSERS[opener]} and more"


def closer_outside_the_list(opener: str, n: int) -> str:
    """Opening lines in a list item whose only closer comes after the item has ended."""
    return "- item\n" + f"  {opener}\n" * (n // 5) + f"the end\n{CLOSERS[opener]}"


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("text", [unclosed_inline, opener_lines, closer_with_text_after, closer_outside_the_list])
def test_showing_a_message_costs_in_step_with_its_length(opener, text):
    render = for_display.__wrapped__  # uncached: every run does the work
    assert cpu_ratio(render, text(opener, N_CHARS), text(opener, 4 * N_CHARS)) <= MOST


# --- Export -------------------------------------------------------------------------------------

N_EXCHANGES = 150


class CountingTokenizer(OrcaTokenizer):
    """Orca 2's tokenizer, counting the characters it is given to encode."""

    encoded = 0

    def encode_text(self, text: str) -> list[int]:
        self.encoded += len(text)
        return super().encode_text(text)


@pytest.fixture
def counting_chat() -> Chat:
    counting = CountingTokenizer(FIXTURES / "orca2-tokenizer" / "tokenizer.model")
    return Chat(FakeBackend(counting, ["\n", "ok"]), Settings(max_exchanges=4 * N_EXCHANGES))


def short_exchanges(n: int) -> Conversation:
    """Many short multi-turn exchanges: past a few hundred, every prompt is a whole context of earlier turns."""
    settings = GenerationParams(max_new_tokens=64)
    return Conversation(exchanges=[exchange(f"Question {i}?", f"Answer {i}.", settings=settings) for i in range(n)])


def exported(chat: Chat, conversation: Conversation, kind: str) -> str:
    return json.loads(download(chat, conversation, kind, LookedAt()))["text"]


def test_exporting_encodes_each_exchange_once_and_the_file_grows_in_step(counting_chat):
    tokenizer = counting_chat.backend.tokenizer
    encoded, sizes = [], []
    for n in (N_EXCHANGES, 4 * N_EXCHANGES):
        tokenizer.encoded = 0
        sizes.append(len(exported(counting_chat, short_exchanges(n), "json")))
        encoded.append(tokenizer.encoded)
    assert encoded[1] <= MOST * encoded[0]
    assert sizes[1] <= MOST * sizes[0]


def test_the_exported_prompts_still_fill_the_context(counting_chat):
    """What the file names is what the model read: the last prompts hold a whole context of turns."""
    conversation = short_exchanges(4 * N_EXCHANGES)
    export = Export.model_validate_json(exported(counting_chat, conversation, "json"))
    last = export.prompt_ids_of(len(conversation.exchanges) - 1)
    assert 4096 - 64 - 40 < len(last) <= 4096 - 64
    assert export.exchanges[-1].earlier_turns.first > 1


def test_a_markdown_export_encodes_nothing_and_grows_in_step(counting_chat):
    tokenizer = counting_chat.backend.tokenizer
    sizes = [len(exported(counting_chat, short_exchanges(n), "markdown")) for n in (N_EXCHANGES, 4 * N_EXCHANGES)]
    assert tokenizer.encoded == 0
    assert sizes[1] <= MOST * sizes[0]


def test_exporting_takes_cpu_time_in_step_with_the_conversation(counting_chat):
    small, large = short_exchanges(N_EXCHANGES), short_exchanges(4 * N_EXCHANGES)
    assert cpu_ratio(lambda c: download(counting_chat, c, "json", LookedAt()), small, large) <= MOST


# --- Import -------------------------------------------------------------------------------------


def export_full_of(opener: str, n_chars: int) -> str:
    """An export whose questions and answers are all unclosed openers: n_chars of them in all."""
    per_text, texts = 2_000, n_chars // 2_000
    unit = f"a {opener}"
    text = unit * (per_text // len(unit))
    conversation = Conversation(exchanges=[exchange(text, text) for _ in range(texts // 2)])
    # The ids don't matter to an import.
    return Export(
        model="m",
        weights="w",
        backend="b",
        conversation_id=conversation.id,
        created=conversation.created,
        exchanges=[{**e.model_dump(), "prompt_ids": []} for e in conversation.exchanges],
    ).model_dump_json()


def imported_and_shown(file: str) -> list[dict]:
    """What an import does with a file: read it, then show the conversation."""
    for_display.cache_clear()
    return chat_messages(parse_export(file, LookedAt(), 10_000)[0], show_raw=False)


@pytest.mark.parametrize("opener", OPENERS)
def test_importing_costs_in_step_with_the_file(opener):
    small, large = export_full_of(opener, 25_000), export_full_of(opener, 100_000)
    assert cpu_ratio(imported_and_shown, small, large) <= MOST
