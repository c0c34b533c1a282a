"""README and docs/ promises that are checked: the client example runs, the commands are the ones CI
uses, the scale-out lines work, and every link to docs/ leads to a page."""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, free_port, wait_until_up

from orca2_space.publish import HARDWARE, card_metadata
from orca2_space.settings import DEFAULT_MODEL

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
# Markdown links: [text](target), the target up to its closing parenthesis.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def snippet(page: str, marker: str, language: str) -> str:
    """The code block right after `<!-- marker -->` in docs/page."""
    text = (DOCS / page).read_text()
    return re.search(rf"<!-- {marker} -->\n```{language}\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_api_client_example_runs_against_the_launched_app(launched_chat):
    _, url = launched_chat
    block = snippet("api.md", "client-example", "python")
    code = block.replace('"http://127.0.0.1:7860/"', repr(url))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "docs/api.md", "exec"), {})  # noqa: S102 (running the docs example is the test)
    lines = [line for line in output.getvalue().splitlines() if not line.startswith("Loaded as API")]
    assert lines[0].startswith("The answer")
    assert any(line.startswith("length 256 tokens,") for line in lines)
    assert any(line.startswith("256 tokens scored; the first: The") for line in lines)
    assert [line for line in lines if line.startswith("length 64 tokens: ")] == ["length 64 tokens: The answer"] * 2
    assert lines[-1].startswith("16 prompt tokens: [1, 29871, 32001, 5205, 13, 32002]")


@pytest.mark.slow
def test_the_evaluate_example_runs_against_the_launched_app(launched_chat):
    _, url = launched_chat
    code = snippet("api.md", "evaluate-example", "python").replace('"http://127.0.0.1:7860/"', repr(url))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "docs/api.md", "exec"), {})  # noqa: S102 (running the docs example is the test)
    lines = [line for line in output.getvalue().splitlines() if not line.startswith("Loaded as API")]
    assert lines[0] == "6 of 6 answered"
    # The test model writes "The answer" over and over: no number in it, so no answer is found.
    assert [line.partition(" (95%")[0] for line in lines[1:3]] == [
        f"system message {m}: 0 right, 3 with no answer found, accuracy 0%" for m in (0, 1)
    ]
    assert len(lines) == 4 and lines[3]


def test_ci_runs_the_test_command_written_in_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^pip install -r requirements.txt -r requirements-dev.txt.*$", README, re.MULTILINE).group(0)
    assert "python -m pytest" in command
    assert "grep -m1 '^pip install -r requirements.txt -r requirements-dev.txt' README.md" in ci


def test_the_cpu_torch_comes_first_from_its_index_at_the_pinned_version():
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    cpu_torch = f"pip install torch=={pinned} --index-url https://download.pytorch.org/whl/cpu"
    installs = re.findall(r"^pip install .*$", README, re.MULTILINE)
    assert installs[0] == cpu_torch, installs


def test_every_docs_link_leads_to_a_page_and_every_page_is_linked_from_the_readme():
    linked = {target for target in LINK.findall(README) if target.startswith("docs/")}
    assert linked, "README links to no docs/ page"
    assert {target for target in linked if not (ROOT / target).is_file()} == set()
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages == linked, "docs/ pages and README's links to them differ"
    # Relative links between the pages resolve too (web addresses are not fetched).
    for page in DOCS.glob("*.md"):
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not target.startswith("#"):
                assert (page.parent / target.partition("#")[0]).exists(), f"{page.name} links to {target}"


def test_front_matter_is_a_valid_space_card_that_pins_the_gradio_of_requirements():
    card = card_metadata()  # huggingface_hub's own parser, as the Hub reads it
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert card["sdk"] == "gradio" and card["sdk_version"] == pinned
    assert (ROOT / card["app_file"]).is_file() and card["python_version"] == "3.11"
    assert card["suggested_hardware"] in HARDWARE and card["models"][0] == DEFAULT_MODEL
    assert {"title", "emoji", "colorFrom", "colorTo", "license"} <= card.keys()
    assert len(card["short_description"]) <= 60  # the Hub's limit


def test_the_space_preloads_the_files_the_app_loads_at_build_time():
    (entry,) = card_metadata()["preload_from_hub"]
    repo, files = entry.split()
    files = files.split(",")
    assert repo == DEFAULT_MODEL
    # What OrcaTokenizer and from_pretrained read, and every shard the weight index names.
    assert {"tokenizer.model", "config.json", "generation_config.json", "pytorch_model.bin.index.json"} <= set(files)
    shards = sorted(name for name in files if name.startswith("pytorch_model-"))
    assert shards == [f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" for i in range(1, len(shards) + 1)]


@pytest.mark.slow
def test_the_scale_out_commands_work_as_written(tmp_path):
    """docs/scaling-out.md's transformers serve lines, run in a fresh folder (ports changed, nothing else)."""
    from gradio_client import Client

    block = snippet("scaling-out.md", "scale-out-transformers", "bash")
    install, make, serve, app = block.strip().splitlines()
    assert install.split()[-1].strip('"') in (ROOT / "requirements-dev.txt").read_text().split()
    server_port, app_port = free_port(), free_port()
    # A venv's console scripts (`transformers`) sit next to its python.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def command(line: str) -> list[str]:
        words = shlex.split(line.replace("8000", str(server_port)).removesuffix("&"))
        words = [sys.executable if word == "python" else word for word in words]
        return [str(ROOT / word) if (ROOT / word).is_file() else word for word in words]

    subprocess.run(command(make), cwd=tmp_path, env=env, check=True, capture_output=True)
    logs = tmp_path / "serve.log", tmp_path / "app.log"
    with open(logs[0], "wb") as serve_log, open(logs[1], "wb") as app_log:
        server = subprocess.Popen(command(serve), cwd=tmp_path, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        ui = subprocess.Popen(
            [*command(app), "--port", str(app_port)], cwd=tmp_path, env=env, stdout=app_log, stderr=subprocess.STDOUT
        )
        try:
            wait_until_up(f"http://127.0.0.1:{server_port}/health", server, logs[0], "transformers serve")
            wait_until_up(f"http://127.0.0.1:{app_port}/", ui, logs[1], "the app")
            final = Client(f"http://127.0.0.1:{app_port}/", verbose=False).predict(
                message="Hi", max_new_tokens=8, api_name="/chat"
            )
        finally:
            for process in (ui, server):
                process.terminate()
                process.wait(timeout=30)
    assert final["done"] and final["error"] is None and final["n_tokens"] == 8, final
