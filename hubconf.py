"""torch.hub entry points: ``torch.hub.load("<owner>/naclip" or a local checkout, "naclip", ...)``.

``naclip(model_name="ViT-B-16", pretrained="openai", **kw)`` (``model_name``, not ``model``: that is
``torch.hub.load``'s own second parameter) returns a :class:`naclip.Segmenter` built by
:meth:`naclip.Segmenter.from_pretrained` (``pretrained=None`` gives random weights; ``checkpoint=``,
``device=``, ``dtype=``, ``method=``, ``config=`` ... as there). Weights come from open_clip's cache /
download, or a local checkpoint; offline without them it raises :class:`naclip.hub.WeightsUnavailableError`.
"""

dependencies = ["torch", "open_clip", "numpy", "PIL", "safetensors"]


def naclip(model_name: str = "ViT-B-16", pretrained: str | None = "openai", **kwargs):
    """NACLIP open-vocabulary segmenter on an open_clip ViT (see :meth:`naclip.Segmenter.from_pretrained`)."""
    from naclip import Segmenter

    return Segmenter.from_pretrained(model_name, pretrained, **kwargs)
