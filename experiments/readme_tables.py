"""Check the README's result tables against a profile's results, every figure at the precision
it is printed with.

    python experiments/readme_tables.py [--results results/micro] [--readme README.md]

The README quotes the study's tables as Markdown tables: tracing (the attribute stage's
``tracing_metrics.arrow``, every behavior, the final checkpoint), tail-patch (the causal stage's
``tail_patch_metrics.arrow``, every behavior) and select-and-fine-tune (the causal stage's
``select_finetune_metrics.arrow``). Each README row is matched to its table row by the method
(and, for tracing, the truth definition) it names, and every number in each cell is compared
with the value it stands for: a figure printed with d decimals matches when it is within half a
unit of its last digit of the table's value (a percentage, of 100 times it). Prints one line per
table (rows and figures checked) and one line per mismatch, naming the row, the column and what
the table holds; exits 1 on any mismatch, or when a README row names no table row.

The cold runs are compared with each other table by table; this compares the README with them.
Without it one README row (``trackstar_est``'s capitals in the select-and-fine-tune table) went
unreproduced from ``32ea426`` to ``d743f43``. Run it after ``nox -s all`` on the default profile,
and after editing the README's figures. The leave-k-out table (``nox -s leave_out``, its own
session) is checked when its tables exist: every removal's row but its training seconds, and the
further random draws' means, paired differences and ranks.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import polars as pl

from pythia_attribution import paths, tables
from pythia_attribution.attribute.methods import REFERENCE

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def figures(cell: str) -> list[tuple[float, int]]:
    """Each number printed in a Markdown cell: its value and its number of decimals."""
    out = []
    for text in NUMBER.findall(cell):
        plain = text.replace(",", "")
        out.append((float(plain), len(plain.split(".")[1]) if "." in plain else 0))
    return out


def agrees(printed: float, decimals: int, value: float) -> bool:
    """Whether ``value`` rounds to ``printed`` at ``decimals`` (either way at an exact half)."""
    return abs(printed - value) <= 0.5 * 10.0**-decimals + 1e-9


def markdown_rows(readme: str, header: str) -> list[list[str]]:
    """The cells of each body row of the README's Markdown table whose header line starts with
    ``header``; empty when there is none."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        return []
    rows = []
    for line in lines[start + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def read(results: Path, stage: str, table: str) -> pl.DataFrame | None:
    path = paths.table_path(results / stage, table)
    return pl.from_arrow(tables.read_table(path)) if path.exists() else None


def one(frame: pl.DataFrame, **where) -> dict | None:
    """The frame's only row with these column values, or None."""
    for column, value in where.items():
        frame = frame.filter(pl.col(column) == value)
    return frame.row(0, named=True) if frame.height == 1 else None


def interval(row: dict, column: str) -> list[float]:
    return [row[column], row[f"{column}_lo"], row[f"{column}_hi"]]


class Check:
    """Compares README rows with the values they stand for, and keeps the count and the misses."""

    def __init__(self, name: str):
        self.name, self.rows, self.figures, self.misses = name, 0, 0, []

    def row(self, label: str, cells: list[str], expected: list[list[float] | None]) -> None:
        """``expected``: per cell, the values of its numbers in order (None: not checked)."""
        self.rows += 1
        for column, (cell, values) in enumerate(zip(cells, expected, strict=False), start=1):
            if values is None:
                continue
            printed = figures(cell)
            shown = " / ".join(f"{v:.{max(d for _, d in printed) if printed else 3}f}" for v in values)
            if len(printed) != len(values):
                self.misses.append(f"{label}, column {column} ('{cell}'): {len(values)} figures expected, "
                                   f"the table holds {shown}")  # fmt: skip
                continue
            self.figures += len(values)
            if not all(agrees(p, d, v) for (p, d), v in zip(printed, values, strict=True)):
                self.misses.append(f"{label}, column {column} ('{cell}'): the table holds {shown}")

    def unmatched(self, label: str) -> None:
        self.misses.append(f"{label}: no such row in the results")

    def report(self) -> bool:
        print(f"{self.name}: {self.rows} rows, {self.figures} figures checked, {len(self.misses)} mismatches")
        for miss in self.misses:
            print(f"  MISMATCH {self.name}, {miss}")
        return not self.misses


def at_final(tracing_metrics: pl.DataFrame) -> pl.DataFrame:
    """The tracing metrics the README quotes: every behavior, the final checkpoint."""
    return tracing_metrics.filter(
        (pl.col("family") == "all") & (pl.col("checkpoint") == pl.col("checkpoint").max())
    )


def tracing(readme: str, final: pl.DataFrame) -> Check:
    check = Check("tracing")
    method = ""
    for cells in markdown_rows(readme, "| method | truth | MRR |"):
        method = cells[0] or method
        r = one(final, method=method, truth=cells[1])
        if r is None:
            check.unmatched(f"{method} / {cells[1]}")
            continue
        expected = [None, None, interval(r, "mrr"), interval(r, "recall_at_10"), [r["precision_at_10"]],
                    [r["top1_hit"]]]  # fmt: skip
        check.row(f"{method} / {cells[1]}", cells, expected)
    return check


def tail_patch(readme: str, metrics: pl.DataFrame, final: pl.DataFrame) -> Check:
    check = Check("tail-patch")
    everything = metrics.filter(pl.col("family") == "all")
    for cells in markdown_rows(readme, "| top 10 of | effect |"):
        method = REFERENCE if cells[0].startswith("complete ground-truth copies") else cells[0]
        r = one(everything, method=method)
        if r is None:
            check.unmatched(cells[0])
            continue
        mrr = [one(final, method=method, truth=t) for t in ("partial", "complete", "target")]
        label = [r["n_behaviors"]] if method == REFERENCE else None  # "(84 behaviors)"
        expected = [label, interval(r, "effect"), [100 * r["positive"]],
                    [m["mrr"] for m in mrr] if all(mrr) else None]  # fmt: skip
        check.row(cells[0], cells, expected)
    return check


def select_finetune(readme: str, metrics: pl.DataFrame) -> Check:
    check = Check("select-and-fine-tune")
    families = metrics["family"].unique(maintain_order=True).to_list()
    for cells in markdown_rows(readme, "| selection | "):
        method = REFERENCE if cells[0].startswith("complete copies") else cells[0]
        expected: list[list[float] | None] = [None]
        for family in families:
            rows = [
                one(metrics, family=family, method=method, prompt_kind=k) for k in ("original", "paraphrase")
            ]
            if not all(rows):
                break
            expected += [[rows[0]["n_selected_truth"], rows[0]["n_selected"]],
                         interval(rows[0], "delta_logp"), interval(rows[1], "delta_logp")]  # fmt: skip
        else:
            check.row(cells[0], cells, expected)
            continue
        check.unmatched(cells[0])
    return check


def leave_out(readme: str, metrics: pl.DataFrame, runs: pl.DataFrame, changes: pl.DataFrame) -> Check:
    """The leave-k-out table: each removal's row (its training seconds, volatile, not checked), and
    the further random draws' row (their means, paired differences and ranks; its ranges not)."""
    check = Check("leave-k-out")
    everything = {r["run"]: r for r in metrics.filter(pl.col("family") == "all").iter_rows(named=True)}
    removed = {r["run"]: r for r in runs.iter_rows(named=True)}
    medians = dict(changes.group_by("run").agg(pl.col("delta_logp").median()).iter_rows())
    draws = sorted(
        (r for r in removed if removed[r]["floor"] and r != "random"), key=lambda r: int(r.split("_")[-1])
    )
    for cells in markdown_rows(readme, "| removed | sequences (training rows) |"):
        label = cells[0]
        if label.startswith("random draws"):
            if not draws:
                check.unmatched(label)
                continue
            rows = [everything[d] for d in draws]
            means, paired = [r["delta_logp"] for r in rows], [r["vs_random"] for r in rows]
            ranks = [*(r["random_costlier_than"] for r in rows), rows[0]["random_runs"]]
            expected = [None, None, means, None, None, paired, ranks, None]
            check.row(label, cells, expected)
            continue
        run = REFERENCE if "complete copies" in label else label.split("'s top")[0]
        r = everything.get(run)
        if r is None or run not in removed:
            check.unmatched(label)
            continue
        sizes = [removed[run]["n_removed"], removed[run]["n_rows_removed"]]
        lost = [r["lost"] * r["n_behaviors"], r["n_behaviors"]]
        paired = None if run == "random" else interval(r, "vs_random")  # the floor's own row: blank
        ranks = [r["random_costlier_than"], r["random_runs"]]
        expected = [None, sizes, interval(r, "delta_logp"), [medians[run]], lost, paired, ranks, None]
        check.row(label, cells, expected)
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--results", type=Path, default=Path("results/micro"), help="a profile's results folder"
    )
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    tracing_metrics = read(args.results, paths.ATTRIBUTE, paths.TRACING_METRICS_TABLE)
    if tracing_metrics is None:
        sys.exit(f"{args.results}: no attribute stage results (run `nox -s all` first)")
    final = at_final(tracing_metrics)
    done = [tracing(readme, final)]
    tail = read(args.results, paths.CAUSAL, paths.TAIL_PATCH_METRICS_TABLE)
    if tail is not None:
        done.append(tail_patch(readme, tail, final))
    select = read(args.results, paths.CAUSAL, paths.FINETUNE_METRICS_TABLE)
    if select is not None:
        done.append(select_finetune(readme, select))
    lo = [read(args.results, paths.LEAVE_OUT, t) for t in (paths.LEAVE_OUT_METRICS_TABLE,
          paths.LEAVE_OUT_RUNS_TABLE, paths.LEAVE_OUT_TABLE)]  # fmt: skip
    if all(t is not None for t in lo):
        done.append(leave_out(readme, *lo))
    ok = [check.report() for check in done]
    if not any(check.rows for check in done):
        print(f"{args.readme}: none of the result tables found")
        return 1
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
