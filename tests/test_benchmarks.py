"""Every benchmark script (and ``experiments/planted_copy.py``, ``finetune_seeds.py``,
``replicate.py`` and ``readme_tables.py``) runs, at toy sizes, and prints its figures.

A benchmark is run by hand when its figures are wanted, often long after the code it calls last
changed; ``scale.py`` stopped running when the ranking's interface changed and nothing noticed.
These runs check that each script still works end to end, not its numbers: speed and memory are
what the scripts print, never asserted here. The scripts that read a profile's results run on the
session's nano pipeline; ``gpu_index.py`` runs on the CPU, as its docstring allows.
``slow_cores.sh`` needs root and changes the kernel's scheduling, so it is only parsed and its
usage checked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import EXPERIMENTS, run_experiment

BENCHMARKS = EXPERIMENTS / "benchmarks"


def _run(script: str, *args: str, env: dict | None = None) -> str:
    """Run ``experiments/<script>``, which must succeed; its stdout."""
    return run_experiment(script, *args, env=env).stdout


@pytest.fixture(scope="module")
def nano(nano_run):
    """The nano run's profile and the environment that points the scripts at its results."""
    root = nano_run["root"]
    env = {
        "PYTHIA_ATTRIBUTION_RESULTS": str(root / "results"),
        "PYTHIA_ATTRIBUTION_CACHE": str(root / "world" / "cache"),
    }
    return str(nano_run["profile"]), env


def test_every_script_is_covered():
    covered = {
        "gpu_index.py", "scale.py", "second_moments.py", "attribution.py", "memorization.py",
        "threads.py", "allocator.py", "train_options.py", "stage_times.py", "text_scale.py",
        "corpus_scale.py", "duplication_scale.py", "tail_patch_state.py",
    }  # fmt: skip
    assert {p.name for p in BENCHMARKS.glob("*.py")} == covered
    assert {p.name for p in BENCHMARKS.glob("*.sh")} == {"slow_cores.sh"}


def test_slow_cores_script_parses_and_refuses_an_unknown_command():
    script = str(BENCHMARKS / "slow_cores.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    done = subprocess.run(["bash", script, "begin"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: slow_cores.sh start QUOTA_US" in done.stderr


def test_gpu_index_runs_on_the_cpu():
    out = _run("benchmarks/gpu_index.py", "--models", "tiny", "--sequences", "3", "--paired")
    assert "device: CPU" in out and "pythia-tiny shapes" in out and "bergson index" in out
    # the paired pass's raw index is build_index's, byte for byte, on the CPU (as test_attribute's)
    assert "build_index_pair" in out
    assert "its raw index against build_index's on this device: identical" in out


def test_scale_streams_two_sizes():
    sizes = ["--sizes", "1000", "2000"]
    out = _run("benchmarks/scale.py", *sizes, "--queries", "3", "--sample", "100", "--k", "5")
    lines = [line.split() for line in out.splitlines()]
    assert [row[0] for row in lines if row and row[0].isdigit()] == ["1000", "2000"]
    assert "2x the rows" in out


def test_text_scale_measures_two_sizes():
    toy = ["--sizes", "200", "400", "--words", "50", "--queries", "3", "--k", "5"]
    out = _run("benchmarks/text_scale.py", *toy)
    lines = [line.split() for line in out.splitlines()]
    assert [row[0] for row in lines if row and row[0].isdigit()] == ["200", "400"]
    assert "per candidate, from 200 to 400 rows" in out and "carried to 10^6 candidates" in out


def test_corpus_scale_measures_both_ways_and_compares_their_tables():
    out = _run("benchmarks/corpus_scale.py", "--sizes", "40", "80", "--chunk", "16", "--vocab", "300")
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["40", "80"]
    assert all(row[-1] == "yes" for row in rows)  # the streamed table is the one built whole
    assert "per candidate, from 40 to 80 rows: stream" in out and "carried to 10^6 candidates" in out


def test_duplication_scale_counts_both_ways_alike():
    args = ["--sizes", "30", "60", "--chunk", "5000", "--repeated", "0.5"]
    out = _run("benchmarks/duplication_scale.py", *args)
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["30", "60"]
    assert all(row[-1] == "yes" for row in rows)  # streamed = Counter, grouped = every window queried
    assert "per candidate, from 30 to 60 rows: stream" in out and "near" in out


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("second_moments.py", ["--batches", "2", "--sample", "4"], "row cosine"),
        ("tail_patch_state.py", ["--behaviors", "2"], "ranking estimated"),
        ("attribution.py", ["--sequences", "8"], "passes"),
        ("memorization.py", ["--rounds", "1"], "ratio test/forward"),
        ("threads.py", ["--threads", "1", "--steps", "1", "--rounds", "1"], "threads=1"),
        ("allocator.py", ["--rounds", "1", "--steps", "1", "--sequences", "8"], "peak resident memory"),
        ("train_options.py", ["--steps", "1", "--rounds", "1", "--variants", "active"], "active"),
        ("stage_times.py", ["--stages", "corpus", "train"], "peak (GiB)"),
    ],
)
def test_profile_benchmarks_run_on_nano(nano, script, args, expected):
    profile, env = nano
    out = _run(f"benchmarks/{script}", "--profile", profile, *args, env=env)
    assert expected in out
    if script == "train_options.py":  # the baseline runs whether or not it is asked for
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
        assert rows["baseline"][2] == "1.00" and rows["active"][2] != "nan"


def test_finetune_seeds_reproduces_the_stage_and_varies_the_order(nano):
    """The profile seed's order is the causal stage's own fine-tuning, behavior by behavior; the
    next seed's is another order of the same selections."""
    profile, env = nano
    out = _run("finetune_seeds.py", "--profile", profile, "--orders", "2", env=env)
    assert "order 1234 identical to the causal stage's table, behavior by behavior: yes" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("trackstar ")]
    assert rows and all(len(row) == 7 for row in rows)  # method, two orders, mean, sd, two ranks
    assert any(row[1] != row[2] for row in rows)  # a second order is a different run
    assert "Spearman between two orders' rankings, mean" in out


def test_replicate_of_one_folder_with_itself_agrees_everywhere(nano, nano_run):
    """The same tables twice: every criterion's two method orders are one (Spearman 1.00), and a
    printed figure is the table's own."""
    import polars as pl

    from pythia_attribution import paths, tables

    _, env = nano
    folder = str(nano_run["results"])
    out = _run("replicate.py", "--profiles", "nano", "nano", "--folders", folder, folder, env=env)
    summary = out.split("method orders, by criterion:")[1].strip().splitlines()
    rhos = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in summary}
    assert {"tracing (complete)", "tail-patch"} <= rhos.keys()
    assert set(rhos.values()) == {"1.00"}, rhos
    metrics = pl.from_arrow(
        tables.read_table(
            paths.table_path(nano_run["results"] / paths.ATTRIBUTE, paths.TRACING_METRICS_TABLE)
        )
    )
    final = metrics["checkpoint"].max()
    row = metrics.filter(
        (pl.col("method") == "trackstar")
        & (pl.col("truth") == "complete")
        & (pl.col("family") == "all")
        & (pl.col("checkpoint") == final)
    ).row(0, named=True)
    line = next(x for x in out.splitlines() if x.split()[:2] == ["trackstar", "complete"])
    assert f"{row['mrr']:.3f} [{row['mrr_lo']:.3f}, {row['mrr_hi']:.3f}]" in line

    # three profiles: one column per profile, one Spearman per pair
    three = _run("replicate.py", "--profiles", "a", "b", "c", "--folders", folder, folder, folder, env=env)
    line = next(x for x in three.splitlines() if x.split()[:2] == ["trackstar", "complete"])
    assert line.count(f"{row['mrr']:.3f} [") == 3, line
    summary = three.split("method orders, by criterion\n")[1].strip().splitlines()
    assert summary[0].split() == ["a", "~", "b", "a", "~", "c", "b", "~", "c"]
    tail_patch = next(x for x in summary if x.strip().startswith("tail-patch"))
    assert tail_patch.split()[1:] == ["1.00"] * 3, tail_patch


def test_planted_copy_prints_every_methods_rank(nano):
    profile, env = nano
    out = _run("planted_copy.py", "--profile", profile, env=env)
    lines = [line for line in out.splitlines() if "rank per query" in line]
    ranks = {line.split()[0]: line.split(":")[1].split() for line in lines}
    assert {"trackstar_noadam", "grad_cosine", "bm25"} <= ranks.keys()
    assert ranks["trackstar_noadam"] == ["1"] * len(ranks["trackstar_noadam"])


def _excerpt(results: Path) -> str:
    """The README's three result tables as the README prints them, from a results folder."""
    import polars as pl

    from pythia_attribution import paths, tables

    def frame(stage: str, table: str) -> pl.DataFrame:
        return pl.from_arrow(tables.read_table(paths.table_path(results / stage, table)))

    def ci(r: dict, column: str, d: int) -> str:
        return f"{r[column]:.{d}f} [{r[f'{column}_lo']:.{d}f}, {r[f'{column}_hi']:.{d}f}]"

    tracing = frame(paths.ATTRIBUTE, paths.TRACING_METRICS_TABLE)
    tracing = tracing.filter(
        (pl.col("family") == "all") & (pl.col("checkpoint") == pl.col("checkpoint").max())
    )
    mrr = {(r["method"], r["truth"]): r["mrr"] for r in tracing.iter_rows(named=True)}
    lines = [
        "| method | truth | MRR | recall@10 | precision@10 | top-1 is a source |",
        "|---|---|---|---|---|---|",
    ]
    for r in tracing.sort("method", "truth").iter_rows(named=True):
        lines.append(f"| {r['method']} | {r['truth']} | {ci(r, 'mrr', 3)} | {ci(r, 'recall_at_10', 3)} | "
                     f"{r['precision_at_10']:.3f} | {r['top1_hit']:.3f} |")  # fmt: skip
    lines += ["", "| top 10 of | effect | share that raise it | MRR |", "|---|---|---|---|"]
    for r in (
        frame(paths.CAUSAL, paths.TAIL_PATCH_METRICS_TABLE)
        .filter(pl.col("family") == "all")
        .iter_rows(named=True)
    ):
        reference = r["method"] == "ground_truth"
        label = f"complete ground-truth copies ({r['n_behaviors']} behaviors)" if reference else r["method"]
        truths = ("partial", "complete", "target")
        trio = "(reference)" if reference else " / ".join(f"{mrr[r['method'], t]:.3f}" for t in truths)
        lines.append(f"| {label} | {ci(r, 'effect', 4)} | {100 * r['positive']:.1f}% | {trio} |")
    select = frame(paths.CAUSAL, paths.FINETUNE_METRICS_TABLE)
    families = select["family"].unique(maintain_order=True).to_list()
    lines += ["", "| selection | " + " | ".join(f"{f}: copies | probe | paraphrase" for f in families) + " |",
              "|---|" + "---|---|---|" * len(families)]  # fmt: skip
    for method in select["method"].unique(maintain_order=True).to_list():
        cells = ["complete copies (a random k)" if method == "ground_truth" else method]
        for family in families:
            of = select.filter((pl.col("family") == family) & (pl.col("method") == method))
            rows = {r["prompt_kind"]: r for r in of.iter_rows(named=True)}
            original, paraphrase = rows["original"], rows["paraphrase"]
            cells += [f"{original['n_selected_truth']}/{original['n_selected']}",
                      ci(original, "delta_logp", 2), ci(paraphrase, "delta_logp", 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_readme_tables_checks_every_figure_and_names_a_changed_one(nano, tmp_path):
    profile, env = nano
    results = Path(env["PYTHIA_ATTRIBUTION_RESULTS"]) / "nano"
    readme = tmp_path / "README.md"
    text = _excerpt(results)
    readme.write_text("Prose.\n\n" + text, encoding="utf-8")
    out = _run("readme_tables.py", "--results", str(results), "--readme", str(readme), env=env)
    reports = [line for line in out.splitlines() if "figures checked" in line]
    assert len(reports) == 3 and all(line.endswith(", 0 mismatches") for line in reports), out
    assert all(int(line.split(" figures")[0].split()[-1]) > 0 for line in reports), out

    # one figure off by one unit of its last digit, and a row for a method the tables do not hold
    first = next(line for line in text.splitlines() if line.startswith("| ") and "[" in line)
    cells = first.split(" | ")
    value = cells[2].split()[0]
    changed = f"{float(value) + 0.001:.3f}"
    bad = text.replace(first, first.replace(f"| {value} [", f"| {changed} [", 1), 1)
    bad = bad.replace("| bm25 | partial |", "| bm25_typo | partial |", 1)
    readme.write_text(bad, encoding="utf-8")
    args = ("--results", str(results), "--readme", str(readme))
    done = run_experiment("readme_tables.py", *args, env=env, returncode=1)
    label = f"{cells[0].strip('| ')} / {cells[1]}"
    assert f"MISMATCH tracing, {label}, column 3 ('{changed} [" in done.stdout, done.stdout
    assert "MISMATCH tracing, bm25_typo / partial: no such row in the results" in done.stdout, done.stdout
