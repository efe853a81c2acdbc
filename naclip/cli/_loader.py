"""The one model loader of the ``naclip`` subcommands (segment and its videos, eval, demo).

:func:`model_options` turns the :func:`naclip.cli._args.add_model_arguments` flags into keyword arguments
(library defaults for the unset ones); :func:`load_segmenter` checks ``--checkpoint`` and builds the
:class:`naclip.Segmenter`, turning a bad name, tag, device, dtype or method and missing weights into a
:class:`naclip.cli._args.UserError`; :func:`register_model_config` handles ``--model-config``.
"""

from __future__ import annotations

from pathlib import Path

from naclip.cli._args import FROM_PRETRAINED, UserError


def register_model_config(path: str | None) -> None:
    """``--model-config JSON``: register it with open_clip (its file stem becomes a model name)."""
    if path:
        cfg = Path(path)
        if not cfg.is_file():
            raise UserError(f"--model-config {path!r} does not exist")
        import open_clip

        open_clip.add_model_config(cfg)


def model_options(args) -> dict:
    """``--model``, ``--pretrained``, ``--method``, ``--checkpoint``, ``--device``, ``--dtype``,
    ``--backend``, ``--no-text-cache`` as :func:`load_segmenter` keywords; unset ones get the defaults of
    :meth:`naclip.Segmenter.from_pretrained` (device, dtype and backend stay ``None`` = the library's
    choice)."""
    return {
        "model": args.model or FROM_PRETRAINED["model"],
        "pretrained": args.pretrained if args.pretrained is not None else FROM_PRETRAINED["pretrained"],
        "method": args.method or FROM_PRETRAINED["method"],
        "checkpoint": args.checkpoint,
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
        "text_cache": not args.no_text_cache,
    }


def load_segmenter(
    *, model: str, pretrained: str | None, method: str, checkpoint: str | None, device, dtype,
    backend: str | None, text_cache: bool, config=None, gaussian_std: float | None = None,
):  # fmt: skip
    """:meth:`naclip.Segmenter.from_pretrained` for the CLI: ``pretrained`` ``"none"`` / ``""`` = random
    weights; ``backend=None`` = ``$NACLIP_ATTN_BACKEND``, else auto (an explicit value wins);
    ``text_cache=False`` = no on-disk text-feature cache; ``gaussian_std`` is passed only when given.
    ``UserError`` for a missing checkpoint file, unavailable weights (offline) and the ValueError /
    TypeError / FileNotFoundError of a bad model name, tag, device, dtype or method."""
    from naclip.hub import WeightsUnavailableError
    from naclip.segmenter import Segmenter

    pretrained = None if str(pretrained).lower() in ("none", "") else pretrained
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint!r} does not exist")
    extra = {} if gaussian_std is None else {"gaussian_std": gaussian_std}
    try:
        return Segmenter.from_pretrained(
            model, pretrained, device=device, dtype=dtype, method=method, checkpoint=checkpoint,
            backend=backend, config=config, text_cache=None if text_cache else False, **extra,
        )  # fmt: skip
    except WeightsUnavailableError as exc:
        raise UserError(str(exc)) from None
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad model name, tag, device, dtype, method
        raise UserError(str(exc)) from None
