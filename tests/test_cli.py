"""`python app.py`: flags, their environment variables, share safety, and load failures."""

import os
import socket
import subprocess
import sys

import pytest
from support import ROOT

from orca2_space import cli
from orca2_space.backends.local.batching import BatchingSettings, batching_settings
from orca2_space.cli import SHARE_WITHOUT_AUTH_WARNING, options, parser, settings_from_args, share_decision
from orca2_space.settings import InferenceServerSettings, ModerationSettings, Settings

# The flags and variables README.md documents.
FLAGS_AND_ENV = {
    "--model": "ORCA2_MODEL",
    "--quantization": "ORCA2_QUANTIZATION",
    "--host": "ORCA2_HOST",
    "--port": "ORCA2_PORT",
    "--share": "ORCA2_SHARE",
    "--auth": "ORCA2_AUTH",
    "--max-new-tokens-cap": "ORCA2_MAX_NEW_TOKENS_CAP",
    "--concurrency": "ORCA2_CONCURRENCY",
    "--max-queue": "ORCA2_MAX_QUEUE",
    "--batching": "ORCA2_BATCHING",
    "--batch-cache-tokens": "ORCA2_BATCH_CACHE_TOKENS",
    "--log-level": "ORCA2_LOG_LEVEL",
    "--backend": "ORCA2_BACKEND",
    "--base-url": "ORCA2_BASE_URL",
    "--api-key": "ORCA2_API_KEY",
    "--served-model": "ORCA2_SERVED_MODEL",
    "--server-timeout": "ORCA2_SERVER_TIMEOUT",
    "--moderation": "ORCA2_MODERATION",
    "--moderation-required": "ORCA2_MODERATION_REQUIRED",
    "--moderation-threshold": "ORCA2_MODERATION_THRESHOLD",
    "--moderation-categories": "ORCA2_MODERATION_CATEGORIES",
    "--moderation-on-failure": "ORCA2_MODERATION_ON_FAILURE",
    "--moderation-timeout": "ORCA2_MODERATION_TIMEOUT",
    "--moderation-retries": "ORCA2_MODERATION_RETRIES",
}


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch):
    for option in options():
        monkeypatch.delenv(option.env, raising=False)
    for platform in ("SPACE_ID", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(platform, raising=False)


def run_app(*args, env=None):
    return subprocess.run(
        [sys.executable, "app.py", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_help_documents_every_flag_and_its_environment_variable():
    result = run_app("--help")
    assert result.returncode == 0
    documented = {option.flag: option.env for option in options() if option.flag}
    assert FLAGS_AND_ENV.items() <= documented.items()
    for flag, env in documented.items():
        assert flag in result.stdout and env in result.stdout
    assert "microsoft/Orca-2-13b" in result.stdout
    unwrapped = " ".join(result.stdout.split())
    assert "[ORCA2_PORT] (default 7860)" in unwrapped
    assert "[ORCA2_HOST] (default 127.0.0.1; 0.0.0.0 on a Space)" in unwrapped


def test_flags_and_variables_are_named_after_the_fields():
    spelled = {option.dest: (option.flag, option.env) for option in options()}
    assert spelled["max_new_tokens_cap"] == ("--max-new-tokens-cap", "ORCA2_MAX_NEW_TOKENS_CAP")
    assert spelled["moderation.threshold"] == ("--moderation-threshold", "ORCA2_MODERATION_THRESHOLD")
    assert spelled["inference_server.read_timeout"] == ("--server-timeout", "ORCA2_SERVER_TIMEOUT")
    # The moderation service's address and key are read from the environment only.
    assert spelled["moderation.endpoint"] == (None, "CONTENT_SAFETY_ENDPOINT")
    assert spelled["moderation.key"] == (None, "CONTENT_SAFETY_KEY")


def test_without_flags_or_variables_the_settings_are_the_fields_defaults():
    assert settings_from_args(parser().parse_args([])) == Settings()


def test_environment_variables_set_the_defaults(monkeypatch):
    monkeypatch.setenv("ORCA2_MODEL", "microsoft/Orca-2-13b")
    monkeypatch.setenv("ORCA2_QUANTIZATION", "4bit")
    monkeypatch.setenv("ORCA2_PORT", "9000")
    monkeypatch.setenv("ORCA2_AUTH", "ann:secret")
    monkeypatch.setenv("ORCA2_MAX_NEW_TOKENS_CAP", "100")
    monkeypatch.setenv("ORCA2_SHARE", "true")
    monkeypatch.setenv("ORCA2_CONCURRENCY", "3")
    monkeypatch.setenv("ORCA2_BATCHING", "off")
    monkeypatch.setenv("ORCA2_BATCH_CACHE_TOKENS", "4096")
    monkeypatch.setenv("ORCA2_MODERATION_CATEGORIES", "Hate, Violence")
    monkeypatch.setenv("ORCA2_MODERATION_ON_FAILURE", "open")
    monkeypatch.setenv("CONTENT_SAFETY_ENDPOINT", "https://safety.example")
    monkeypatch.setenv("CONTENT_SAFETY_KEY", "safety-secret")
    settings = settings_from_args(parser().parse_args([]))
    assert settings == Settings(
        model="microsoft/Orca-2-13b",
        quantization="4bit",
        port=9000,
        auth=("ann", "secret"),
        max_new_tokens_cap=100,
        share=True,
        concurrency=3,
        batching=False,
        batch_cache_tokens=4096,
        moderation=ModerationSettings(
            endpoint="https://safety.example", key="safety-secret", categories=("Hate", "Violence"), fail_open=True
        ),
    )
    assert settings.moderation.configured
    assert "secret" not in repr(settings)


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("ORCA2_PORT", "")
    monkeypatch.setenv("CONTENT_SAFETY_KEY", "")
    settings = settings_from_args(parser().parse_args([]))
    assert settings.port == 7860 and settings.moderation.key is None


def test_an_inference_server_is_chosen_by_flags_or_environment(monkeypatch):
    monkeypatch.setenv("ORCA2_BACKEND", "inference-server")
    monkeypatch.setenv("ORCA2_BASE_URL", "http://gpu-host:8000/v1")
    monkeypatch.setenv("ORCA2_API_KEY", "sk-server-secret")
    args = parser().parse_args(["--served-model", "orca2", "--server-timeout", "30"])
    server = settings_from_args(args).inference_server
    assert server == InferenceServerSettings("http://gpu-host:8000/v1", "orca2", "sk-server-secret", read_timeout=30)
    assert "sk-server-secret" not in repr(settings_from_args(args))
    assert settings_from_args(parser().parse_args(["--backend", "local"])).inference_server is None


def test_the_inference_servers_first_name_still_chooses_it(monkeypatch):
    url = ["--base-url", "http://gpu-host:8000/v1"]
    assert settings_from_args(parser().parse_args(["--backend", "openai", *url])).backend == "inference-server"
    monkeypatch.setenv("ORCA2_BACKEND", "openai")
    assert settings_from_args(parser().parse_args(url)).inference_server is not None


def test_the_openai_backend_needs_a_base_url():
    result = run_app("--backend", "openai", "--model", "unused")
    assert result.returncode == 2 and "--base-url" in result.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--base-url", "gpu-host:8000/v1"], "http://"),
        (["--base-url", "http://h/v1", "--server-timeout", "0"], "more than 0"),
    ],
)
def test_a_bad_server_setting_is_refused_clearly(args, says):
    result = run_app("--backend", "openai", "--model", "unused", *args)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, env, line",
    [
        (["--help"], {"ORCA2_PORT": "abc"}, "error: ORCA2_PORT: 'abc' is not a whole number"),
        (["--port", "abc"], {}, "error: argument --port: 'abc' is not a whole number"),
        (["--port", "0"], {}, "error: argument --port: '0' must be at least 1"),
        (
            [],
            {"ORCA2_QUANTIZATION": "3bit"},
            "error: ORCA2_QUANTIZATION: '3bit' is not one of auto, 8bit, 4bit, bf16, fp16, fp32",
        ),
        ([], {"ORCA2_SHARE": "maybe"}, "error: ORCA2_SHARE: 'maybe' is not one of 1, true, yes, on, 0, false, no, off"),
        ([], {"ORCA2_MODERATION_THRESHOLD": "3"}, "error: ORCA2_MODERATION_THRESHOLD: '3' is not one of 0, 2, 4, 6"),
        (
            ["--moderation-categories", "Hate,Gore"],
            {},
            "error: argument --moderation-categories: 'Gore' is not one of Hate, SelfHarm, Sexual, Violence",
        ),
        (["--moderation-timeout", "61"], {}, "error: argument --moderation-timeout: '61' must be at most 60"),
        (["--batch-cache-tokens", "100"], {}, "error: argument --batch-cache-tokens: '100' must be at least 256"),
        (["--server-timeout", "inf"], {}, "error: argument --server-timeout: 'inf' is not a finite number"),
        (
            ["--backend", "inference-server"],
            {},
            "error: --backend inference-server needs --base-url (e.g. http://127.0.0.1:8000/v1)",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_or_the_variable(argv, env, line, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_bad_variable_is_refused_even_under_help():
    result = run_app("--help", env={"ORCA2_PORT": "abc"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: ORCA2_PORT: 'abc' is not a whole number\n"


def test_the_openai_backend_never_imports_torch():
    # A fresh interpreter: other tests import torch into this one.
    code = (
        "import sys\n"
        "from orca2_space.cli import parser, settings_from_args\n"
        "settings = settings_from_args(parser().parse_args(['--backend', 'openai', '--base-url', 'http://x/v1']))\n"
        "assert settings.inference_server is not None\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_by_default_greedy_answers_are_batched_eight_at_a_time_in_a_cache_sized_for_the_machine():
    settings = settings_from_args(parser().parse_args([]))
    assert batching_settings(settings) == BatchingSettings(max_concurrent=8, cache_tokens=8192)  # no GPU here


def test_on_zerogpu_one_answer_is_generated_at_a_time_unless_set(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert settings_from_args(parser().parse_args([])).concurrency == 1
    assert settings_from_args(parser().parse_args(["--concurrency", "2"])).concurrency == 2


def test_flags_win_over_environment_variables(monkeypatch):
    monkeypatch.setenv("ORCA2_MODEL", "from-env")
    assert settings_from_args(parser().parse_args(["--model", "from-flag"])).model == "from-flag"


def test_on_a_space_the_app_listens_on_all_interfaces(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/orca2")
    assert settings_from_args(parser().parse_args([])).host == "0.0.0.0"


def test_share_without_auth_warns_that_anyone_with_the_link_can_use_the_machine():
    assert share_decision(Settings(share=True), on_space=False) == (True, SHARE_WITHOUT_AUTH_WARNING)
    assert share_decision(Settings(share=True, auth=("a", "b")), on_space=False) == (True, None)
    assert share_decision(Settings(), on_space=False) == (False, None)


def test_share_is_not_attempted_on_a_space():
    share, warning = share_decision(Settings(share=True), on_space=True)
    assert share is False and "ignored on a Hugging Face Space" in warning


@pytest.mark.parametrize("auth", ["nopassword", ":pw", "user:"])
def test_a_malformed_auth_is_refused_without_echoing_it(auth):
    result = run_app("--auth", auth, "--model", "unused")
    assert result.returncode == 2 and "USER:PASS" in result.stderr and auth not in result.stderr


def test_a_model_that_cannot_load_exits_non_zero_with_one_clear_message(tmp_path):
    result = run_app("--model", str(tmp_path / "missing-model"), "--share")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert SHARE_WITHOUT_AUTH_WARNING in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing-model" in errors[0]
    assert "--model" in result.stderr


def test_a_model_that_cannot_load_never_starts_the_server(tmp_path):
    result = run_app("--model", str(tmp_path / "missing-model"))
    assert result.returncode == 2
    assert "Orca 2 is at" not in result.stdout and "Running on" not in result.stdout
    assert result.stderr.count("missing-model") == 1  # said once


def test_a_taken_port_is_one_line_naming_the_flag_before_the_model_loads(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app("--model", str(tiny_model_dir), "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: can't listen on 127.0.0.1:") and "--port or ORCA2_PORT" in line
    assert "GRADIO_SERVER_PORT" not in result.stderr


def test_the_queue_looks_for_work_at_a_pace_that_leaves_the_model_its_cores(fake_backend):
    """Gradio's queue looks for work every 1 ms by default: 0.06 of a core at rest, and under load
    wake-ups that take the GIL and a core from the model (bench/streams.py measures both)."""
    from support import free_port

    from orca2_space.chat import Chat

    demo = cli.launch(Chat(fake_backend, Settings(host="127.0.0.1", port=free_port())), block=False)
    try:
        assert demo._queue.sleep_when_free == cli.QUEUE_POLL_SECONDS
        assert demo._queue.progress_update_sleep_when_free == cli.PROGRESS_POLL_SECONDS
    finally:
        demo.close()


def test_on_a_space_one_proxy_is_trusted_with_the_visitors_address_and_elsewhere_none(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert settings_from_args(parser().parse_args([])).trusted_proxies == 0
    monkeypatch.setenv("SPACE_ID", "someone/orca2")
    assert settings_from_args(parser().parse_args([])).trusted_proxies == 1
