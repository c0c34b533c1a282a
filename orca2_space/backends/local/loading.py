"""Loading Orca 2 here: which weights format fits this machine and why, the load itself, and one
clear message for whatever makes it fail."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from ...prompt import OrcaTokenizer
from ..contract import ModelInfo, load_failure_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPlan:
    """Which weights format to load and why, shown in the log and on the page."""

    quantization: str
    reason: str


def plan_load(requested: str, cuda: bool, fp32_bytes: int, ram_bytes: int, zerogpu: bool = False) -> LoadPlan:
    if requested != "auto":
        return LoadPlan(requested, "requested")
    if zerogpu:
        # ZeroGPU moves the model between CPU and a borrowed GPU, and bitsandbytes-quantized models
        # can't be moved with .to().
        return LoadPlan("bf16", "auto: on ZeroGPU, where 8-bit (bitsandbytes) models can't be moved to the GPU")
    if cuda:
        return LoadPlan("8bit", "auto: a CUDA GPU is present, and 8-bit needs half the memory of bf16")
    gib = 2**30
    if fp32_bytes <= ram_bytes / 2:
        return LoadPlan(
            "fp32",
            f"auto: no GPU, and fp32 weights ({fp32_bytes / gib:.1f} GiB) fit in RAM "
            f"({ram_bytes / gib:.0f} GiB) with room to spare",
        )
    return LoadPlan(
        "bf16",
        f"auto: no GPU, and fp32 weights ({fp32_bytes / gib:.1f} GiB) would take more than half "
        f"of RAM ({ram_bytes / gib:.0f} GiB); bf16 halves them",
    )


def load_model(model_name: str, quantization: str, on_phase: Callable[[str], None], zerogpu: bool):
    """The model in eval mode, its tokenizer and what the page says of it."""
    on_phase("reading the tokenizer")
    tokenizer = OrcaTokenizer.for_model(model_name)
    on_phase("reading the config")
    config = AutoConfig.from_pretrained(model_name)
    cuda = torch.cuda.is_available()
    plan = plan_load(quantization, cuda, _fp32_bytes(config), psutil.virtual_memory().total, zerogpu)
    log.info("loading %s as %s (%s)", model_name, plan.quantization, plan.reason)
    fetch = "loading" if os.path.isdir(model_name) else "downloading (once) and loading"
    on_phase(f"{fetch} the weights as {plan.quantization}")
    model = AutoModelForCausalLM.from_pretrained(model_name, **_load_kwargs(plan.quantization, cuda and not zerogpu))
    if zerogpu:
        # ZeroGPU keeps it on CPU until a spaces.GPU task borrows a GPU. (transformers declares .to with
        # functools.wraps(Module.to), which shows the type checker an unbound method.)
        model.to("cuda")  # pyright: ignore[reportArgumentType]
    model.eval()
    # The prompt builder keeps prompt + max_new_tokens inside the context; the config's own
    # max_length would only make generate warn on every request.
    model.generation_config.max_length = None
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    info = ModelInfo(model_name, plan.quantization, plan.reason, device, config.max_position_embeddings)
    return model, tokenizer, info


def _load_kwargs(quantization: str, cuda: bool) -> dict:
    device_map = "auto" if cuda else {"": "cpu"}
    if quantization == "8bit":
        # LLM.int8 computes in fp16 on GPUs; on CPU the activations stay fp32.
        dtype = torch.float16 if cuda else torch.float32
        return dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=dtype, device_map=device_map)
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        return dict(quantization_config=config, device_map=device_map)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quantization]
    return dict(dtype=dtype, device_map=device_map)


def _fp32_bytes(config) -> int:
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in skeleton.parameters())


def load_failure(model_name: str, error: BaseException) -> str:
    """What to say when the model can't load: the reason, and what to do about it."""
    hint = None
    reason = error
    if isinstance(error, HFValidationError) and not os.path.exists(model_name):
        reason = "there is no folder at that path, and it is not a hub id (OWNER/NAME)"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        hint = "There is not enough memory: try --quantization 8bit or 4bit on a GPU, bf16 on CPU, or a smaller model."
    elif isinstance(error, ImportError):
        hint = "A package is missing: pip install -r requirements.txt"
    return load_failure_message(model_name, reason, hint)


class _OncePerMessage(logging.Filter):
    """bitsandbytes logs the same cast warning on every 8-bit matmul; once per process is plenty."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage())
