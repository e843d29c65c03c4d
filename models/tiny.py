"""A tiny random Llama with the real SmolLM2 tokenizer, exported like a real model.

Tests use it to exercise the whole export -> manifest -> runtime path in seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.bootstrap import smollm2_tokenizer_dir
from models.export import export_onnx

log = logging.getLogger(__name__)

TINY_NAME = "tiny-random-llama"


def build_tiny_model(out_dir: Path, *, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Build ``out_dir/hf`` (random weights) and export it to ``out_dir/onnx``; returns the latter."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    hf_dir, onnx_dir = out_dir / "hf", out_dir / "onnx"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA like SmolLM2, so the KV-cache shapes are exercised
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        # Wider init than the default 0.02 so greedy picks are not near-ties.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    export_onnx(hf_dir, onnx_dir, name=TINY_NAME, version=f"tiny-{seed}", overwrite=True)
    return onnx_dir
