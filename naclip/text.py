"""Class lists, synonyms, prompt templates and the CLIP text classifier.

* **Classes** (:func:`parse_classes`): a list of strings, one per class, or one string with classes separated
  by ``";"``. Within a class, synonyms are separated by ``", "`` (comma + space, as the official
  ``get_cls_idx``; a comma without a following space is part of the name: ``"a,b"`` is one query); every
  synonym is stripped of surrounding whitespace and becomes its own text query whose class id is the class's
  index. The display name of a class is its first synonym. Empty lists, empty synonyms and duplicate class
  names (after stripping) raise ``ValueError``.
* **Templates**: the 80 OpenAI ImageNet prompt templates (``open_clip.OPENAI_IMAGENET_TEMPLATES``, e.g.
  ``"a bad photo of a {c}."``), identical in content and order to the official
  ``prompts/imagenet_template.py``. :func:`load_templates` reads another set (a built-in name of
  :data:`TEMPLATE_SETS` or a file); other templates give other features.
* **Classifier** (:func:`encode_queries`): per query, tokenize its 80 prompts -> ``encode_text`` ->
  L2-normalise each embedding -> mean over the templates -> L2-normalise again. Result ``[Q, D]`` (unit rows,
  no logit scale). Causal open_clip text towers run only up to each batch's pooled (EOT) token, exactly
  (:mod:`naclip.text_tower`); identical queries/prompts are encoded once. An optional ``progress(done,
  total)`` callback is called after each chunk of queries. The library never prints.
* **Cache** (:class:`TextFeatureCache`): in-memory LRU keyed by (model id, dtype, device, templates, queries);
  the persistent on-disk cache is :mod:`naclip.text_cache`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from naclip._validate import check_positive_int
from naclip.text_tower import TextEncoder

__all__ = [
    "TEMPLATES",
    "TEMPLATE_SETS",
    "load_templates",
    "ClassSpec",
    "parse_classes",
    "prompts_for",
    "encode_queries",
    "text_encoding_path",
    "TextFeatureCache",
]

#: The 80 OpenAI ImageNet templates as format strings with ``{c}`` (from open_clip, verified count 80).
TEMPLATES: tuple[str, ...] = tuple(t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
if len(TEMPLATES) != 80:  # pragma: no cover - guards against an open_clip change
    raise ImportError(f"open_clip.OPENAI_IMAGENET_TEMPLATES has {len(TEMPLATES)} templates; expected 80")


#: Built-in template sets for ``--templates NAME``. Only ``imagenet80`` (the default) gives NACLIP's features;
#: the others are faster to encode and give *other* features (and other segmentations).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": TEMPLATES,
    "imagenet7": tuple(t("{c}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "photo": ("a photo of a {c}.",),
}


def _check_template(t: str, where: str) -> str:
    """``t`` with ``{}`` spelled ``{c}``; ValueError unless it has exactly one placeholder and no other
    braces."""
    c = t.replace("{}", "{c}")
    if c.count("{c}") != 1 or c.replace("{c}", "").count("{") or c.replace("{c}", "").count("}"):
        raise ValueError(f"{where}: expected exactly one '{{}}' and no other braces, got {t!r}")
    return c


def load_templates(spec: str | os.PathLike) -> tuple[str, ...]:
    """Prompt templates from a built-in set name (:data:`TEMPLATE_SETS`) or a UTF-8 text file with one
    template per line containing ``{}`` (or ``{c}``) where the class name goes; blank lines and lines
    starting with ``#`` are skipped. ValueError for an unknown name, an unreadable/empty file or a bad
    template line."""
    name = os.fspath(spec)
    if name in TEMPLATE_SETS:
        return TEMPLATE_SETS[name]
    path = Path(name)
    if not path.is_file():
        raise ValueError(
            f"templates: {name!r} is neither a built-in set ({', '.join(TEMPLATE_SETS)}) nor an existing file"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"templates: cannot read {name!r}: {exc}") from None
    out = tuple(
        _check_template(ln.strip(), f"templates: {name}:{i}")
        for i, ln in enumerate(lines, 1)
        if ln.strip() and not ln.lstrip().startswith("#")
    )
    if not out:
        raise ValueError(f"templates: {name!r} holds no template lines")
    return out


@dataclass(frozen=True)
class ClassSpec:
    """A parsed class list.

    ``queries[q]`` is the text of query ``q`` and ``query_to_class[q]`` its class index; ``synonyms[c]`` lists
    the queries of class ``c`` in order; ``names[c]`` is the display name (first synonym unless given
    explicitly).
    """

    synonyms: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(s for syn in self.synonyms for s in syn)

    @property
    def query_to_class(self) -> tuple[int, ...]:
        return tuple(c for c, syn in enumerate(self.synonyms) for _ in syn)

    @property
    def num_classes(self) -> int:
        return len(self.synonyms)

    def lines(self) -> list[str]:
        """The class list in the official file format: one line per class, synonyms joined by ``", "``."""
        return [", ".join(syn) for syn in self.synonyms]


def _split_synonyms(entry: str, index: int) -> tuple[str, ...]:
    # The official get_cls_idx splits on ", " (comma + space): "a,b" stays one name.
    parts = tuple(p.strip() for p in entry.split(", "))
    if any(not p for p in parts):
        raise ValueError(f"classes[{index}]: empty class name or synonym in {entry!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"classes[{index}]: repeated synonym in {entry!r}")
    return parts


def parse_classes(classes: str | Sequence[str] | ClassSpec, names: Sequence[str] | None = None) -> ClassSpec:
    """Parse ``classes`` into a :class:`ClassSpec`.

    ``classes``: ``"sky, cloud; tree; person"`` (``";"`` separates classes, ``", "`` synonyms) or a list such
    as ``["sky, cloud", "tree", "person"]``. ``names``: optional display names, one per class (default: the
    first synonym). A :class:`ClassSpec` is returned unchanged (``names`` must then be ``None``).
    """
    if isinstance(classes, ClassSpec):
        if names is not None:
            raise ValueError("names: not accepted together with a ClassSpec")
        return classes
    if isinstance(classes, str):
        entries = classes.split(";")
        if len(entries) == 1 and not entries[0].strip():
            entries = []
    elif isinstance(classes, Sequence):
        entries = list(classes)
        bad = [type(e).__name__ for e in entries if not isinstance(e, str)]
        if bad:
            raise TypeError(f"classes: expected a list of str, got elements of type {sorted(set(bad))}")
    else:
        raise TypeError(f"classes: expected a str or a list of str, got {type(classes).__name__}")
    if not entries:
        raise ValueError(f"classes: expected at least one class, got {classes!r}")
    synonyms = tuple(_split_synonyms(e, i) for i, e in enumerate(entries))
    if names is None:
        disp = tuple(s[0] for s in synonyms)
    else:
        if isinstance(names, str) or len(names) != len(synonyms):
            raise ValueError(f"names: expected {len(synonyms)} display names, got {names!r}")
        disp = tuple(str(n).strip() for n in names)
        if any(not n for n in disp):
            raise ValueError(f"names: empty display name in {list(names)!r}")
    seen: dict[str, int] = {}
    for i, n in enumerate(disp):
        if n in seen:
            raise ValueError(f"classes: duplicate class name {n!r} (classes {seen[n]} and {i})")
        seen[n] = i
    return ClassSpec(synonyms=synonyms, names=disp)


def prompts_for(query: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """The prompts of one query: ``[t.format(c=query) for t in templates]``."""
    return [t.format(c=query) for t in templates]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _unique(items: Sequence[str]) -> tuple[list[str], list[int]]:
    """``(unique items in first-seen order, index of every item in that list)``."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(s, len(first)) for s in items]
    return list(first), inverse


def text_encoding_path(model: torch.nn.Module) -> tuple[str, str]:
    """``(path, reason)``: how :func:`encode_queries` runs ``model``'s text tower, ``"short-context"`` (exact
    truncation after the pooled token) or ``"full-context"`` (plain ``encode_text``; ``reason`` says why)."""
    enc = TextEncoder(model)
    return enc.path, enc.reason


@torch.inference_mode()
def encode_queries(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    queries: Sequence[str],
    *,
    templates: Sequence[str] = TEMPLATES,
    queries_per_batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Text classifier ``[Q, D]`` (float32, unit rows, CPU) for ``queries`` with an open_clip ``model``.

    For each query: ``e_t = encode_text(tokenize(template_t(query)))``, ``e_t /= ||e_t||``, ``f = mean_t
    e_t``, ``f /= ||f||``. Identical queries and identical prompts are encoded once; on causal open_clip text
    towers the transformer runs only up to the pooled (EOT) token of each batch (:mod:`naclip.text_tower`,
    exact: equal to the full-context ``encode_text`` up to float rounding). ``queries_per_batch`` distinct
    queries are tokenized and encoded together; ``progress(done, total)`` is called once with ``done = 0``
    and after every such chunk (``total`` = number of distinct queries).
    """
    if isinstance(queries, str) or not queries:
        raise ValueError(f"queries: expected a non-empty list of str, got {queries!r}")
    queries_per_batch = check_positive_int("queries_per_batch", queries_per_batch)
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates: expected at least one template, got {templates!r}")
    device, _ = _model_device_dtype(model)
    encoder = TextEncoder(model)
    distinct, query_inverse = _unique(list(queries))
    n_t, total, out = len(templates), len(distinct), []
    if progress is not None:
        progress(0, total)
    for start in range(0, total, queries_per_batch):
        chunk = distinct[start : start + queries_per_batch]
        prompts, inverse = _unique([p for q in chunk for p in prompts_for(q, templates)])
        emb = encoder.encode(tokenizer(prompts).to(device)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb[torch.tensor(inverse, device=emb.device)].view(len(chunk), n_t, -1).mean(dim=1)
        out.append(emb / emb.norm(dim=-1, keepdim=True))
        if progress is not None:
            progress(min(start + queries_per_batch, total), total)
    return torch.cat(out, dim=0).cpu()[torch.tensor(query_inverse)]


class TextFeatureCache:
    """LRU cache of text classifiers keyed by ``(model key, dtype, device, tuple(queries))``."""

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get_or_compute(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = compute()
        self._data[key] = value
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def clear(self) -> None:
        self._data.clear()
