"""The manuscript: built from nano tables, numbers only from variables, references resolved."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pythia_attribution import paths
from pythia_attribution.errors import MissingInputError
from pythia_attribution.paper import build, causal_variables, derive, fmt, style, variables
from pythia_attribution.paper.data import NEEDED, Study

PAPER = paths.project_root() / "paper"


def _paper_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "paper"
    folder.mkdir()
    for name in build.SOURCES:
        shutil.copy(PAPER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def rendered(nano_run, tmp_path_factory):
    folder = _paper_copy(tmp_path_factory.mktemp("paper"))
    values = build.assets("nano", folder, results=nano_run["results"])
    html, pdf = build.preview(folder, values)
    return {"folder": folder, "values": values, "html": html, "pdf": pdf}


def test_preview_renders_from_nano_tables(rendered):
    folder, html, pdf = rendered["folder"], rendered["html"], rendered["pdf"]
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 50_000
    page = html.read_text()
    qmd = (folder / "index.qmd").read_text()
    n_figs = qmd.count("{#fig-")
    included = re.findall(r"\{\{< include (_generated/tables/[\w-]+\.md) >\}\}", qmd)
    n_tbls = "".join((folder / name).read_text() for name in included).count("{#tbl-")
    assert n_figs >= 8 and n_tbls >= 5
    # every figure and table is numbered, in order, and every reference became a link
    for i in range(1, n_figs + 1):
        assert f"Figure {i}:" in page
    for i in range(1, n_tbls + 1):
        assert f"Table {i}:" in page
    assert "??" not in page and "{{<" not in page
    assert f"Figure {n_figs + 1}" not in page
    for name in ("learning", "tracing", "composition", "memorization", "early-late"):
        for ext in ("png", "svg"):
            assert (folder / "_generated" / "figures" / f"{name}.{ext}").stat().st_size > 1000
    typ = (folder / "_output" / "index.typ").read_text()
    assert 'paper: "a4"' in typ
    # the paper names the profile and commit its numbers come from
    assert "nano" in page and rendered["values"]["build"]["commit"][:7] in page


def test_every_variable_the_manuscript_uses_is_computed(rendered):
    flat = variables.flatten(yaml.safe_load((rendered["folder"] / build.VARIABLES).read_text()))
    used = {
        m.group(2) for m in build.SHORTCODE.finditer((PAPER / "index.qmd").read_text()) if m.group(1) == "var"
    }
    assert used and used <= set(flat), sorted(used - set(flat))
    assert flat["build.profile"] == "nano"
    # nano has every kind of data the manuscript describes: nothing may fall back to "n/a"
    assert "unavailable" not in rendered["values"], rendered["values"].get("unavailable")


def test_pdf_source_sets_apostrophes_after_digits_and_minus_signs(rendered):
    """typst sets an apostrophe after a digit as a prime (BM25′s), so the filter hands it over
    raw; a hyphen that pandoc's line wrapping puts first on a line is escaped and prints as a
    hyphen, so negative numbers are written with the minus sign."""
    typ = (rendered["folder"] / "_output" / "index.typ").read_text()
    assert "BM25’s" in typ and not re.search(r"[0-9]'", typ)
    assert not re.search(r"\\-[0-9]", typ)
    assert "\N{MINUS SIGN}" in typ  # nano has negative changes (tail-patch floor, paired differences)


def test_numbers_and_method_names_in_sentences():
    assert [fmt.dec(-0.5, 2), fmt.sci(-3.4e-5), fmt.pct(-0.123), fmt.dec(0.5, 1)] == [
        "\N{MINUS SIGN}0.50",
        "\N{MINUS SIGN}3.4e-05",
        "\N{MINUS SIGN}12%",
        "0.5",
    ]
    assert fmt.interval(-0.25, 0.5, 2) == "[\N{MINUS SIGN}0.25, 0.50]"
    names = {m: style.method_name(m) for m in ("trackstar", "bm25", "ekfac", "grad_cosine", "activation")}
    assert names == {
        "trackstar": "TrackStar",
        "bm25": "BM25",
        "ekfac": "EK-FAC",
        "grad_cosine": "gradient cosine",
        "activation": "activation similarity",
    }


def test_the_primary_gradient_method_is_trackstar_where_it_ran_else_a_variant():
    assert derive.primary_method(["bm25", "grad_cosine", "trackstar", "trackstar_est"]) == "trackstar"
    assert derive.primary_method(["bm25", "grad_cosine", "trackstar_est"]) == "trackstar_est"
    assert derive.primary_method(["ekfac", "grad_cosine"]) == "grad_cosine"
    assert derive.primary_method(["bm25", "activation"]) is None


def test_tokenwise_window_holds_the_most_absolute_score_earliest_on_a_tie():
    import polars as pl

    scores = [0.1, -0.2, 0.0, 3.0, -1.0, 0.5, 0.0, 0.0, 2.0, 0.1]
    example = pl.DataFrame({"position": list(range(10)), "score": scores})
    assert derive.tokenwise_window(example, 3)["position"].to_list() == [3, 4, 5]  # |3|+|-1|+|.5|
    assert derive.tokenwise_window(example, 10).equals(example)  # short enough: whole
    assert derive.tokenwise_window(example, 64).equals(example)
    tie = pl.DataFrame({"position": [0, 1, 2, 3], "score": [1.0, 0.0, 0.0, -1.0]})
    assert derive.tokenwise_window(tie, 1)["position"].to_list() == [0]


def test_two_group_bootstrap_brackets_the_difference_and_is_seeded():
    early, late = np.linspace(2.0, 4.0, 66), np.linspace(0.0, 1.0, 34)  # means 3.0 and 0.5
    lo, hi = derive.bootstrap_diff_ci(early, late, seed=1234, n_boot=500)
    assert lo < 2.5 < hi and lo > 2.0 and hi < 3.0
    assert derive.bootstrap_diff_ci(early, late, seed=1234, n_boot=500) == (lo, hi)
    assert all(np.isnan(derive.bootstrap_diff_ci(early, [], seed=1234)))


def test_split_sentence_is_decided_by_the_paired_interval(monkeypatch):
    """The tail-patch section's claim follows the interval of the paired difference between the
    first method by MRR and the first by effect, whichever way it falls."""
    orders = {"causal": ["trackstar", "bm25"], **{t: ["bm25", "trackstar"] for t in derive.TRUTH_ORDER}}
    for lo, hi, claim in (
        (0.01, 0.03, "is not the one whose sequences move the prediction most"),
        (-0.01, 0.03, "move the prediction as much as"),
        (-0.03, -0.01, "yet paired by behavior"),
    ):
        interval = {"mean": (lo + hi) / 2, "lo": lo, "hi": hi}
        monkeypatch.setattr(derive, "causal_paired", lambda study, a, b, d=interval: d)
        assert claim in causal_variables.split_sentence(None, orders)
    same_first = {**orders, "causal": ["bm25", "trackstar"]}
    assert "is also the one" in causal_variables.split_sentence(None, same_first)


def test_abstract_sentences_follow_the_interval_and_the_tables():
    """The abstract's tail-patch claim is decided by the paired interval; its method list comes from
    the tables in the manuscript's order, the floor aside; no data, no sentence."""
    for lo, hi, claim in (
        (0.01, 0.03, "a step on one of TrackStar's top 10 raises"),
        (-0.01, 0.03, "move the target's log-probability alike"),
        (-0.03, -0.01, "a step on one of BM25's top 10 raises"),
    ):
        paired = {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n": 5}
        assert claim in causal_variables.tail_patch_abstract(paired, "10")
    assert causal_variables.tail_patch_abstract(None, "10") == ""
    listed = variables.methods_sentence(["random", "bm25", "trackstar", "grad_cosine"])
    assert listed == "TrackStar, gradient cosine and BM25"
    assert causal_variables.finetune_abstract({"k": "50", "factual": {"n": "4"}}, ["factual"]) == ""


@pytest.mark.parametrize("manuscript", sorted(set(build.MANUSCRIPTS.values())))
def test_manuscript_prose_types_no_numbers(manuscript):
    found = build.typed_numbers((PAPER / manuscript).read_text())
    assert not found, f"hand-typed numbers in paper/{manuscript} (use a variable): {found}"


def test_quarto_rendering_another_worlds_manuscript_stops(monkeypatch, tmp_path):
    """Quarto's pre-render step names the manuscript that reports the profile's world when Quarto
    renders another (`quarto render paper` renders index.qmd; a real-scale profile needs pythia.qmd)."""
    monkeypatch.delenv("QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES", raising=False)
    monkeypatch.setenv("QUARTO_PROJECT_INPUT_FILES", "/repro/paper/index.qmd\n")
    with pytest.raises(
        build.PaperError, match=r"^profile 'pythia-70m-deduped' is reported by paper/pythia.qmd"
    ):
        build.check_quarto_target("pythia.qmd", "pythia-70m-deduped")
    build.check_quarto_target("index.qmd", "micro")
    listing = tmp_path / "inputs.txt"
    listing.write_text("paper/pythia.qmd\n")
    monkeypatch.delenv("QUARTO_PROJECT_INPUT_FILES")
    monkeypatch.setenv("QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES", str(listing))
    build.check_quarto_target("pythia.qmd", "pythia-70m-deduped")
    with pytest.raises(build.PaperError, match="run `quarto render paper/index.qmd`"):
        build.check_quarto_target("index.qmd", "micro")
    monkeypatch.delenv("QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES")
    build.check_quarto_target("index.qmd", "micro")  # not under Quarto: nothing to check


def test_typed_number_check_finds_digits_outside_variables():
    text = (
        "MRR is {{< var tracing.trackstar.mrr >}} (@fig-tracing, [@koh2017influence]).\nBM25 was 0.99 here."
    )
    assert build.typed_numbers(text) == [(2, "0.99")]
    assert build.typed_numbers("![Caption](fig2.svg){#fig-x2} and the top-1 of BM25's list") == []


def test_unknown_variable_names_its_line(tmp_path):
    with pytest.raises(build.PaperError, match=r"index.qmd:2: unknown variable 'no.such'"):
        build.expand("line one\n{{< var no.such >}}\n", {"a": "1"}, tmp_path, "index.qmd")
    with pytest.raises(build.PaperError, match="missing.md does not exist"):
        build.expand("{{< include missing.md >}}", {}, tmp_path, "index.qmd")


def test_dangling_cross_reference_fails_the_build(tmp_path):
    folder = tmp_path / "paper"
    folder.mkdir()
    for name in (build.BIBLIOGRAPHY, build.TYPST_HEADER, build.APOSTROPHES):
        shutil.copy(PAPER / name, folder / name)
    (folder / "index.qmd").write_text(
        "---\ntitle: t\n---\n\n# One {#sec-one}\n\nSee @sec-one and @fig-nowhere.\n"
    )
    with pytest.raises(build.PaperError, match="dangling cross-reference @fig-nowhere"):
        build.preview(folder, {})
    assert not (folder / build.OUTPUT).exists() and not (folder / (build.OUTPUT + ".part")).exists()


def test_missing_table_names_the_session(tmp_path):
    results = tmp_path / "results" / "nano"
    (results / paths.CORPUS).mkdir(parents=True)
    study = Study(results, "nano")
    with pytest.raises(MissingInputError, match=r"run `nox -s corpus -- --profile nano`"):
        study.check_all()
    assert set(NEEDED.values()) == set(paths.STAGES)


def test_missing_table_leaves_no_partial_assets(tmp_path):
    folder = _paper_copy(tmp_path)
    with pytest.raises(MissingInputError):
        build.assets("nano", folder, results=tmp_path)
    assert not (folder / build.GENERATED).exists() and not (folder / build.VARIABLES).exists()


def test_paper_code_reads_tables_only():
    code = (
        "import sys; import pythia_attribution.paper.build, pythia_attribution.paper.figures, "
        "pythia_attribution.paper.mdtables, pythia_attribution.paper.variables; "
        "bad = [m for m in ('torch', 'bergson', 'transformers') if m in sys.modules]; "
        "sys.exit(f'paper code imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameter_count_matches_the_trained_model(nano_run):
    from transformers import GPTNeoXForCausalLM

    study = Study(nano_run["results"], "nano")
    ckpts = study.frame(paths.CHECKPOINTS_TABLE)
    model = GPTNeoXForCausalLM.from_pretrained(nano_run["results"] / paths.TRAIN / ckpts["path"][-1])
    train = study.config(paths.CHECKPOINTS_TABLE, "train")
    vocab = study.config(paths.CORPUS_TABLE, "corpus")["vocab_size"]
    assert variables.model_parameters(train, vocab) == sum(p.numel() for p in model.parameters())


def test_same_tables_give_identical_assets(rendered, nano_run, tmp_path):
    """Figures (PNG and SVG bytes), tables and variables do not change between two builds."""
    again = _paper_copy(tmp_path)
    build.assets("nano", again, results=nano_run["results"])
    first, second = rendered["folder"], again

    def generated(folder):
        return sorted(p.relative_to(folder) for p in (folder / build.GENERATED).rglob("*") if p.is_file())

    names = generated(first)
    assert names and names == generated(second)
    for name in [*names, Path(build.VARIABLES)]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_rendering_made_from_the_same_inputs_is_not_rendered_again(nano_run, tmp_path, capsys):
    """The second `nox -s paper` is a no-op: same tables, code, sources and commit, and the output
    still what was written. A source edit changes what the output is made from; a damaged output is
    rendered again."""
    from pythia_attribution.paper.__main__ import main

    folder = _paper_copy(tmp_path)
    results = nano_run["results"]
    args = ["preview", "--profile", "nano", "--paper-dir", str(folder), "--results", str(results), "-q"]
    assert main(args) == 0
    pdf = folder / build.OUTPUT / "index.pdf"
    first = pdf.stat().st_ino, pdf.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "is up to date for profile nano" in capsys.readouterr().out
    assert (pdf.stat().st_ino, pdf.stat().st_mtime_ns) == first

    made_from = build.render_key("nano", folder, results, "preview")
    source = folder / build.MANUSCRIPT
    text = source.read_text()
    source.write_text(text + "\nOne more sentence.\n")
    assert build.render_key("nano", folder, results, "preview") != made_from
    source.write_text(text)
    assert build.render_key("nano", folder, results, "preview") == made_from
    assert build.render_key("nano", folder, results, "quarto") != made_from

    pdf.write_bytes(b"%PDF-1.7 cut short")
    assert main(args) == 0
    assert "is up to date" not in capsys.readouterr().out
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 50_000


def test_what_a_derived_output_is_made_from_covers_every_stage_record(tmp_path):
    from pythia_attribution import derived

    results = tmp_path / "results"
    (results / "probe").mkdir(parents=True)
    (results / "explorer").mkdir()  # no record: not a stage, not part of the key
    record = results / "probe" / paths.STAGE_RECORD
    entry = {"size": 3, "sha256": "a" * 64, "digest": "b" * 64}
    record.write_text(json.dumps({"outputs": {"probes.arrow": entry}}))
    made_from = derived.key(results, ["pythia_attribution.explorer"], [])
    (results / "explorer" / "index.html").write_text("a page")
    assert derived.key(results, ["pythia_attribution.explorer"], []) == made_from
    record.write_text(json.dumps({"outputs": {"probes.arrow": {**entry, "sha256": "c" * 64}}}))
    assert derived.key(results, ["pythia_attribution.explorer"], []) != made_from
    assert derived.key(results, ["pythia_attribution.explorer"], [], profile="other") != derived.key(
        results, ["pythia_attribution.explorer"], []
    )


def test_quarto_runs_with_the_profile_and_this_interpreter_and_is_skipped_when_current(
    nano_run, tmp_path, monkeypatch, capsys
):
    """`nox -s paper` with Quarto on PATH goes through `python -m pythia_attribution.paper quarto`.
    No Quarto here: a stand-in on PATH records how it was called and writes an output, which is
    what the wrapper's part (profile, interpreter, stamp) needs."""
    from pythia_attribution.paper.__main__ import main

    folder = _paper_copy(tmp_path)
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "quarto"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $2 $PYTHIA_ATTRIBUTION_PROFILE $(command -v python)" >> {calls}\n'
        'mkdir -p "$(dirname "$2")/_output" && echo "<html></html>" > "$(dirname "$2")/_output/index.html"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHIA_ATTRIBUTION_RESULTS", str(nano_run["results"].parent))
    args = ["quarto", "--profile", "nano", "--paper-dir", str(folder), "-q"]
    assert main(args) == 0
    assert main(args) == 0
    assert "is up to date for profile nano" in capsys.readouterr().out
    (line,) = calls.read_text().splitlines()
    assert line == f"render {folder / 'index.qmd'} nano {Path(sys.executable).parent / 'python'}"
    (folder / build.OUTPUT / "index.html").write_text("changed")
    assert main(args) == 0
    assert len(calls.read_text().splitlines()) == 2
