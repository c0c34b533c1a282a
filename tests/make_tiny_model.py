"""Write a tiny random-weight model folder shaped like Orca 2, for running the app without a GPU.

    python tests/make_tiny_model.py DIR

It is a real LlamaForCausalLM with Orca 2's vocabulary (32003 ids, 4096 positions) and Orca 2's
real tokenizer, so the app loads and runs it through exactly the code it uses for Orca 2. Its
answers are noise: the weights are random.

The tests also use scripted variants (``script=[...]``): the attention and MLP outputs are zeroed,
so each next token depends only on the current one, and the embeddings and output head are set so
that after the prompt's last token ("istant") the model writes the script's ids in order. That
makes "stops at <|im_end|>" or "runs until Stop" checkable on a real forward pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "orca2-tokenizer"
PROMPT_LAST_ID = 22137  # "istant", the last id of every Orca 2 prompt


# "100m" has Orca 2's vocabulary and a small LLaMA body: 134M parameters, for benchmarks.
SIZES = {"tiny": dict(hidden_size=64, layers=2, heads=4), "100m": dict(hidden_size=768, layers=12, heads=12)}


def tiny_config(hidden_size: int = 64, layers: int = 2, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32003,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if hidden_size <= 64 else 2048,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
        tie_word_embeddings=False,
    )


def _script(model: LlamaForCausalLM, script: list[int], loop: bool) -> None:
    """Make the model write `script` after the prompt (then repeat it if loop)."""
    chain = [PROMPT_LAST_ID, *script]
    if len(set(chain)) != len(chain):
        raise ValueError("script ids must be distinct and must not include the prompt's last id")
    successor = dict(itertools.pairwise(chain))
    if loop:
        successor[chain[-1]] = script[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.zero_()
        for current, following in successor.items():
            head[following] += 8.0 * embed[current] / embed[current].norm()


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, script: list[int] | None = None, loop: bool = False, size: str = "tiny"
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**SIZES[size]))
    if script:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
        _script(model, script, loop)
    model.save_pretrained(out)
    # Orca 2's published generation config: greedy, and eos only </s> (the app adds <|im_end|>).
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "do_sample": False, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0})
    )
    for file in TOKENIZER_DIR.iterdir():
        shutil.copy(file, out / file.name)
    shutil.copy(FIXTURES / "NOTICE.md", out / "NOTICE.md")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny (default), or 100m for benchmarks")
    args = parser.parse_args()
    out = build_tiny_model(args.out_dir, seed=args.seed, size=args.size)
    print(f"Wrote a tiny Orca-2-shaped model to {out}. Run: python app.py --model {out}")


if __name__ == "__main__":
    main()
