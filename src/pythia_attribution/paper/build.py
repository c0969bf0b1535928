"""Build the manuscript: assets from the tables (Quarto's pre-render), and the pandoc/typst preview.

A profile's tables are reported by the manuscript of the world they come from (``MANUSCRIPTS``,
by ``corpus.source``): ``index.qmd`` for micro-Pile, whose synthetic items give a ground truth,
and ``pythia.qmd`` for the Pile's own training sequences, which have none.

``assets`` writes, inside the paper folder, ``_generated/figures/*.{png,svg}``,
``_generated/tables/*.md`` and ``_variables.yml`` (every number the prose quotes). ``preview``
renders the manuscript to ``_output/<name>.html`` and ``_output/<name>.pdf`` without Quarto: the
``{{< var >}}`` / ``{{< include >}}`` shortcodes are expanded here (an unknown variable or a
missing include is an error naming the line), then pandoc 3 (pypandoc-binary) runs the
cross-reference filter and citeproc with ``--fail-if-warnings`` (a dangling ``@fig-``/``@tbl-``/
``@sec-`` reference or an unknown citation fails), and typst (the ``typst`` Python package)
compiles the PDF on A4.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from pythia_attribution import paths
from pythia_attribution.errors import UserError
from pythia_attribution.paper import figures, mdtables, pile_world, variables
from pythia_attribution.paper.data import Study

log = logging.getLogger(__name__)

GENERATED = "_generated"
VARIABLES = "_variables.yml"
OUTPUT = "_output"
MANUSCRIPT = "index.qmd"  # micro-Pile's manuscript, and Quarto's default render target
# which manuscript reports a world, by the corpus source its tables were built from
MANUSCRIPTS = {"micro-pile": MANUSCRIPT, pile_world.SOURCE: "pythia.qmd"}
BIBLIOGRAPHY = "references.bib"
ANCHORS = "anchors.yml"  # published numbers, hand-curated with their sources
TYPST_HEADER = "header.typ"  # typst set-up shared by Quarto's typst format and the preview
APOSTROPHES = "apostrophes.lua"  # a filter shared by Quarto (_quarto.yml) and the preview
# what a copy of the manuscript folder needs to build (the rest is written by the assets step)
SOURCES = (*dict.fromkeys(MANUSCRIPTS.values()), BIBLIOGRAPHY, ANCHORS, "_quarto.yml")
SOURCES += (TYPST_HEADER, APOSTROPHES)

STAMP = ".rendered.json"  # what _output/, _generated/ and _variables.yml were made from

SHORTCODE = re.compile(r"\{\{<\s*(\w+)\s*([^>]*?)\s*>\}\}")


class PaperError(UserError):
    """The manuscript cannot be built: unknown variable, missing include, pandoc or typst failure."""


def default_paper_dir() -> Path:
    return paths.project_root() / "paper"


def manuscript(study: Study) -> str:
    """The manuscript that reports ``study``'s world (``MANUSCRIPTS``, by its corpus source)."""
    source = pile_world.corpus_source(study)
    if source not in MANUSCRIPTS:
        raise PaperError(f"no manuscript reports corpus source '{source}' (known: {', '.join(MANUSCRIPTS)})")
    return MANUSCRIPTS[source]


def check_quarto_target(name: str, profile: str) -> None:
    """Stop a Quarto render of the wrong manuscript for this profile's world. As Quarto's
    pre-render step, ``assets`` sees the files being rendered in ``QUARTO_PROJECT_INPUT_FILES``
    (or the file named by ``QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES``)."""
    listing = os.environ.get("QUARTO_PROJECT_INPUT_FILES")
    if listing is None and os.environ.get("QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES"):
        with contextlib.suppress(OSError):
            listing = Path(os.environ["QUARTO_USE_FILE_FOR_PROJECT_INPUT_FILES"]).read_text()
    if not listing:
        return
    rendering = {Path(line.strip()).name for line in listing.splitlines() if line.strip()}
    if name not in rendering:
        raise PaperError(
            f"profile {profile!r} is reported by paper/{name}, but Quarto renders "
            f"{', '.join(sorted(rendering))}: run `quarto render paper/{name}` "
            f"(or `nox -s paper -- --profile {profile}`)"
        )


def build_info(profile: str) -> dict:
    from pythia_attribution.stage import git_state

    state = git_state()
    commit = state["git_commit"]
    return {
        "profile": profile,
        "commit": commit[:10] + ("+dirty" if state["git_dirty"] else ""),
        "commit_full": commit,
    }


def assets(profile: str, paper_dir: Path, results: Path | None = None) -> dict:
    """Write figures, tables and variables for ``profile`` into ``paper_dir``; return the variables."""
    started = time.perf_counter()
    study = Study(results or paths.results_root() / profile, profile)
    study.check_all()
    paper_dir = Path(paper_dir)
    part = paper_dir / (GENERATED + ".part")
    if part.exists():
        shutil.rmtree(part)
    (part / "figures").mkdir(parents=True)
    (part / "tables").mkdir()
    try:
        name = manuscript(study)
        check_quarto_target(name, profile)
        values = variables.compute(study, build_info(profile) | {"manuscript": name})
        # the explorer (nox -s explorer) beside the results, as a link from the rendered paper
        values["build"]["explorer"] = os.path.relpath(
            study.results / "explorer" / "index.html", paper_dir / OUTPUT
        )
        anchors = paper_dir / ANCHORS
        if anchors.is_file():
            values["anchors"] = yaml.safe_load(anchors.read_text())
        pile_world.published_memorization(values)
        fill_unavailable(values, paper_dir / name)
        figure_names, table_names = used_assets(paper_dir / name)
        log.info("drawing %d figures for %s", len(figure_names), name)
        figures.write_all(study, part / "figures", figure_names)
        mdtables.write_all(study, part / "tables", table_names)
        tmp_vars = paper_dir / (VARIABLES + ".tmp")
        tmp_vars.write_text(
            "# Written by `python -m pythia_attribution.paper assets` from the tables of profile "
            f"{profile!r}; do not edit.\n" + yaml.safe_dump(values, sort_keys=True, allow_unicode=True)
        )
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    final = paper_dir / GENERATED
    if final.exists():
        shutil.rmtree(final)
    part.rename(final)
    tmp_vars.replace(paper_dir / VARIABLES)
    log.info("paper assets for profile %s written in %.1f s", profile, time.perf_counter() - started)
    return values


def render_key(profile: str, paper_dir: Path, results: Path, renderer: str) -> str:
    """What a rendering depends on (``derived.key``): the profile's tables as recorded, this
    module and what it imports, the manuscript's sources, the preview's stylesheet and filter, the
    installed versions, the commit the manuscript prints, and the renderer."""
    from pythia_attribution import derived

    package = Path(str(resources.files("pythia_attribution.paper")))
    files = [paper_dir / name for name in SOURCES] + [
        p for p in package.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    return derived.key(
        results,
        [__name__],
        files,
        profile=profile,
        renderer=renderer,
        build=build_info(profile),
        paths=[str(Path(results).resolve()), str(Path(paper_dir).resolve())],
    )


def rendered_files(paper_dir: Path) -> list[str]:
    from pythia_attribution import derived

    return derived.files_under(paper_dir, OUTPUT, GENERATED, VARIABLES)


ASSET = re.compile(r"_generated/(figures|tables)/([\w-]+)\.(?:svg|png|md)")


def used_assets(manuscript_path: Path) -> tuple[list[str], list[str]]:
    """The figures and tables a manuscript shows (what the assets step draws for it); one it
    names that no code draws is an error naming it."""
    found: dict[str, list[str]] = {"figures": [], "tables": []}
    for kind, name in ASSET.findall(manuscript_path.read_text()):
        known = figures.FIGURES if kind == "figures" else mdtables.TABLES
        if name not in known:
            raise PaperError(
                f"{manuscript_path.name}: no code draws _generated/{kind}/{name} ({kind}: {', '.join(known)})"
            )
        found[kind].append(name)
    return sorted(set(found["figures"])), sorted(set(found["tables"]))


def fill_unavailable(values: dict, manuscript_path: Path) -> None:
    """Give every variable the manuscript quotes that this profile's tables cannot provide the
    value "n/a" (so Quarto and the preview both render), and list it under ``unavailable``.

    A section can lack data (no synthetic ground truth at real scale) or a method (TrackStar needs
    an optimizer state that Pythia does not publish). A variable of a section that does not
    exist at all is still an error (a typo); the tests build the micro-shaped profiles with
    nothing unavailable, so a missing variable there fails.
    """
    missing = values.setdefault("unavailable", {})
    absent: dict[str, list[str]] = {}
    for match in SHORTCODE.finditer(manuscript_path.read_text()):
        if match.group(1) != "var":
            continue
        name = match.group(2).strip()
        keys = name.split(".")
        if keys[0] not in values and keys[0] not in missing:
            continue  # unknown section: expand() reports it
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            if keys[-1] not in node:
                node[keys[-1]] = "n/a"
                missing.setdefault(name, "not in this profile's tables")
                absent.setdefault(keys[0], []).append(name)
    for section, names in absent.items():
        why = missing.get(section, "not in this profile's tables")
        log.warning(
            "paper: %d variable(s) of section '%s' read n/a in %s (%s), e.g. %s",
            len(names), section, manuscript_path.name, why, names[0],
        )  # fmt: skip
    if not missing:
        values.pop("unavailable")


def expand(text: str, values: dict[str, str], base: Path, source: str, depth: int = 0) -> str:
    """Expand Quarto's ``var``, ``meta``-free ``include`` and ``pagebreak`` shortcodes."""
    if depth > 8:
        raise PaperError(f"{source}: includes nested deeper than 8 levels")

    def one(match: re.Match) -> str:
        name, arg = match.group(1), match.group(2).strip()
        line = text.count("\n", 0, match.start()) + 1
        where = f"{source}:{line}"
        if name == "var":
            if arg not in values:
                raise PaperError(f"{where}: unknown variable {arg!r} (not in {VARIABLES})")
            return values[arg]
        if name == "include":
            path = base / arg
            if not path.is_file():
                raise PaperError(f"{where}: included file {arg} does not exist (run the assets step)")
            return expand(path.read_text(), values, path.parent, arg, depth + 1)
        if name == "pagebreak":
            return "\n\\newpage\n"
        raise PaperError(f"{where}: shortcode {name!r} is not supported by the preview")

    return SHORTCODE.sub(one, text)


def _pandoc() -> str:
    try:
        import pypandoc
    except ImportError as exc:  # pragma: no cover - in the lock
        raise PaperError("pypandoc-binary is not installed; `nox -s paper` installs it") from exc
    return pypandoc.get_pandoc_path()


def _run_pandoc(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([_pandoc(), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PaperError(f"pandoc failed ({' '.join(args[-2:])}):\n{proc.stderr.strip()}")


def preview(paper_dir: Path, values: dict | None = None) -> tuple[Path, Path]:
    """Render the manuscript the variables name (``build.manuscript``) to HTML and PDF (typst) in
    ``paper_dir/_output``, named after it; return both paths."""
    import typst

    paper_dir = Path(paper_dir).resolve()
    if values is None:
        var_file = paper_dir / VARIABLES
        if not var_file.is_file():
            raise PaperError(f"{var_file} is missing; run `python -m pythia_attribution.paper assets` first")
        values = yaml.safe_load(var_file.read_text())
    qmd = values.get("build", {}).get("manuscript", MANUSCRIPT)
    stem = Path(qmd).stem
    flat = variables.flatten(values)
    text = expand((paper_dir / qmd).read_text(), flat, paper_dir, qmd)
    out = paper_dir / OUTPUT
    work = paper_dir / (OUTPUT + ".part")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        source = work / f"{stem}.md"
        source.write_text(text)
        pkg = resources.files("pythia_attribution.paper")
        lua, css = (Path(str(pkg / name)) for name in ("crossref.lua", "preview.css"))
        header = paper_dir / TYPST_HEADER
        common = [
            str(source),
            "--from=markdown",
            "--lua-filter",
            str(lua),
            "--citeproc",
            "--lua-filter",
            str(paper_dir / APOSTROPHES),
            "--bibliography",
            str(paper_dir / BIBLIOGRAPHY),
            "--number-sections",
            "--standalone",
            "--fail-if-warnings",
            "--resource-path",
            str(paper_dir),
        ]
        _run_pandoc(
            [
                *common,
                "--toc",
                "--embed-resources",
                "--css",
                str(css),
                "--to=html5",
                "-o",
                str(work / f"{stem}.html"),
            ],
            paper_dir,
        )
        typ = paper_dir / f".{stem}.preview.typ"
        _run_pandoc(
            [*common, "--to=typst", "-V", "papersize=a4", "--include-in-header", str(header), "-o", str(typ)],
            paper_dir,
        )
        try:
            typst.compile(str(typ), output=str(work / f"{stem}.pdf"), root=str(paper_dir))
        except Exception as exc:  # typst raises its own error type with the diagnostics
            raise PaperError(f"typst failed on {typ}:\n{exc}") from exc
        shutil.move(typ, work / f"{stem}.typ")
        source.unlink()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        (paper_dir / f".{stem}.preview.typ").unlink(missing_ok=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out / f"{stem}.html", out / f"{stem}.pdf"


def quarto(profile: str, paper_dir: Path, name: str = MANUSCRIPT) -> None:
    """``quarto render`` of manuscript ``name`` in the paper folder with the Quarto on PATH; the
    project's pre-render step (``python -m pythia_attribution.paper assets``) runs with this
    interpreter and ``profile``."""
    exe = shutil.which("quarto")
    if exe is None:
        raise PaperError(
            "quarto is not on PATH; `python -m pythia_attribution.paper preview` needs no Quarto"
        )
    env = {
        **os.environ,
        "PYTHIA_ATTRIBUTION_PROFILE": profile,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    target = paper_dir / name
    proc = subprocess.run([exe, "render", str(target)], env=env)
    if proc.returncode != 0:
        raise PaperError(f"quarto render {target} failed (exit {proc.returncode}); its messages are above")


# Digits that may appear in the manuscript's own prose: names, not results.
ALLOWED_NUMERALS = frozenset({"BM25", "top-1"})
_NOT_PROSE = [
    re.compile(r"<!--.*?-->", re.S),  # comments
    SHORTCODE,  # {{< var x >}}, {{< include f >}}
    re.compile(r"\{[#.][^}]*\}"),  # attributes: {#fig-x}, {.unnumbered}
    re.compile(r"\]\([^)]*\)"),  # link and image targets
    re.compile(r"(?<![\w@])@[\w:.\-]*\w"),  # citations and cross-references: @key, @fig-x
]


def typed_numbers(text: str) -> list[tuple[int, str]]:
    """(line, word) for every word of prose that holds a digit and is not on the allow-list.

    Variables, includes, attributes, link targets, citations and cross-references are removed
    first (their text is replaced by spaces so that line numbers stay true).
    """
    for pattern in _NOT_PROSE:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for word in re.findall(r"\S*\d\S*", line):
            token = word.strip(".,;:()[]\"'*`").removesuffix("'s")
            if token not in ALLOWED_NUMERALS:
                found.append((lineno, word))
    return found
