"""ONNX Runtime inference for the student model: batched decoding with a KV cache.

Decoding is written directly against ``onnxruntime.InferenceSession`` (not
ORTModelForCausalLM / ``generate``) so a decode step is one ``run`` plus a few numpy ops.
The KV cache stays in OrtValues bound through IOBinding, so on CUDA it never leaves the GPU.

One decode loop serves both modes; only the per-step token choice differs:
``generate``/``generate_ids`` pick the argmax (greedy), ``sample`` draws N completions per
prompt with temperature and nucleus (top-p) sampling, e.g. for best-of-N reranking.
Sampling uses one seeded RNG per output row, so results depend on ``seed`` but not on how
rows are split into ONNX batches.

Greedy decoding can draft by prompt lookup (``PromptLookup``): the last few tokens of a row
are matched against its prompt and earlier output, the tokens that followed the match are
fed after the row's last token in the same forward pass, and the longest prefix that greedy
would have picked is kept, plus greedy's own next token. Rejected drafts stay in the KV
cache as masked columns (the attention mask rolls them back, like left padding), so the
output is the plain greedy output. Rows draft independently; a row without a match feeds
padding. With ``max_queries`` a row stops at the newline after its list holds that many
queries (``models.prompt.parse_queries``); the others go on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.manifest import Manifest, read_manifest, verify_manifest
from models.prompt import parse_queries

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
IM_END = "<|im_end|>"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# ONNX metadata written by models.export: how many last positions the graph returns logits for.
LOGITS_WINDOW_KEY = "newsrec.logits_window"

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class GenerationStats:
    """Timing of the last ``generate``/``sample`` call (prefill = first step incl. the prompt).

    A call may run several ONNX batches (``batch_size``): then sizes are the
    largest batch's and steps/seconds are summed over batches, so ``total_s`` is the call's time.
    """

    batch_size: int  # rows per ONNX batch (largest)
    prompt_tokens: int  # padded prompt length (longest)
    new_tokens: int  # forward passes run, prefill included (summed over batches)
    prefill_s: float
    decode_s: float
    batches: int = 1  # ONNX batches run
    drafted: int = 0  # prompt-lookup tokens fed for verification
    accepted: int = 0  # of those, kept (each one saves a forward pass for its row)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @classmethod
    def combine(cls, batches: Sequence[GenerationStats]) -> GenerationStats:
        """One call's stats from its ONNX batches' (sizes: the largest; counts and times: summed)."""
        return cls(batch_size=max(s.batch_size for s in batches), prompt_tokens=max(s.prompt_tokens for s in batches),
                   new_tokens=sum(s.new_tokens for s in batches), prefill_s=sum(s.prefill_s for s in batches),
                   decode_s=sum(s.decode_s for s in batches), batches=len(batches),
                   drafted=sum(s.drafted for s in batches), accepted=sum(s.accepted for s in batches))


# Picks the next token id per row from last-position logits: (batch, vocab) -> (batch,).
TokenChooser = Callable[[np.ndarray], np.ndarray]


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")


def _greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


class _Sampler:
    """Temperature + nucleus sampling with one RNG per row.

    Each row draws exactly one uniform per step from its own Generator, so a row's tokens
    depend only on its seed and its own logits, not on which other rows share the batch.
    """

    def __init__(self, rngs: Sequence[np.random.Generator], *, temperature: float, top_p: float) -> None:
        self.rngs = list(rngs)
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # float64: a float32 cumsum over a ~50k vocab drifts by ~1e-4, enough to bias the
        # inverse-CDF draw and the top-p cut; logits are cast before dividing by temperature.
        scaled = logits.astype(np.float64) / self.temperature
        scaled -= scaled.max(axis=-1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(axis=-1, keepdims=True)
        if self.top_p < 1.0:
            probs = self._nucleus(probs)
        # Inverse-CDF draw in vocab order; filtered tokens have zero mass and can never be hit.
        cum = np.cumsum(probs, axis=-1)
        target = np.array([rng.random() for rng in self.rngs])[:, None] * cum[:, -1:]
        first_above = (cum <= target).sum(axis=-1)  # cum is sorted: first index with cum > target
        # If rounding puts target at the total, nothing exceeds it: cap at the last token with
        # mass (the first index reaching the total) instead of running off the vocab.
        last_with_mass = np.argmax(cum >= cum[:, -1:], axis=-1)
        return np.minimum(first_above, last_with_mass)

    def _nucleus(self, probs: np.ndarray) -> np.ndarray:
        # Keep a token iff the mass of strictly more likely tokens is still < top_p: the
        # smallest prefix reaching top_p, and always the top token (its prefix mass is 0).
        order = np.argsort(-probs, axis=-1, kind="stable")  # stable: ties resolve like argmax
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, mass_before < self.top_p, axis=-1)
        return np.where(keep, probs, 0.0)


@dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup drafting: match the last ``max_ngram``..``min_ngram`` tokens, draft what followed."""

    max_ngram: int = 3
    min_ngram: int = 2
    draft_tokens: int = 4  # at most; the export's logits window caps it (window - 1)


def draft_by_lookup(context: Sequence[int], lookup: PromptLookup, limit: int) -> list[int]:
    """Up to ``limit`` tokens that followed the latest earlier occurrence of the context's tail."""
    if limit <= 0:
        return []
    seq = np.asarray(context, dtype=np.int64)
    for n in range(min(lookup.max_ngram, len(seq) - 1), lookup.min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # excludes the tail itself
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start : start + limit].tolist()
    return []


def stop_token_ids(tokenizer: Any, model_dir: Path) -> frozenset[int]:
    """Ids that end a completion: the tokenizer's eos, ``<|im_end|>`` and generation_config's eos."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if not ids:
        raise ValueError(f"{model_dir}: tokenizer has no eos token")
    return frozenset(ids)


def _session_options(intra_op_threads: int | None, memory_arena: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # The CPU arena grows in doubling steps to the largest shapes seen and never shrinks:
    # fastest for one-shot jobs, a ratchet for a long-running worker (see WorkerSettings).
    opts.enable_cpu_mem_arena = memory_arena
    opts.enable_mem_pattern = memory_arena
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
        memory_arena: bool = True,
        prompt_lookup: PromptLookup | None = None,
        max_queries: int | None = None,
    ) -> None:
        """``prompt_lookup``: draft greedy tokens from the prompt (None: plain decoding);
        ``max_queries``: stop a row once its list holds that many queries (None: no early stop)."""

        from transformers import AutoTokenizer  # heavy: keep it off module import

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
        self.eos_ids = stop_token_ids(self.tokenizer, self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

        self.session = _create_session(self.model_dir / MODEL_FILE, providers, _session_options(intra_op_threads, memory_arena))
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
        # Positions a pass returns logits for (None: all). Our exporter keeps the last few (its
        # metadata says how many; bootstrap-2 era exports: a static 1); foreign exports keep all.
        window = self.session.get_modelmeta().custom_metadata_map.get(LOGITS_WINDOW_KEY)
        self._logits_window: int | None = 1 if logits_meta.shape[1] == 1 else int(window) if window else None
        self._logits_dtype = _ORT_DTYPES[logits_meta.type]
        if prompt_lookup is not None and self._logits_window is not None and self._logits_window < 2:
            log.warning("%s returns one logits position: prompt lookup needs a re-export; decoding plainly",
                        self.model_dir)
            prompt_lookup = None
        self.prompt_lookup = prompt_lookup
        self.max_queries = max_queries
        self._newline_ids: dict[int, bool] = {}
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

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,  # type: ignore[no-untyped-def]
             past: dict[str, Any], last: int = 1):
        """One forward pass; returns (logits of the ``last`` positions (batch, last, vocab), present
        cache as OrtValues)."""
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
            positions = min(input_ids.shape[1], self._logits_window or input_ids.shape[1])
            logits_buf = np.empty((input_ids.shape[0], positions, self._vocab), dtype=self._logits_dtype)
            binding.bind_output("logits", "cpu", 0, logits_buf.dtype, logits_buf.shape, logits_buf.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        for name in self._present_to_past:
            binding.bind_output(name, self._device)  # cache stays on the device
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self._output_names, binding.get_outputs(), strict=True))
        all_logits = logits_buf if isinstance(self._vocab, int) else outputs["logits"].numpy()
        logits = np.array(all_logits[:, -last:, :])  # own copy of just these, so the big buffer can go
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
        return logits[:, -1, :]

    def _prefill_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The prefill of a left-padded batch, one row at a time: (last-position logits
        (batch, 1, vocab), the batch's cache left-padded to the longest prompt).

        On a CPU the cost of a pass is the positions it computes, and a padded batch computes
        every row at the longest prompt's length (worker prompts: 65-397 tokens, 58% padding
        in a batch of 8). The pad slots of the cache stay zero and masked, as a padded pass
        leaves them (masked), so the decode loop after it is unchanged. A row that repeats an
        earlier one (best-of-N sampling feeds each prompt N times) copies its logits and cache."""
        batch, width = input_ids.shape
        heads, head_dim = self._past_shape
        past = {name: np.zeros((batch, heads, width, head_dim), dtype=self._past_dtype) for name in self._past_names}
        logits = []
        first_row: dict[bytes, int] = {}  # a row's real tokens -> the row that computed them
        for r, n in enumerate(attention_mask.sum(axis=1).tolist()):
            ids = input_ids[r : r + 1, width - n :]
            same = first_row.setdefault(ids.tobytes(), r)
            if same != r:
                logits.append(logits[same])
                for value in past.values():
                    value[r] = value[same]
                continue
            row_logits, present = self._run(ids, np.ones_like(ids), np.arange(n, dtype=np.int64)[None, :],
                                            self._empty_past(1))
            logits.append(row_logits[:, -1:])
            for name, value in present.items():
                past[name][r, :, width - n :] = value.numpy()[0]
        return np.concatenate(logits), past

    def _ends_list(self, token: int, ids: list[int]) -> bool:
        """True when ``token`` (just appended to ``ids``) ends the ``max_queries``-th query's line."""
        if token not in self._newline_ids:
            self._newline_ids[token] = "\n" in self.tokenizer.decode([token])
        if not self._newline_ids[token] or self.max_queries is None:
            return False
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return len(parse_queries(text[: text.rfind("\n")], max_queries=self.max_queries)) >= self.max_queries

    def _decode(
        self, prompts: Sequence[str], *, max_new_tokens: int, choose: TokenChooser, lookup: PromptLookup | None = None
    ) -> tuple[list[list[int]], GenerationStats]:
        """The shared KV-cache decode loop over one ONNX batch; ``choose`` picks each step's tokens.

        ``lookup`` (greedy only) drafts tokens that one pass verifies. Returns new token ids per
        prompt (eos excluded) and this batch's stats.
        """
        batch = len(prompts)
        input_ids, attention_mask = self._encode(prompts)
        prompt_tokens = int(input_ids.shape[1])
        contexts = [row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        # Left padding: positions count real tokens only; pads get 0 (they are masked anyway).
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        next_pos = attention_mask.sum(axis=1)  # each row's next position = its real tokens so far
        past: dict[str, Any] = self._empty_past(batch)
        out: list[list[int]] = [[] for _ in range(batch)]
        drafts: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        max_draft = min(lookup.draft_tokens, (self._logits_window or max_new_tokens) - 1) if lookup else 0
        passes = drafted = accepted = 0

        t0 = time.perf_counter()
        prefill_s = 0.0
        while True:
            width = input_ids.shape[1] if passes else 1  # the prefill verifies nothing
            if passes == 0 and self._device == "cpu" and batch > 1:
                logits, past = self._prefill_rows(input_ids, attention_mask)
            else:
                logits, past = self._run(input_ids, attention_mask, position_ids, past, last=width)
            passes += 1
            if passes == 1:
                prefill_s = time.perf_counter() - t0
            # (batch, width): greedy's pick after each fed token; a sampler sees only the last.
            picks = logits.argmax(axis=-1) if width > 1 else choose(logits[:, -1])[:, None]
            keep = np.zeros((batch, width), dtype=np.int64)  # fed columns that stay in the cache
            for r in np.flatnonzero(~done):
                draft = drafts[r]
                agree = 0
                while agree < len(draft) and draft[agree] == picks[r, agree]:
                    agree += 1
                keep[r, : agree + 1] = 1
                drafted, accepted = drafted + len(draft), accepted + agree
                for token in [*draft[:agree], int(picks[r, agree])]:
                    if token in self.eos_ids:
                        done[r] = True
                        break
                    out[r].append(token)
                    contexts[r].append(token)
                    if len(out[r]) >= max_new_tokens or self._ends_list(token, out[r]):
                        done[r] = True
                        break
            if passes > 1:  # the fed last token and accepted drafts are in the cache now
                next_pos += keep.sum(axis=1)
                attention_mask[:, -width:] = keep  # roll back rejected drafts and padding: mask them
            if done.all():
                break
            # Next pass: each row's last token, then its draft; rows with shorter drafts pad.
            drafts = [[] if done[r] else draft_by_lookup(contexts[r], lookup, min(max_draft, max_new_tokens - len(out[r]) - 1))
                      for r in range(batch)] if lookup else drafts
            width = 1 + max(map(len, drafts))
            input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)
            fed = np.zeros((batch, width), dtype=np.int64)
            for r in np.flatnonzero(~done):
                row = [contexts[r][-1], *drafts[r]]
                input_ids[r, : len(row)] = row
                fed[r, : len(row)] = 1
            attention_mask = np.concatenate([attention_mask, fed], axis=1)
            position_ids = next_pos[:, None] + np.arange(width)
        total_s = time.perf_counter() - t0
        stats = GenerationStats(
            batch_size=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=passes,
            prefill_s=prefill_s,
            decode_s=total_s - prefill_s,
            drafted=drafted,
            accepted=accepted,
        )
        return out, stats

    def _decode_in_batches(self, rows: Sequence[str], batch_size: int | None, *, max_new_tokens: int,
                           chooser: Callable[[int, int], TokenChooser],
                           lookup: PromptLookup | None = None) -> list[list[int]]:
        """``_decode`` over ONNX batches of at most ``batch_size`` rows (None: one batch), with
        ``chooser(start, stop)`` the token chooser of rows[start:stop]; sets ``last_stats``."""
        size = batch_size or len(rows)
        ids: list[list[int]] = []
        all_stats: list[GenerationStats] = []
        for start in range(0, len(rows), size):
            stop = start + size
            batch_ids, stats = self._decode(rows[start:stop], max_new_tokens=max_new_tokens,
                                            choose=chooser(start, stop), lookup=lookup)
            ids.extend(batch_ids)
            all_stats.append(stats)
        self.last_stats = GenerationStats.combine(all_stats)
        return ids

    def generate_ids(self, prompts: Sequence[str], *, max_new_tokens: int = 48,
                     batch_size: int | None = None) -> list[list[int]]:
        """Greedy new token ids per prompt, eos excluded, in ONNX batches of at most
        ``batch_size`` prompts (default: one batch; each row's KV cache is held for the batch)."""
        _check_batch_size(batch_size)
        if not prompts:
            return []
        return self._decode_in_batches(prompts, batch_size, max_new_tokens=max_new_tokens,
                                       chooser=lambda start, stop: _greedy, lookup=self.prompt_lookup)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int | None = None) -> list[str]:
        """Greedy completions (new text only, special tokens stripped), one per prompt."""
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        self._log_stats("generated")
        return texts

    def sample_ids(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> list[list[list[int]]]:
        """``n`` sampled new-token-id lists per prompt (eos excluded); see ``sample``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not 0 < top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        _check_batch_size(batch_size)
        if not prompts:
            return []

        # Row r is copy r % n of prompt r // n; its RNG is child r of the seed, so a row's
        # draws are the same whatever batch it lands in.
        rows = [prompt for prompt in prompts for _ in range(n)]
        rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(len(rows))]
        ids = self._decode_in_batches(
            rows, batch_size, max_new_tokens=max_new_tokens,
            chooser=lambda start, stop: _Sampler(rngs[start:stop], temperature=temperature, top_p=top_p))
        return [ids[i : i + n] for i in range(0, len(ids), n)]

    def sample(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """``n`` sampled completions per prompt: ``out[i]`` holds the ``n`` texts for ``prompts[i]``.

        Tokens are drawn from softmax(logits / temperature) restricted to the nucleus (the
        smallest set of most likely tokens with mass >= ``top_p``). The same ``seed`` gives the
        same outputs (``None``: fresh entropy). The ``n * len(prompts)`` rows run in ONNX
        batches of at most ``batch_size`` rows (default: one batch); each row has its own RNG,
        so batching does not change the draws (only float noise from different padding). Raises ValueError for n < 1, temperature <= 0 or top_p outside (0, 1].
        """
        ids = self.sample_ids(
            prompts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
        )
        texts = [self.tokenizer.batch_decode(group, skip_special_tokens=True) for group in ids]
        self._log_stats(f"sampled n={n}")
        return texts

    def _log_stats(self, what: str) -> None:
        if self.last_stats is not None:
            s = self.last_stats
            log.debug(
                "%s batch=%d prompt=%d new=%d batches=%d in %.3fs (prefill %.3fs)",
                what, s.batch_size, s.prompt_tokens, s.new_tokens, s.batches, s.total_s, s.prefill_s,
            )
