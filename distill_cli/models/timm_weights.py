"""Where a timm model's weights come from: the Hugging Face cache, or a local file.

    distill-cli pretrain model=timm model.arch=resnet18d model.weights=pretrained
    distill-cli pretrain model=timm model.arch=resnet18d model.weights=/data/resnet18d.safetensors

``pretrained`` reads timm's published weights from the local Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and downloads them
only when they are not there and ``HF_HUB_OFFLINE`` is unset. A path reads a local checkpoint:
safetensors, or a PyTorch state_dict (also wrapped in ``state_dict`` or ``model``, as timm's
training scripts save it). Every failure is one line that names the fix.
"""

from __future__ import annotations

import hashlib
import os

from torch import Tensor

WEIGHTS_HINT = "model.weights=/path/to/file.safetensors (or a .pth state_dict)"


def one_line(err: BaseException) -> str:
    """An exception as one short line: its type and its message, whitespace folded."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]


def backbone_state(arch: str, cfg: dict, weights: str) -> tuple[str, dict[str, Tensor]]:
    """The file ``weights`` names for ``arch`` and its state_dict without timm's classifier.

    Args:
        arch: The timm model name.
        cfg: The model's ``pretrained_cfg`` (hub id, classifier names).
        weights: ``"pretrained"`` or a path.

    Raises:
        ValueError: One line, if the file cannot be found, fetched or read.
    """
    path = hub_file(arch, cfg) if weights == "pretrained" else weights
    state = read_state(path)
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    drop = {f"{c}.{p}" for c in classifier for p in ("weight", "bias")}
    return path, {k: v for k, v in state.items() if k not in drop}  # our head replaces it


def _hub_cache() -> str:
    """The Hugging Face hub cache, read from the environment now (tests point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def _unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it may be.

    A quick check that spares the hub client's five retries with back-off (about 23 s per file)
    on a machine without network.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT")):
        return None  # the check would not see the route the client takes
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        return f"huggingface.co is unreachable: {one_line(err)}"
    return None


def hub_file(arch: str, cfg: dict) -> str:
    """The file of timm's published weights for ``arch``: from the local cache, else downloaded."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise ValueError(
            f"timm publishes no Hugging Face weights for {arch}; pass {WEIGHTS_HINT}, or "
            "model.weights=null for random initialisation"
        )
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = repo.split("@")[0]
    cache = _hub_cache()
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
        "model.safetensors", "pytorch_model.bin"]  # fmt: skip
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str):
            return found
    why = "HF_HUB_OFFLINE is set" if _offline() else _unreachable()
    for name in names if why is None else ():
        try:
            return hf_hub_download(repo, name, cache_dir=cache)
        except Exception as err:  # no such file (the next name), or the network failed
            why = one_line(err)
            if "EntryNotFound" not in type(err).__name__:
                break
    raise ValueError(
        f"model.weights=pretrained: timm's {arch} weights ({repo}) are not in the Hugging Face "
        f'cache {cache} and could not be downloaded ({why}); run `python -c "import timm; '
        f"timm.create_model('{arch}', pretrained=True)\"` where there is internet and copy the "
        f"cache here (or set HF_HOME), or pass {WEIGHTS_HINT}"
    )


def read_state(path: str) -> dict[str, Tensor]:
    """A state_dict from a safetensors or PyTorch file, unwrapped as timm does."""
    if not os.path.isfile(path):
        raise ValueError(f"model.weights file not found: {path}")
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=False)
    except Exception as err:  # truncated, not a checkpoint, unsafe pickle
        raise ValueError(f"model.weights {path}: cannot be read ({one_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"model.weights {path}: holds no state_dict of tensors")
    return state


def sha256_file(path: str) -> str:
    """The sha256 of a file, read in 1 MiB blocks: the lineage records which weights loaded."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(err: RuntimeError, arch: str, path: str) -> ValueError:
    """One line for a state_dict that does not load: the first size or key complaint."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    shape = next((line for line in lines if line.startswith("size mismatch")), None)
    detail = (shape or (lines[0] if lines else str(err))).replace("torch.Size", "")[:220]
    what = "its shapes do not match" if shape else "its keys do not match"
    return ValueError(
        f"model.weights {path}: {what} timm's {arch} with these model.kwargs and "
        f"{'this' if shape else 'the'} input ({detail}); pass weights saved from the same "
        "architecture and kwargs, or model.weights=null"
    )
