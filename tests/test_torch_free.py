"""The front end of an inference server needs no torch: `python app.py --backend inference-server` starts and
answers where torch, transformers, accelerate and bitsandbytes are not installed (the smaller
install of requirements-remote.txt).

They are installed here, for the other tests; the app's process is made to see an environment
without them by a sitecustomize module that hides them from the import system.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from openai_stub import OpenAIStub, Script
from support import FIXTURES, LOCAL_ONLY, ROOT, App, environment_without

# Also left out: the local backend's memory check (psutil), and ZeroGPU's package (a GPU lent to a local model).
LEFT_OUT = {*LOCAL_ONLY, "psutil", "spaces"}

# Run in the app's environment: how each package looks there.
LOOK = """
import importlib.metadata, importlib.util
for name in {names!r}:
    try:
        __import__(name)
        print(name, "importable")
    except ModuleNotFoundError:
        missing = importlib.util.find_spec(name) is None
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            print(name, "missing" if missing else "found by find_spec")
        else:
            print(name, "listed by importlib.metadata")
"""


def pins(requirements: str) -> dict[str, str]:
    lines = (ROOT / requirements).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_requirements_remote_is_requirements_without_the_local_packages():
    full, remote = pins("requirements.txt"), pins("requirements-remote.txt")
    assert remote == {name: version for name, version in full.items() if name not in LEFT_OUT}


def test_the_environment_lacks_the_local_packages(tmp_path):
    env = {**os.environ, **environment_without(tmp_path)}
    look = [sys.executable, "-c", LOOK.format(names=LOCAL_ONLY)]
    result = subprocess.run(look, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines() == [f"{name} missing" for name in LOCAL_ONLY]


@pytest.mark.slow
def test_the_inference_server_front_end_answers_without_torch(tmp_path):
    from gradio_client import Client

    env = environment_without(tmp_path / "site")
    with OpenAIStub(Script()) as stub:
        args = ("--backend", "inference-server", "--base-url", stub.base_url)
        app = App(FIXTURES / "orca2-tokenizer", tmp_path / "app.log", env, *args)
        try:
            client = Client(app.url, verbose=False)
            job = client.submit(message="Hi", system_message="Be brief.", history=[], api_name="/chat")
            final = job.result(timeout=60)
            inspected = client.predict(message="Hi", system_message="Be brief.", history=[], api_name="/inspect_prompt")
        finally:
            app.close()
    assert final["done"] and final["answer"] == "The answer" and final["error"] is None, final
    assert stub.script.requests[0]["prompt"] == inspected["input_ids"]  # the exact ids, built without torch
    assert not any(name in app.log() for name in ("No module named", "Traceback"))


def test_every_module_but_the_local_backends_imports_without_the_local_packages(tmp_path):
    """backends/local/ is the one place that needs torch & co.; everything else, the page, the chat,
    the contract, the answer stream, the sampling settings and the inference server, imports without them."""
    package = ROOT / "orca2_space"
    local = package / "backends" / "local"
    modules = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted(package.rglob("*.py"))
        if local not in path.parents
    ]
    assert "orca2_space.backends.inference_server" in modules and "orca2_space.backends.answer" in modules
    code = f"import importlib\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
    env = {**os.environ, **environment_without(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
