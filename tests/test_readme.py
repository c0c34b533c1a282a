"""README promises that are checked: the client example runs, the commands are the ones CI uses."""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


from conftest import free_port, wait_until_up

from orca2_space.settings import DEFAULT_MODEL
from orca2_space.publish import HARDWARE, card_metadata

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


def test_front_matter_is_a_valid_space_card_that_pins_the_gradio_of_requirements():
    card = card_metadata()  # huggingface_hub's own parser, as the Hub reads it
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
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


def test_the_scale_out_commands_work_as_written(tmp_path):
    """README's transformers serve lines, run in a fresh folder (ports changed, nothing else)."""
    from gradio_client import Client

    block = re.search(r"<!-- scale-out-transformers -->\n```bash\n(.*?)```", README, re.S).group(1)
    install, make, serve, app = block.strip().splitlines()
    assert install.split()[-1].strip('"') in (ROOT / "requirements-dev.txt").read_text().split()
    server_port, app_port = free_port(), free_port()
    # A venv's console scripts (`transformers`) sit next to its python.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

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
            final = Client(f"http://127.0.0.1:{app_port}/", verbose=False).predict(message="Hi", max_new_tokens=8, api_name="/chat")
        finally:
            for process in (ui, server):
                process.terminate()
                process.wait(timeout=30)
    assert final["done"] and final["error"] is None and final["n_tokens"] == 8, final
