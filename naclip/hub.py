"""Loading open_clip CLIP ViTs (pretrained tags, local checkpoints, random init) with one clear offline error.

:func:`load_clip` is the only entry point. Weights come from, in this order:

1. ``checkpoint=PATH`` (the CLI's ``--checkpoint PATH``), else the ``NACLIP_CHECKPOINT`` environment
   variable (ignored when ``pretrained=None``), else ``pretrained`` itself if it names an existing file:
   an open_clip state dict (``.safetensors`` / ``.bin`` / ``.pt``, optionally wrapped in
   ``{"state_dict": ...}`` and/or prefixed ``module.``), an OpenAI-format CLIP state dict (same key
   names), or OpenAI's TorchScript release file (e.g. ``ViT-B-16.pt``). The architecture is ``model``.
2. ``pretrained=TAG`` (e.g. ``"openai"``, ``"laion2b_s34b_b88k"``, ``"metaclip_fullcc"``): open_clip's
   download into the Hugging Face hub cache (or ``~/.cache/clip`` for URL-only tags). Offline
   (``HF_HUB_OFFLINE=1``) only the cache is consulted, so a missing file fails at once. Without that
   variable, one bounded TCP probe of the download host (:data:`PROBE_TIMEOUT_S` seconds, through
   ``HTTPS_PROXY`` when set) runs first; an unreachable host is treated like ``HF_HUB_OFFLINE=1`` (cache
   only, no retries).
3. ``pretrained=None``: random initialisation, nothing is downloaded.

Activation: OpenAI and MetaCLIP weights were trained with QuickGELU; it is enabled when the tag's open_clip
entry says so (also for a local checkpoint loaded with that tag, e.g. ``load_clip("ViT-B-16", "openai",
checkpoint="ViT-B-16.pt")``), for TorchScript files (OpenAI's), or by a ``*-quickgelu`` model name.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
import socket
import threading
import urllib.parse
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer

from naclip.precision import dtype_name

__all__ = ["CHECKPOINT_ENV", "PROBE_TIMEOUT_S", "WeightsUnavailableError", "load_clip", "vit_patch_size"]

#: Environment variable naming a local checkpoint file (used when ``checkpoint`` is not given).
CHECKPOINT_ENV = "NACLIP_CHECKPOINT"

#: Seconds the one connectivity probe of a download host may take (DNS lookup included) before the host
#: counts as unreachable.
PROBE_TIMEOUT_S = 3.0

_COMMON_VITS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-B-16-quickgelu")
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found in the cache nor downloaded.

    Attributes: ``model``, ``pretrained`` (tag), ``cache_dirs`` (where the files were looked for).
    """

    def __init__(
        self, message: str, *, model: str, pretrained: str | None, cache_dirs: tuple[str, ...]
    ) -> None:
        super().__init__(message)
        self.model = model
        self.pretrained = pretrained
        self.cache_dirs = cache_dirs


# ---------------------------------------------------------------------------------------------------- helpers
class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's root-logger warning 'No pretrained weights loaded ... initialized randomly'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init():
    # open_clip logs that warning when it builds the architecture; here the weights are loaded right after.
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _hf_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return env


def _hub_endpoint() -> str:
    """The Hugging Face endpoint huggingface_hub downloads from (``HF_ENDPOINT``, default huggingface.co)."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"


def _probe_target(url: str) -> tuple[str, int]:
    """``(host, port)`` a download of ``url`` first connects to: the HTTPS/HTTP proxy when one is set."""
    parts = urllib.parse.urlsplit(url)
    names = ("https_proxy", "HTTPS_PROXY") if parts.scheme == "https" else ("http_proxy", "HTTP_PROXY")
    proxy = next((os.environ[n] for n in (*names, "all_proxy", "ALL_PROXY") if os.environ.get(n)), "")
    if proxy:
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or "", parts.port or default


def _unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to the host of ``url`` (or its proxy) opens within ``timeout`` s,
    else why not. The lookup + connect run in a daemon thread, so a hanging DNS lookup is bounded too."""
    host, port = _probe_target(url)
    if not host:
        return f"no host in {url!r}"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(_short(exc))

    worker = threading.Thread(target=probe, name="naclip-network-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout:g} s"
    return None if outcome[0] is None else f"cannot connect to {host}:{port} ({outcome[0]})"


@contextlib.contextmanager
def _hf_offline_mode():
    """huggingface_hub's own offline mode for the block (cache only, no retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def _url_cache_dir(cache_dir: str | None) -> str:
    return str(cache_dir) if cache_dir else os.path.expanduser("~/.cache/clip")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_model_name(model: Any) -> str:
    if not isinstance(model, str):
        raise TypeError(
            f"model must be an open_clip model name string (e.g. 'ViT-B-16'); got {type(model).__name__}"
        )
    name = model.strip()
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    name = name.replace("/", "-")  # OpenAI spelling 'ViT-B/16'
    if open_clip.get_model_config(name) is not None:
        return name
    known = open_clip.list_models()
    by_lower = {m.lower(): m for m in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"model {model!r} is not an open_clip model name.{hint} Examples: {list(_COMMON_VITS)} "
        f"(open_clip.list_models() lists all {len(known)})."
    )


def _check_vit_config(name: str) -> None:
    cfg = open_clip.get_model_config(name)
    if cfg is None:  # schema names: checked after creation
        return
    vision = cfg.get("vision_cfg", {})
    what = None
    if vision.get("timm_model_name"):
        what = f"a timm image tower ({vision['timm_model_name']})"
    elif isinstance(vision.get("layers"), (list, tuple)):
        what = "a ModifiedResNet image tower"
    elif vision.get("attentional_pool"):
        what = "an attention-pooling (CoCa) image tower"
    if what is not None:
        raise ValueError(
            f"model {name!r} has {what}; NACLIP needs an open_clip CLIP ViT (VisionTransformer), e.g. "
            f"{list(_COMMON_VITS[:4])}"
        )


def vit_patch_size(model: str) -> int | None:
    """Patch size (pixels) of the open_clip ViT ``model`` from its config, without building it; ``None``
    when the config is not known locally (``hf-hub:`` / ``local-dir:`` names). Errors as ``load_clip``'s for
    an unknown or non-ViT name."""
    name = _resolve_model_name(model)
    if name.startswith(("hf-hub:", "local-dir:")):  # the config lives in the (maybe remote) repo
        return None
    _check_vit_config(name)
    cfg = open_clip.get_model_config(name)
    patch = None if cfg is None else cfg.get("vision_cfg", {}).get("patch_size")
    return int(patch) if isinstance(patch, int) and not isinstance(patch, bool) else None


def _resolve_precision(dtype: Any) -> str:
    """open_clip ``precision`` (``"fp32"``/``"fp16"``/``"bf16"``) via :func:`naclip.precision.dtype_name`,
    the one dtype parser (``TypeError`` for a non-str/dtype, ``ValueError`` for an unknown name)."""
    return dtype_name(dtype)


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(
            f"device must be a torch device or string like 'cpu', 'cuda:0'; got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``(state_dict, is_torchscript)`` of a checkpoint file; ``ValueError`` naming the file on failure."""
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            jit = True
            with (
                warnings.catch_warnings()
            ):  # torch's deprecation notice for jit.load: nothing a user can act on
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            with warnings.catch_warnings():  # torch's pickle-protocol notice: nothing a user can act on
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False, i.e. executing the file's code: never pass it on.
        raise ValueError(
            f"could not read checkpoint {str(path)!r}: it is corrupt or not a plain tensor state dict (it "
            "holds Python objects other than tensors, which naclip never unpickles because that could run "
            "code from the file). Expected an open_clip / OpenAI CLIP state dict (.safetensors, or .bin / "
            ".pt holding only tensors) or OpenAI's TorchScript file."
        ) from None
    except Exception as exc:
        raise ValueError(
            f"could not read checkpoint {str(path)!r}: {_short(exc)}. Expected an open_clip / OpenAI CLIP "
            "state dict (.safetensors, .bin, .pt saved with torch.save) or OpenAI's TorchScript file."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    for key in _JIT_EXTRA_KEYS:
        sd.pop(key, None)
    return sd, jit


def _describe_vit(sd: Mapping[str, torch.Tensor]) -> str:
    conv = sd.get("visual.conv1.weight")
    if conv is None or conv.ndim != 4:
        return "no CLIP ViT image tower found (no 'visual.conv1.weight')"
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    pe = sd.get("visual.positional_embedding")
    grid = f", {pe.shape[0] - 1} patch positions" if pe is not None else ""
    return f"a ViT with patch {conv.shape[-1]}, width {conv.shape[0]}, {layers} layers{grid}"


def _load_weights(model: torch.nn.Module, path: Path, name: str, source: str) -> None:
    sd, _ = _read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"checkpoint {str(path)!r} (from {source}) does not fit open_clip model {name!r}: "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
            f"{len(bad)} shape mismatches {bad[:3]}. The checkpoint looks like {_describe_vit(sd)}; pass the "
            "matching model name (e.g. model='ViT-B-32')."
        )
    model.load_state_dict(sd, strict=True)


def _tag_cfg(name: str, tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"pretrained={tag!r} is not a known open_clip tag for model {name!r} nor an existing file; "
            f"tags for {name!r}: {tags or 'none (use pretrained=None for random init, or checkpoint=PATH)'}"
        )
    return dict(cfg)


def _unavailable(
    name: str, tag: str | None, looked: list[str], dirs: tuple[str, ...], reason: str, offline: bool | str
):
    how = (
        "pass a local checkpoint: --checkpoint PATH on the command line, checkpoint=PATH in Python, or "
        f"the environment variable {CHECKPOINT_ENV}=PATH (an open_clip .safetensors/.bin/.pt state dict, "
        "or OpenAI's TorchScript file such as ViT-B-16.pt)"
    )
    if isinstance(offline, str):  # the probe's finding
        net = (
            f"No network: {offline}, so nothing is downloaded; run once with network access to fill the cache"
        )
    elif offline:
        net = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        net = "the download failed (no network access?); run once with network access to fill the cache"
    return WeightsUnavailableError(
        f"pretrained weights for model {name!r} (pretrained={tag!r}) are not available: {reason}. "
        f"Looked for {'; '.join(looked)}. {net}. To run without downloading, {how}.",
        model=name,
        pretrained=tag,
        cache_dirs=dirs,
    )


def _fetch_tag(name: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    """Local path of the tag's weights (cache or download); :class:`WeightsUnavailableError` otherwise."""
    if cfg.get("file"):
        return str(cfg["file"])
    env_offline = _hf_offline()
    offline: bool | str = env_offline  # str: the probe found no network (why)
    hf_spec, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    looked: list[str] = []
    dirs: list[str] = []
    reason = "not in the cache"
    if hf_spec:
        # open_clip's convention: 'org/repo/' -> default weight files, 'org/repo/file.bin' -> that file (a
        # .safetensors sibling of a .bin/.pth file is preferred).
        repo, filename = os.path.split(hf_spec)
        if not filename or filename == _HF_WEIGHT_FILES[1]:
            files = list(_HF_WEIGHT_FILES)
        elif filename.endswith((".bin", ".pth")):
            files = [filename[:-4] + ".safetensors", filename]
        else:
            files = [filename]
        hf_dir = _hf_cache_dir(cache_dir)
        dirs.append(hf_dir)
        looked.append(f"Hugging Face hub repo '{repo}' ({' or '.join(files)}) in the cache {hf_dir}")
        if not env_offline:
            offline = _unreachable(_hub_endpoint()) or False
        try:
            if offline:
                from huggingface_hub import try_to_load_from_cache

                for f in files:
                    hit = try_to_load_from_cache(repo, f, cache_dir=cache_dir)
                    if isinstance(hit, str) and os.path.isfile(hit):
                        return hit
            else:
                return str(open_clip.download_pretrained({"hf_hub": hf_spec}, cache_dir=cache_dir))
        except Exception as exc:
            reason = _short(exc)
    if url:
        url_dir = _url_cache_dir(cache_dir)
        dirs.append(url_dir)
        target = os.path.join(url_dir, os.path.basename(url))
        looked.append(f"{target} (download URL {url})")
        if not env_offline and not os.path.isfile(target):
            note = _unreachable(url)
            offline = f"{offline}; {note}" if isinstance(offline, str) and note else (note or False)
        if os.path.isfile(target) or not offline:
            try:
                return str(open_clip.download_pretrained_from_url(url, cache_dir=cache_dir))
            except Exception as exc:
                reason = _short(exc)
    raise _unavailable(name, tag, looked, tuple(dirs), reason, offline) from None


# ---------------------------------------------------------------------------------------------------- public
def load_clip(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Create an open_clip CLIP ViT in eval mode and its tokenizer.

    Args:
        model: open_clip model name (``"ViT-B-16"``, ``"ViT-B-32"``, ``"ViT-L-14"``,
            ``"ViT-B-16-quickgelu"``, ...; the OpenAI spelling ``"ViT-B/16"`` is accepted), or an
            ``hf-hub:org/repo`` / ``local-dir:PATH`` name. Non-ViT image towers (timm, ModifiedResNet,
            CoCa attention pooling) raise ``ValueError``.
        pretrained: open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``, ``"metaclip_fullcc"``, ...), a
            file path, or ``None`` for random init (no download, ``NACLIP_CHECKPOINT`` ignored).
        device: ``None`` -> ``"cuda"`` if available else ``"cpu"``.
        dtype: ``None`` / ``"fp32"`` (default), ``"fp16"`` or ``"bf16"`` (or the torch dtypes): open_clip's
            mixed precision as in OpenAI CLIP (linear/conv weights in low precision, LayerNorm in fp32).
        checkpoint: local weights file (see the module docstring); default ``$NACLIP_CHECKPOINT``.
        cache_dir: download cache (default: the Hugging Face hub cache, ``~/.cache/clip`` for URL
            downloads).

    Returns:
        ``(clip_model, tokenizer)``: an ``open_clip.CLIP`` in eval mode on ``device`` and
        ``open_clip.get_tokenizer(model)``.

    Raises:
        WeightsUnavailableError: weights neither cached nor downloadable (offline); the message names the
            model, tag, cache location and how to pass a local checkpoint.
        ValueError / TypeError: unknown model name or tag, non-ViT model, bad device/dtype, a checkpoint
            that does not fit ``model``. FileNotFoundError: a checkpoint path that does not exist.
    """
    name = _resolve_model_name(model)
    _check_vit_config(name)
    dev = _resolve_device(device)
    precision = _resolve_precision(dtype)
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be a tag string, a file path or None; got {type(pretrained).__name__}"
        )
    cache = None if cache_dir is None else os.fspath(cache_dir)

    source = "the checkpoint argument"
    if checkpoint is None and pretrained is not None and os.environ.get(CHECKPOINT_ENV, "").strip():
        checkpoint, source = os.environ[CHECKPOINT_ENV].strip(), f"${CHECKPOINT_ENV}"
    tag: str | None = None if pretrained is None else os.fspath(pretrained)
    if checkpoint is None and tag is not None and os.path.isfile(tag):
        checkpoint, tag, source = tag, None, "the pretrained argument"

    if name.startswith(("hf-hub:", "local-dir:")):
        if checkpoint is not None:
            raise ValueError(f"checkpoint cannot be combined with the schema model name {name!r}")
        clip = _create_schema_model(name, precision=precision, device=dev, cache=cache)
    else:
        clip = _create_named_model(
            name, tag, checkpoint, source=source, precision=precision, device=dev, cache=cache
        )
    if not isinstance(getattr(clip, "visual", None), VisionTransformer):
        raise ValueError(
            f"model {name!r} has a {type(getattr(clip, 'visual', None)).__name__} image tower; NACLIP "
            "needs an open_clip VisionTransformer (CLIP ViT)"
        )
    return clip.eval(), _load_tokenizer(name, tag, cache)


def _create_schema_model(name: str, *, precision: str, device, cache: str | None):
    """An ``hf-hub:`` / ``local-dir:`` model through open_clip (offline mode when the hub is unreachable);
    hub failures become :class:`WeightsUnavailableError`, others ``ValueError``."""
    offline: bool | str = _hf_offline()
    if not offline and name.startswith("hf-hub:"):
        offline = _unreachable(_hub_endpoint()) or False
    try:
        with _hf_offline_mode() if isinstance(offline, str) else contextlib.nullcontext():
            return open_clip.create_model(name, precision=precision, device=device, cache_dir=cache)
    except Exception as exc:
        if name.startswith("hf-hub:"):
            raise _unavailable(
                name, None, [f"{name} in {_hf_cache_dir(cache)}"], (_hf_cache_dir(cache),), _short(exc),
                offline,
            ) from None  # fmt: skip
        raise ValueError(f"could not create open_clip model {name!r}: {_short(exc)}") from None


def _create_named_model(
    name: str, tag: str | None, checkpoint, *, source: str, precision: str, device, cache: str | None
):
    """A built-in open_clip model with random init, then the weights of ``checkpoint`` (from ``source``) or
    of the fetched ``tag`` (none when both are ``None``)."""
    ckpt_path: Path | None = None
    quick_gelu = False
    if checkpoint is not None:
        ckpt_path = Path(os.fspath(checkpoint)).expanduser()
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(ckpt_path)!r} (from {source}) does not exist")
        if tag is not None and open_clip.get_pretrained_cfg(name, tag):
            quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
        quick_gelu = quick_gelu or _is_torchscript(ckpt_path)
    elif tag is not None:
        tag_cfg = _tag_cfg(name, tag)
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        ckpt_path = Path(_fetch_tag(name, tag, tag_cfg, cache))
        source = f"pretrained={tag!r}"
    with _quiet_random_init() if ckpt_path is not None else contextlib.nullcontext():
        clip = open_clip.create_model(
            name,
            pretrained=None,
            precision=precision,
            device=device,
            force_quick_gelu=quick_gelu,
            pretrained_image=False,
            pretrained_text=False,
        )
    if ckpt_path is not None:
        _load_weights(clip, ckpt_path, name, source)
    return clip


def _load_tokenizer(name: str, tag: str | None, cache: str | None):
    """``open_clip.get_tokenizer(name)``; a failure (offline, not cached) is a
    :class:`WeightsUnavailableError`."""
    try:
        return open_clip.get_tokenizer(name, cache_dir=cache)
    except Exception as exc:
        raise _unavailable(
            name,
            tag,
            [f"the tokenizer of {name!r} in {_hf_cache_dir(cache)}"],
            (_hf_cache_dir(cache),),
            _short(exc),
            _hf_offline(),
        ) from None
