import pyarrow as pa
import pytest

from pythia_attribution import paths
from pythia_attribution.behaviors import FAMILIES, load_behaviors, read_file
from pythia_attribution.errors import ConfigError

GROUND_TRUTH = pa.Table.from_pylist(
    [
        {
            "item_id": "capital/France",
            "count": 4,
            "prompt": "The capital of France is",
            "target": " Paris",
            "prompt_ids": [1, 2, 3],
            "target_ids": [4],
        },
        {
            "item_id": "canary/002-00",
            "count": 2,
            "prompt": "a b",
            "target": " c",
            "prompt_ids": [5, 6],
            "target_ids": [7, 8],
        },
    ]
)


def encode(text):
    return [ord(c) for c in text]


def write(tmp_path, body, name="b.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_shipped_behaviors_cover_every_family():
    families = set()
    for path in (paths.project_root() / "experiments" / "behaviors").glob("*.toml"):
        entries, sets = read_file(path)
        families |= {e.family for e in entries} | {s.family for s in sets}
    assert families == set(FAMILIES)


def test_unknown_key_names_file_and_key(tmp_path):
    write(tmp_path, '[[behavior]]\nid = "x"\nfamily = "style"\nprompt = "a"\ntarget = " b"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r"b\.toml: unknown key 'behavior\[0\]\.colour'"):
        load_behaviors(tmp_path, GROUND_TRUTH, encode)


def test_malformed_toml_names_file(tmp_path):
    write(tmp_path, '[[behavior]\nid = "x"\n')
    with pytest.raises(ConfigError, match=r"b\.toml: malformed TOML"):
        load_behaviors(tmp_path, GROUND_TRUTH, encode)


def test_unknown_family(tmp_path):
    write(tmp_path, '[[behavior]]\nid = "x"\nfamily = "poetry"\nprompt = "a"\ntarget = " b"\n')
    with pytest.raises(ConfigError, match="unknown family 'poetry'"):
        load_behaviors(tmp_path, GROUND_TRUTH, encode)


def test_duplicate_ids(tmp_path):
    body = '[[behavior]]\nid = "x"\nfamily = "style"\nprompt = "a"\ntarget = " b"\n'
    write(tmp_path, body, "one.toml")
    write(tmp_path, body, "two.toml")
    with pytest.raises(ConfigError) as err:
        load_behaviors(tmp_path, GROUND_TRUTH, encode)
    # both files named by their full paths, as every other behavior error names its file
    assert str(err.value) == (
        f"{tmp_path / 'two.toml'}: duplicate behavior id 'x' (also in {tmp_path / 'one.toml'})"
    )


def test_sets_expand_from_ground_truth_ids(tmp_path):
    write(tmp_path, '[[behavior_set]]\nfamily = "memorized"\nitems = "canary/*"\n')
    (b,) = load_behaviors(tmp_path, GROUND_TRUTH, encode)
    assert (b.behavior_id, b.prompt_ids, b.target_ids, b.count) == ("canary/002-00", [5, 6], [7, 8], 2)


def test_set_matching_nothing_is_an_error(tmp_path):
    write(tmp_path, '[[behavior_set]]\nfamily = "factual"\nitems = "capitol/*"\n')
    with pytest.raises(ConfigError, match="matches no ground-truth item"):
        load_behaviors(tmp_path, GROUND_TRUTH, encode)


def test_missing_required_key(tmp_path):
    write(tmp_path, '[[behavior]]\nid = "x"\nfamily = "style"\nprompt = "a"\n')
    with pytest.raises(ConfigError, match=r"missing key 'behavior\[0\]\.target'"):
        load_behaviors(tmp_path, GROUND_TRUTH, encode)
