"""Write a model folder of make_tiny_model.py as a GGUF file, for the llama.cpp backend's tests and bench.

    python tests/make_tiny_gguf.py MODEL_DIR OUT.gguf [--type f32|q8_0]

It writes what llama.cpp's convert_hf_to_gguf.py writes for a LLaMA with a SentencePiece tokenizer
(the converter is not installed with llama-cpp-python, only vendored in its source): the
hyperparameters, Orca 2's 32,003 tokens with their scores and types, and the weights under
llama.cpp's names, q and k permuted back to the rotary layout llama.cpp expects. f32 keeps the
weights exact; q8_0 is llama.cpp's 8-bit format, quantized by the gguf package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file
from sentencepiece import SentencePieceProcessor

FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# Hugging Face's LLaMA tensor names → llama.cpp's; {n} is the layer.
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{n}.input_layernorm.weight": "blk.{n}.attn_norm.weight",
    "model.layers.{n}.self_attn.q_proj.weight": "blk.{n}.attn_q.weight",
    "model.layers.{n}.self_attn.k_proj.weight": "blk.{n}.attn_k.weight",
    "model.layers.{n}.self_attn.v_proj.weight": "blk.{n}.attn_v.weight",
    "model.layers.{n}.self_attn.o_proj.weight": "blk.{n}.attn_output.weight",
    "model.layers.{n}.post_attention_layernorm.weight": "blk.{n}.ffn_norm.weight",
    "model.layers.{n}.mlp.gate_proj.weight": "blk.{n}.ffn_gate.weight",
    "model.layers.{n}.mlp.up_proj.weight": "blk.{n}.ffn_up.weight",
    "model.layers.{n}.mlp.down_proj.weight": "blk.{n}.ffn_down.weight",
}


def vocabulary(model_dir: Path) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types as the converter reads them from tokenizer.model and added_tokens.json
    (whose tokens it marks user-defined, as Orca 2's tokenizer_config.json marks none of them special)."""
    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        for check, marked in ((sp.is_unknown, "UNKNOWN"), (sp.is_control, "CONTROL"), (sp.is_byte, "BYTE")):
            if check(i):
                kind = gguf.TokenType[marked]
        types.append(kind)
    for text, i in sorted(json.loads((model_dir / "added_tokens.json").read_text()).items(), key=lambda kv: kv[1]):
        assert i == len(tokens), "added tokens follow SentencePiece's"
        tokens.append(text)
        scores.append(-1000.0)
        types.append(gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k rows → the rotary layout llama.cpp uses (the converter's permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(
    model_dir: str | Path,
    out: str | Path,
    file_type: str = "f32",
    *,
    architecture: str = "llama",
    tokens: list[str] | None = None,
) -> Path:
    """The GGUF of a model folder. `architecture` and `tokens` (the vocabulary, rows cut to match)
    write the wrong files a test needs."""
    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    ftype, qtype = FILE_TYPES[file_type]
    own_tokens, scores, types = vocabulary(model_dir)
    tokens = tokens or own_tokens
    n_vocab, heads = len(tokens), config["num_attention_heads"]

    writer = gguf.GGUFWriter(out, architecture)
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(ftype)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores[:n_vocab])
    writer.add_token_types(types[:n_vocab])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    for n in range(config["num_hidden_layers"]):
        for hf, ours in NAMES.items():
            if "{n}" not in hf and n > 0:
                continue
            weight = weights[hf.format(n=n)].astype(np.float32)
            if hf.endswith(("q_proj.weight", "k_proj.weight")):
                weight = permute(weight, heads if "q_proj" in hf else config["num_key_value_heads"])
            if hf in ("model.embed_tokens.weight", "lm_head.weight"):
                weight = weight[:n_vocab]
            if weight.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(ours.format(n=n), weight)
            else:
                quantized = gguf.quants.quantize(weight, qtype)
                writer.add_tensor(ours.format(n=n), quantized, raw_shape=quantized.shape, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder of make_tiny_model.py")
    parser.add_argument("out", help="the GGUF file to write")
    parser.add_argument("--type", choices=FILE_TYPES, default="f32", help="weights format (default f32)")
    args = parser.parse_args()
    print(f"Wrote {write_gguf(args.model_dir, args.out, args.type)}")


if __name__ == "__main__":
    main()
