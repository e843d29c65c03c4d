"""ONNX Runtime inference for the student model: batched greedy decoding with a KV cache.

Decoding is written directly against ``onnxruntime.InferenceSession`` (not
ORTModelForCausalLM / ``generate``) so a decode step is one ``run`` plus a few numpy ops.
The KV cache stays in OrtValues bound through IOBinding, so on CUDA it never leaves the GPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.manifest import Manifest, read_manifest, verify_manifest

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
IM_END = "<|im_end|>"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class GenerationStats:
    """Timing of the last ``generate`` call (prefill = first step incl. the prompt)."""

    batch_size: int
    prompt_tokens: int  # padded prompt length
    new_tokens: int  # decode steps actually run
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def _session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one graph, no branch parallelism to exploit
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    # Idle pool threads would spin for the next op and starve the serving event loop
    # that shares these cores (it parses events and publishes while the model runs).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _gpu_present() -> bool:
    # Cheap pre-check so CPU-only hosts skip a noisy failed CUDA provider load on every start.
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _create_session(path: Path, providers: str | Sequence[str], opts: ort.SessionOptions) -> ort.InferenceSession:
    if providers != "auto":
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    if CUDA in ort.get_available_providers() and _gpu_present():
        # onnxruntime-gpu lists CUDA even without a usable GPU and then silently falls back;
        # only trust what the session actually ended up with.
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=[CUDA, CPU])
            if CUDA in session.get_providers():
                return session
        except Exception as exc:  # noqa: BLE001 - any CUDA init failure means "use CPU"
            log.info("CUDAExecutionProvider unusable (%s); using CPU", exc)
    return ort.InferenceSession(str(path), sess_options=opts, providers=[CPU])


class OnnxCausalLM:
    """A verified ONNX causal LM directory (model.onnx + tokenizer + manifest.json)."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        providers: str | Sequence[str] = "auto",
        verify: bool = True,
        intra_op_threads: int | None = None,
    ) -> None:
        from transformers import AutoTokenizer  # heavy import, keep it off module import

        self.model_dir = Path(model_dir)
        self.manifest: Manifest | None
        if verify:
            self.manifest = verify_manifest(self.model_dir)
        elif (self.model_dir / "manifest.json").is_file():
            self.manifest = read_manifest(self.model_dir)
        else:
            self.manifest = None  # e.g. export validation, before the manifest exists

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

        self.session = _create_session(self.model_dir / MODEL_FILE, providers, _session_options(intra_op_threads))
        self.providers: list[str] = self.session.get_providers()
        self._device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._past_names = [n for n in self._inputs if n.startswith("past_key_values.")]
        # present.3.key -> past_key_values.3.key: this step's cache is the next step's past.
        self._present_to_past = {
            n: "past_key_values." + n.removeprefix("present.") for n in self._output_names if n.startswith("present.")
        }
        missing = set(self._past_names) - set(self._present_to_past.values())
        if missing or "input_ids" not in self._inputs or "logits" not in self._output_names:
            raise ValueError(f"{self.model_dir / MODEL_FILE} is not a text-generation-with-past export")
        self._past_shape, self._past_dtype = self._past_layout()
        logits_meta = next(o for o in self.session.get_outputs() if o.name == "logits")
        self._vocab = logits_meta.shape[-1]  # int for normal exports; symbolic -> copy path
        # Our exporter keeps only the last position (static 1); other exports give all positions.
        self._logits_positions = logits_meta.shape[1] if logits_meta.shape[1] == 1 else None
        self._logits_dtype = _ORT_DTYPES[logits_meta.type]
        self.last_stats: GenerationStats | None = None
        log.info(
            "loaded %s %s from %s on %s",
            self.manifest.name if self.manifest else "<unmanifested>",
            self.version,
            self.model_dir,
            self.providers,
        )

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    # --- setup helpers -------------------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        gen_cfg = self.model_dir / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if not ids:
            raise ValueError(f"{self.model_dir}: tokenizer has no eos token")
        return frozenset(ids)

    def _past_layout(self) -> tuple[tuple[int, int], Any]:
        """(num_kv_heads, head_dim) and dtype of the KV cache, from the session inputs."""
        if not self._past_names:
            raise ValueError("model has no past_key_values inputs")
        meta = self._inputs[self._past_names[0]]
        heads, head_dim = meta.shape[1], meta.shape[3]
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            # Symbolic dims: fall back to the HF config shipped next to the model.
            cfg = json.loads((self.model_dir / "config.json").read_text())
            heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return (int(heads), int(head_dim)), _ORT_DTYPES[meta.type]

    # --- inference ----------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # Prompts are fully rendered ChatML already: no BOS/extra special tokens.
        enc = self.tokenizer(list(prompts), padding=True, add_special_tokens=False, return_tensors="np")
        if not enc["attention_mask"].any(axis=1).all():
            raise ValueError("every prompt must contain at least one token")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: dict[str, Any]):  # type: ignore[no-untyped-def]
        """One forward pass; returns (logits of the last position, present cache as OrtValues)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        if "attention_mask" in self._inputs:
            binding.bind_cpu_input("attention_mask", attention_mask)
        if "position_ids" in self._inputs:
            binding.bind_cpu_input("position_ids", position_ids)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        if isinstance(self._vocab, int):
            # Write logits straight into a numpy buffer: the prefill's (batch, seq, vocab)
            # logits are hundreds of MB and OrtValue.numpy() would copy them.
            positions = self._logits_positions or input_ids.shape[1]
            logits_buf = np.empty((input_ids.shape[0], positions, self._vocab), dtype=self._logits_dtype)
            binding.bind_output("logits", "cpu", 0, logits_buf.dtype, logits_buf.shape, logits_buf.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        for name in self._present_to_past:
            binding.bind_output(name, self._device)  # cache stays on the device
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self._output_names, binding.get_outputs(), strict=True))
        last = (logits_buf if isinstance(self._vocab, int) else outputs["logits"].numpy())[:, -1, :]
        logits = np.array(last)  # own copy of just the last position, so the big buffer can go
        present = {past_name: outputs[name] for name, past_name in self._present_to_past.items()}
        return logits, present

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        heads, head_dim = self._past_shape
        empty = np.zeros((batch, heads, 0, head_dim), dtype=self._past_dtype)
        return {name: empty for name in self._past_names}

    def next_token_logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Logits at the last prompt position, shape (batch, vocab). Used for parity checks."""
        input_ids, attention_mask = self._encode(prompts)
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        logits, _ = self._run(input_ids, attention_mask, position_ids, self._empty_past(len(prompts)))
        return logits

    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[list[int]]:
        """Greedy new token ids per prompt, eos excluded."""
        if not prompts:
            return []
        batch = len(prompts)
        input_ids, attention_mask = self._encode(prompts)
        prompt_tokens = int(input_ids.shape[1])
        # Left padding: positions count real tokens only; pads get 0 (they are masked anyway).
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        past: dict[str, Any] = self._empty_past(batch)
        eos = np.fromiter(self.eos_ids, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        steps: list[np.ndarray] = []

        t0 = time.perf_counter()
        prefill_s = 0.0
        for step in range(max_new_tokens):
            logits, past = self._run(input_ids, attention_mask, position_ids, past)
            next_ids = np.where(done, self.pad_id, logits.argmax(axis=-1)).astype(np.int64)
            steps.append(next_ids)
            done |= np.isin(next_ids, eos)
            if step == 0:
                prefill_s = time.perf_counter() - t0
            if done.all():
                break
            input_ids = next_ids[:, None]
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            position_ids = position_ids[:, -1:] + 1
        total_s = time.perf_counter() - t0
        self.last_stats = GenerationStats(
            batch_size=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=len(steps),
            prefill_s=prefill_s,
            decode_s=total_s - prefill_s,
        )

        tokens = np.stack(steps, axis=1) if steps else np.zeros((batch, 0), dtype=np.int64)
        out: list[list[int]] = []
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            out.append(row[:cut])
        return out

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
        """Greedy completions (new text only, special tokens stripped), one per prompt."""
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if self.last_stats is not None:
            s = self.last_stats
            log.debug(
                "generated batch=%d prompt=%d new=%d in %.3fs (prefill %.3fs)",
                s.batch_size, s.prompt_tokens, s.new_tokens, s.total_s, s.prefill_s,
            )
        return texts
