"""Property: whatever profile or behavior file a user writes, the CLI answers with a result or one
line naming the problem (exit 2), never a traceback and never an internal error (exit 1).

Profiles are the nano profile with one key set to a generated value (any type, out of range, a
key that does not exist, a table where a value belongs) or with generated text spliced into the
file; behavior files are generated entries (long, empty, unicode, wrong types, unknown keys and
families). ``check`` runs the same validation the stages run where they read each input,
against the nano tokenizer and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pythia_attribution import paths
from pythia_attribution.behaviors import FAMILIES
from pythia_attribution.cli import main
from pythia_attribution.config import Profile

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_document(data: dict) -> str:
    """A TOML writer for the nested dicts these tests generate (top-level keys first, then tables)."""
    lines = []

    def table(prefix: str, body: dict) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k), v)

    table("", data)
    return "\n".join(lines) + "\n"


def _leaf_keys(cls, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_leaf_keys(tp, (*prefix, f.name)))
        elif f.name not in ("name",):
            keys.append((*prefix, f.name))
    return keys


KEYS = _leaf_keys(Profile)
# Keys that name files or folders: a generated value would point the check elsewhere on disk.
PATH_KEYS = {
    ("corpus", "manifest"),
    ("probe", "behaviors_dir"),
    ("attribute", "methods_file"),
    ("world", "manifest"),
    ("world", "hub_cache"),
    ("corpus", "pile", "url"),
}

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2**31, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.lists(st.lists(st.integers(-5, 300), max_size=3), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), scalars, max_size=2),
)


@pytest.fixture
def nano_results(nano_run, tmp_path, monkeypatch):
    """The nano corpus and train outputs (tokenizer, checkpoints), copied: check reads them."""
    root = tmp_path / "results"
    for name in (paths.CORPUS, paths.TRAIN):
        shutil.copytree(nano_run["results"] / name, root / "nano" / name)
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(root))
    return nano_run


def _run(capsys, profile: Path) -> None:
    code = main(["check", "--profile", str(profile), "-q"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    assert code in (0, 2), (code, captured.err)
    if code == 2:  # one line, after any warnings logged before it (``HH:MM:SS logger: ...``)
        lines = [x for x in captured.err.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d \S+: ", x)]
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err


@SETTINGS
@given(
    key=st.sampled_from([k for k in KEYS if k not in PATH_KEYS])
    | st.tuples(st.sampled_from(["runtime", "corpus", "train", "bogus"]), st.text(min_size=1, max_size=8)),
    value=values,
)
def test_any_profile_value_gives_a_result_or_one_line(nano_results, tmp_path, capsys, key, value):
    data = tomllib.loads(Path(nano_results["profile"]).read_text())
    node = data
    for part in key[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[key[-1]] = value
    profile = tmp_path / "nano.toml"
    profile.write_text(toml_document(data))
    _run(capsys, profile)


@SETTINGS
@given(junk=st.one_of(st.text(max_size=40), st.binary(max_size=40)), where=st.floats(0, 1))
def test_any_text_spliced_into_a_profile_gives_one_line(nano_results, tmp_path, capsys, junk, where):
    """Text, or bytes that need not be UTF-8 (a file saved as Latin-1 once gave an internal error)."""
    text = Path(nano_results["profile"]).read_bytes()
    cut = int(where * len(text))
    profile = tmp_path / "nano.toml"
    profile.write_bytes(text[:cut] + (junk if isinstance(junk, bytes) else junk.encode()) + text[cut:])
    _run(capsys, profile)


entry_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", " Paris", "The capital of France is", "x" * 5000, "the king " * 1500]),
)
entries = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=10), st.integers()),
        "family": st.one_of(st.sampled_from(FAMILIES), st.text(max_size=10)),
        "prompt": st.one_of(entry_text, st.integers(), st.lists(st.integers(), max_size=2)),
        "target": st.one_of(entry_text, st.booleans()),
    },
    optional={
        "item": st.one_of(st.sampled_from(["capital-00", "no-such-item"]), st.text(max_size=5)),
        "note": st.text(max_size=10),
        "weight": st.integers(),
    },
)
sets = st.fixed_dictionaries(
    {"family": st.sampled_from(FAMILIES), "items": st.sampled_from(["canary-*", "nothing-*", "", "*"])},
    optional={"note": st.integers()},
)


@SETTINGS
@given(
    behaviors=st.lists(entries, max_size=4),
    behavior_sets=st.lists(sets, max_size=2),
    extra=st.dictionaries(st.sampled_from(["behaviour", "version", "behavior"]), st.integers(), max_size=1),
)
def test_any_behavior_file_gives_a_result_or_one_line(
    nano_results, tmp_path, capsys, behaviors, behavior_sets, extra
):
    folder = tmp_path / "behaviors"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    body = "".join("[[behavior]]\n" + toml_document(b) for b in behaviors)
    body += "".join("[[behavior_set]]\n" + toml_document(b) for b in behavior_sets)
    body = "".join(f"{k} = {v}\n" for k, v in extra.items()) + body
    (folder / "generated.toml").write_text(body)
    text = Path(nano_results["profile"]).read_text()
    profile = tmp_path / "nano.toml"
    profile.write_text(text.replace('behaviors_dir = "experiments/behaviors"', f'behaviors_dir = "{folder}"'))
    _run(capsys, profile)


template = st.one_of(
    st.text(alphabet=st.sampled_from("{}!:.>ab "), max_size=10),
    st.sampled_from(["{name} is a", " {insult}", "{other.name}", "{city}", "{name!r}", "{}", "{0}", ""]),
    st.text(max_size=12),
)
variants = st.fixed_dictionaries(
    {"name": st.sampled_from(["original", "swapped", "x"]), "prompt": template, "target": template}
)
variant_sets = st.fixed_dictionaries(
    {
        "items": st.sampled_from(["insult/*", "bio/*", "nothing/*", "*"]),
        # mostly well-formed around the templates, so that most examples reach them
        "variant": st.lists(variants, min_size=1, max_size=3, unique_by=lambda v: v["name"]),
    },
    optional={"order": st.sampled_from(["single", "mixed", "sideways"])},
)


@SETTINGS
@given(generated=st.lists(variant_sets, max_size=2))
def test_any_word_order_file_gives_a_result_or_one_line(nano_results, tmp_path, capsys, generated):
    path = tmp_path / "word_order.toml"
    body = ""
    for vset in generated:
        body += "[[variant_set]]\n" + toml_document({k: v for k, v in vset.items() if k != "variant"})
        body += "".join("[[variant_set.variant]]\n" + toml_document(v) for v in vset["variant"])
    path.write_text(body)
    text = Path(nano_results["profile"]).read_text()
    profile = tmp_path / "nano.toml"
    assert "[analyses]" not in text
    profile.write_text(f'{text}\n[analyses]\nword_order_file = "{path}"\n')
    _run(capsys, profile)
