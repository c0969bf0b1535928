"""Behaviors are data: ``experiments/behaviors/*.toml``.

A file holds ``[[behavior]]`` entries (a prompt and the target completion) and
``[[behavior_set]]`` entries that expand to one behavior per ground-truth item whose id matches
a glob (prompt and target then come from ``ground_truth.arrow``, as token ids where the item
defines them, e.g. canaries). Unknown keys, unknown families and duplicate ids are errors that
name the file.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pythia_attribution.config import array_of_tables, from_dict, read_toml
from pythia_attribution.errors import ConfigError

FAMILIES = ("factual", "fictional_fact", "memorized", "stereotype", "toxic", "style")


@dataclass(frozen=True)
class BehaviorEntry:
    """One behavior written out in a file."""

    id: str
    family: str
    prompt: str
    target: str
    item: str = ""
    note: str = ""


@dataclass(frozen=True)
class BehaviorSet:
    """Behaviors generated from the ground-truth items whose id matches ``items``."""

    family: str
    items: str
    note: str = ""


@dataclass(frozen=True)
class Behavior:
    behavior_id: str
    family: str
    prompt: str
    target: str
    prompt_ids: list[int]
    target_ids: list[int]
    item_id: str | None
    count: int | None
    source_file: str
    note: str


def _check_family(family: str, where: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"{where}: unknown family '{family}' (known: {', '.join(FAMILIES)})")


def read_file(path: Path) -> tuple[list[BehaviorEntry], list[BehaviorSet]]:
    data = read_toml(path)
    unknown = set(data) - {"behavior", "behavior_set"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: behavior, behavior_set)")
    entries, sets = [], []
    for i, raw in enumerate(array_of_tables(data, "behavior", path)):
        entry = from_dict(BehaviorEntry, raw, str(path), prefix=f"behavior[{i}].")
        where = f"{path}: behavior '{entry.id}'"
        if not entry.id.strip():
            raise ConfigError(f"{path}: behavior[{i}]: key 'id' is empty")
        _check_family(entry.family, where)
        for key in ("prompt", "target"):
            if not getattr(entry, key).strip():
                raise ConfigError(f"{where}: key '{key}' is empty (or only whitespace)")
        entries.append(entry)
    for i, raw in enumerate(array_of_tables(data, "behavior_set", path)):
        bset = from_dict(BehaviorSet, raw, str(path), prefix=f"behavior_set[{i}].")
        _check_family(bset.family, f"{path}: behavior_set[{i}]")
        sets.append(bset)
    return entries, sets


def check_fits(
    behaviors: list[Behavior], folder: Path, models: dict[int, tuple[int, int]], min_new: int
) -> None:
    """Every behavior fits every checkpoint's model: prompt plus completion within its context,
    token ids within its vocabulary. ``models`` maps a checkpoint step to (max_position_embeddings,
    vocab_size) from that checkpoint's own config, so real Pythia is checked the same way."""
    for b in behaviors:
        where = f"{folder / b.source_file}: behavior '{b.behavior_id}'"
        completion = max(min_new, len(b.target_ids))
        needed = len(b.prompt_ids) + completion
        top = max(b.prompt_ids + b.target_ids)
        for step, (positions, vocab) in sorted(models.items()):
            if needed > positions:
                raise ConfigError(
                    f"{where}: prompt ({len(b.prompt_ids)} tokens) plus completion "
                    f"({completion}) is {needed} tokens, more than the "
                    f"{positions} positions of the model at step{step}"
                )
            if top >= vocab:
                raise ConfigError(
                    f"{where}: token id {top} is outside the vocabulary ({vocab}) of the model at step{step}"
                )


def encoder(tokenizer):
    """Text -> token ids as running text (no special tokens added): how behaviors are tokenized."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def split_ids(encode, prompt: str, target: str, where: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt and target as the model sees them in running text."""
    prompt_ids = encode(prompt)
    if not prompt_ids:
        raise ConfigError(f"{where}: the prompt encodes to no tokens")
    full = encode(prompt + target)
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        raise ConfigError(
            f"{where}: the prompt/target boundary falls inside a token; move the space into the target"
        )
    return prompt_ids, full[len(prompt_ids) :]


def load_behaviors(folder: Path, ground_truth: pa.Table, encode) -> list[Behavior]:
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise ConfigError(f"{folder}: no behavior files (*.toml)")
    items = ground_truth.to_pylist()
    behaviors: dict[str, Behavior] = {}

    def add(b: Behavior) -> None:
        if b.behavior_id in behaviors:
            raise ConfigError(
                f"{folder / b.source_file}: duplicate behavior id '{b.behavior_id}' "
                f"(also in {folder / behaviors[b.behavior_id].source_file})"
            )
        behaviors[b.behavior_id] = b

    by_id = {it["item_id"]: it for it in items}
    for path in files:
        entries, sets = read_file(path)
        for e in entries:
            if e.item and e.item not in by_id:
                raise ConfigError(f"{path}: behavior '{e.id}': unknown ground-truth item '{e.item}'")
            p_ids, t_ids = split_ids(encode, e.prompt, e.target, f"{path}: behavior '{e.id}'")
            count = by_id[e.item]["count"] if e.item else None
            add(
                Behavior(
                    e.id, e.family, e.prompt, e.target, p_ids, t_ids, e.item or None, count, path.name, e.note
                )
            )
        for s in sets:
            matched = [it for it in items if fnmatch.fnmatchcase(it["item_id"], s.items)]
            if not matched:
                raise ConfigError(f"{path}: behavior_set items '{s.items}' matches no ground-truth item")
            for it in matched:
                add(
                    Behavior(
                        it["item_id"],
                        s.family,
                        it["prompt"],
                        it["target"],
                        list(it["prompt_ids"]),
                        list(it["target_ids"]),
                        it["item_id"],
                        it["count"],
                        path.name,
                        s.note,
                    )
                )
    return list(behaviors.values())
