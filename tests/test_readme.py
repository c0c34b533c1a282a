"""README promises that are checked: the client example runs, the commands are the ones CI uses."""

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_client_example_runs_against_the_launched_app(launched_chat):
    _, url = launched_chat
    block = re.search(r"<!-- client-example -->\n```python\n(.*?)```", README, re.S).group(1)
    code = block.replace('"http://127.0.0.1:7860/"', repr(url))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {})
    lines = [line for line in output.getvalue().splitlines() if not line.startswith("Loaded as API")]
    assert lines[0].startswith("The answer")
    assert any(line.startswith("length 256 tokens,") for line in lines)
    assert lines[-1].startswith("16 prompt tokens: [1, 29871, 32001, 5205, 13, 32002]")


def test_ci_runs_the_test_command_written_in_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^pip install -r requirements.txt -r requirements-dev.txt.*$", README, re.M).group(0)
    assert "python -m pytest" in command
    assert "grep -m1 '^pip install -r requirements.txt -r requirements-dev.txt' README.md" in ci


def test_front_matter_pins_the_gradio_of_requirements():
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"sdk_version: {pinned}\n" in README
    assert "app_file: app.py" in README and "microsoft/Orca-2-7b" in README
