"""Query variants read from data files: the word-order variants of the analyses stage
(``analyses.word_order_file``) and the paraphrases of the causal stage's select-and-fine-tune
(``causal.paraphrase_file``). Each variant set names ground-truth items by a glob and gives each
variant a prompt and target template filled from the item's fields (``{name}``, and
``{other.name}`` for the next item matched). Reading needs no model: ``check`` and every stage
command read the files' structure before any stage runs; the stages fill them in and tokenize
them against the corpus's ground truth and tokenizer.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

from pythia_attribution.behaviors import split_ids
from pythia_attribution.config import array_of_tables, from_dict, read_toml
from pythia_attribution.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    prompt: str
    target: str


@dataclass(frozen=True)
class VariantSet:
    items: str
    order: str = ""
    note: str = ""
    variant: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class VariantQuery:
    item_id: str
    kind: str
    order: str
    variant: str
    prompt: str
    target: str
    prompt_ids: list[int]
    target_ids: list[int]


def read_variants(path: Path, ground_truth: pa.Table, encode) -> list[VariantQuery]:
    """The word-order queries of ``path`` for every ground-truth item it names that has a complete
    copy in the corpus. Errors name the file, the set or variant, and the rule. With ``encode``
    None, only the file's structure and templates are checked (``check`` before the corpus exists)."""
    data = read_toml(path)
    unknown = set(data) - {"variant_set"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: variant_set)")
    items = [it for it in ground_truth.to_pylist() if it["seq_idxs"]]
    queries: list[VariantQuery] = []
    for i, raw in enumerate(array_of_tables(data, "variant_set", path)):
        vset = from_dict(VariantSet, raw, str(path), prefix=f"variant_set[{i}].")
        where = f"{path}: variant_set[{i}] ('{vset.items}')"
        if vset.order not in ("", "single", "mixed"):
            raise ConfigError(f"{where}: order '{vset.order}' is not 'single' or 'mixed'")
        variants = [
            from_dict(Variant, v, str(path), prefix=f"variant_set[{i}].variant[{j}].")
            for j, v in enumerate(vset.variant)
        ]
        if not variants:
            raise ConfigError(f"{where}: no [[variant_set.variant]]")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: duplicate variant name")
        for v in variants:  # the file's own mistakes, found whether or not its items exist here
            for key in ("prompt", "target"):
                _check_template(getattr(v, key), f"{where}: variant '{v.name}': key '{key}'")
            if not v.target.strip():
                raise ConfigError(f"{where}: variant '{v.name}': key 'target' is empty")
        if encode is None:
            continue
        matched = [it for it in items if fnmatch.fnmatchcase(it["item_id"], vset.items)]
        matched.sort(key=lambda it: it["item_id"])
        if not matched:  # e.g. real Pythia, which has no synthetic items
            log.warning("%s: matches no ground-truth item with a complete copy in the corpus; skipped", where)
            continue
        details = [json.loads(it["detail"] or "{}") for it in matched]
        for k, it in enumerate(matched):
            fields = {**details[k], "other": SimpleNamespace(**details[(k + 1) % len(matched)])}
            for v in variants:
                vwhere = f"{where}: variant '{v.name}'"
                prompt = _fill(v.prompt, fields, f"{vwhere}, item '{it['item_id']}'")
                target = _fill(v.target, fields, f"{vwhere}, item '{it['item_id']}'")
                if not target.strip():
                    raise ConfigError(f"{vwhere}: key 'target' is empty")
                if prompt:
                    p_ids, t_ids = split_ids(encode, prompt, target, vwhere)
                else:  # the completion alone: its first token is the context of the rest
                    ids = encode(target)
                    if len(ids) < 2:
                        raise ConfigError(f"{vwhere}: with no prompt the target needs two tokens or more")
                    p_ids, t_ids = ids[:1], ids[1:]
                queries.append(
                    VariantQuery(it["item_id"], it["kind"], vset.order, v.name, prompt, target, p_ids, t_ids)
                )
    return queries


def _check_template(template: str, where: str) -> None:
    """A template that ``str.format`` cannot read (an unclosed brace, a stray '}', a conversion
    other than !r, !s, !a) is the file's error, not the stage's."""
    try:
        for _, name, _, conversion in string.Formatter().parse(template):
            if conversion not in (None, "r", "s", "a"):
                raise ValueError(f"unknown conversion '!{conversion}'")
            if name is not None and not name.strip():
                raise ValueError("'{}' names no field")
    except ValueError as exc:
        raise ConfigError(
            f"{where} is not a valid template {template!r}: {exc} (fields are written {{name}}; "
            "a literal brace is {{ or }})"
        ) from None


def _fill(template: str, fields: dict, where: str) -> str:
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        head, _, attr = name.partition(".")
        known = fields.get(head)
        if known is None or (attr and not hasattr(known, attr)) or (not attr and head == "other"):
            names = sorted(k for k in fields if k != "other")
            raise ConfigError(
                f"{where}: unknown field '{{{name}}}' (the item has: {', '.join(names)}; "
                "and other.FIELD for the next item)"
            )
    try:
        return template.format(**fields)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:  # e.g. a field inside a format spec
        raise ConfigError(f"{where}: cannot fill {template!r}: {type(exc).__name__}: {exc}") from None
