"""Publishing to a Space: the plan uploads exactly what the Space runs, and never a secret."""

import os
import shutil
import subprocess
import sys

import pytest
from support import ROOT

from orca2_space import publish

MODULES = sorted(p.relative_to(ROOT / "orca2_space").as_posix() for p in (ROOT / "orca2_space").rglob("*.py"))
DOCS = sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def run_publish(*args, env=None, cwd=ROOT):
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", *publish.SECRET_NAMES)}
    return subprocess.run(
        [sys.executable, "-m", "orca2_space.publish", *args],
        check=False,
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_plan_uploads_exactly_the_app_its_package_requirements_card_and_screenshot():
    paths = [path for path, _ in publish.make_plan("me/orca2", False, None, environ={}).files]
    assert paths == [
        "app.py",
        "requirements.txt",
        "README.md",
        *(f"orca2_space/{name}" for name in MODULES),
        "orca2_space/data/sample_questions.jsonl",
        *(f"docs/{name}" for name in DOCS),
        "assets/compare.png",
        "assets/evaluate.png",
        "assets/screenshot.png",
    ]
    assert "orca2_space/ui/page.py" in paths and "docs/api.md" in paths


def test_caches_venvs_tests_local_models_and_dotenv_files_stay_behind(tmp_path):
    for name in [*publish.SPACE_FILES, "assets/screenshot.png", *(f"orca2_space/{m}" for m in MODULES)]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    junk = [
        ".env",
        ".venv/lib/site.py",
        "orca2_space/__pycache__/engine.cpython-311.pyc",
        "tests/test_engine.py",
        "tiny/model.safetensors",
        "assets/notes.txt",
        "bench/load.json",
    ]
    for name in junk:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("CONTENT_SAFETY_KEY=do-not-upload")
    paths = {path for path, _ in publish.make_plan("me/orca2", False, None, environ={}, root=tmp_path).files}
    assert paths.isdisjoint(junk)
    assert len(paths) == 3 + len(MODULES) + 1


def test_dry_run_prints_the_plan_without_network_and_names_secrets_without_their_values():
    secrets = {
        "CONTENT_SAFETY_ENDPOINT": "https://example.cognitiveservices.azure.com/",
        "CONTENT_SAFETY_KEY": "k3y-v4lue-never-shown",
    }
    result = run_publish(
        "me/orca2", "--dry-run", "--hardware", "a10g-small", "--private", env={"HF_HUB_OFFLINE": "1", **secrets}
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "https://huggingface.co/spaces/me/orca2 (private)" in out
    assert "Hardware   a10g-small" in out
    assert "CONTENT_SAFETY_ENDPOINT, CONTENT_SAFETY_KEY" in out
    assert "k3y-v4lue-never-shown" not in out + result.stderr and "example.cognitiveservices" not in out
    assert "orca2_space/backends/local/engine.py" in out and "sdk_version: 6.31.0" in out
    files_line = next(line for line in out.splitlines() if line.startswith("Files"))
    # The code, docs and three screenshots: about 1.1 MiB.
    assert int(files_line.split(",")[1].split()[0]) < 1536, "over 1.5 MiB: something bulky slipped in"


def test_without_a_token_publishing_says_how_to_get_one(tmp_path):
    result = run_publish("me/orca2", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "error: no Hugging Face token: set HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["orca2"], {}, "is not a Space id: use OWNER/NAME"),
        (["me/orca2", "--hardware", "a10g-huge"], {}, "unknown hardware 'a10g-huge'; one of: cpu-basic"),
        (["me/orca2"], {"CONTENT_SAFETY_KEY": "k"}, "CONTENT_SAFETY_KEY is set but CONTENT_SAFETY_ENDPOINT is not"),
    ],
)
def test_mistakes_are_refused_before_anything_is_sent(args, env, message):
    result = run_publish(*args, "--dry-run", env=env)
    assert result.returncode == 2 and message in result.stderr


def test_preloaded_files_the_model_repository_lacks_are_caught(tiny_model_dir):
    card = {"preload_from_hub": ["me/tiny config.json,tokenizer.model,pytorch_model-00001-of-00003.bin"]}
    assert publish.missing_preloads(card, lambda repo: os.listdir(tiny_model_dir)) == [
        "me/tiny/pytorch_model-00001-of-00003.bin"
    ]
