"""CITATION.cff is valid CFF 1.2.0 and agrees with the package metadata."""

import tomllib

import yaml
from cffconvert.cli.create_citation import create_citation

from pythia_attribution import __version__, paths

ROOT = paths.project_root()


def test_citation_file_is_valid_cff():
    citation = create_citation(str(ROOT / "CITATION.cff"), None)
    citation.validate()  # raises on any schema violation


def test_citation_agrees_with_pyproject():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert str(cff["version"]) == project["version"] == __version__
    assert cff["license"] == project["license"]
    assert cff["title"].startswith(project["name"] + ":")
    assert cff["repository-code"] == project["urls"]["Homepage"]
    assert [a["name"] for a in cff["authors"]] == [a["name"] for a in project["authors"]]
