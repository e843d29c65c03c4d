"""A Hugging Face causal LM behind the serving path's ``QueryModel`` interface.

Benchmarks and evaluation compare torch models (the teacher, the student before export)
with the ONNX runtime on the same prompts, so this mirrors ``OnnxCausalLM.generate``: greedy,
left padding, prompts already rendered (no special tokens added), generation stops at
``<|im_end|>`` or the model's eos, and only the new text is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from models.runtime import stop_token_ids

log = logging.getLogger(__name__)


class TorchCausalLM:
    """Greedy batched generation with ``transformers`` on the CPU (fp32)."""

    def __init__(self, model_dir: Path | str, *, version: str | None = None, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        # HF dirs carry no manifest: name them after the dir unless told otherwise.
        self.version = version or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.eos_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        log.info("loaded torch model %s from %s", self.version, self.model_dir)

    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[list[int]]:
        """Greedy new token ids per prompt, eos excluded."""
        import torch

        if not prompts:
            return []
        enc = self.tokenizer(list(prompts), padding=True, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
        rows = out[:, enc["input_ids"].shape[1]:].tolist()
        return [row[: next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))] for row in rows]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
        """Greedy completions (new text only, special tokens stripped), one per prompt."""
        return self.tokenizer.batch_decode(self.generate_ids(prompts, max_new_tokens=max_new_tokens),
                                           skip_special_tokens=True)
