"""The paper's only input: the Arrow tables of one profile, with their provenance.

Nothing here imports torch or bergson; the paper can be rebuilt anywhere pyarrow and polars run.
A missing table stops the build with the session that writes it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from pythia_attribution import paths, tables
from pythia_attribution.errors import MissingInputError

# every table the paper reads, with the stage (nox session) that writes it
NEEDED: dict[str, str] = {
    paths.CORPUS_TABLE: paths.CORPUS,
    paths.DOCUMENTS_TABLE: paths.CORPUS,
    paths.GROUND_TRUTH_TABLE: paths.CORPUS,
    paths.TRAINING_LOG_TABLE: paths.TRAIN,
    paths.CHECKPOINTS_TABLE: paths.TRAIN,
    paths.PROBES_TABLE: paths.PROBE,
    paths.PROBE_SUMMARY_TABLE: paths.PROBE,
    paths.ATTRIBUTIONS_TABLE: paths.ATTRIBUTE,
    paths.LAYER_SCORES_TABLE: paths.ATTRIBUTE,
    paths.SCORE_SUMMARY_TABLE: paths.ATTRIBUTE,
    paths.TRACING_TABLE: paths.ATTRIBUTE,
    paths.TRACING_METRICS_TABLE: paths.ATTRIBUTE,
    paths.SKIPPED_TABLE: paths.ATTRIBUTE,
    paths.DUPLICATES_TABLE: paths.DUPLICATES,
    paths.COMPOSITION_TABLE: paths.DUPLICATES,
    paths.MEMORIZATION_SUMMARY_TABLE: paths.MEMORIZATION,
    paths.MEMORIZATION_BY_DUP_TABLE: paths.MEMORIZATION,
    paths.MEMORIZED_COMPOSITION_TABLE: paths.MEMORIZATION,
    paths.MEMORIZED_ATTRIBUTION_TABLE: paths.MEMORIZATION,
    paths.DUPLICATION_TABLE: paths.MEMORIZATION,
    paths.CANARY_MEMORIZATION_TABLE: paths.MEMORIZATION,
    paths.CANARY_ATTRIBUTION_TABLE: paths.MEMORIZATION,
    paths.TAIL_PATCH_TABLE: paths.CAUSAL,
    paths.TAIL_PATCH_METRICS_TABLE: paths.CAUSAL,
    paths.FINETUNE_METRICS_TABLE: paths.CAUSAL,
    paths.TOKENWISE_TABLE: paths.ANALYSES,
    paths.LAYER_THIRDS_SUMMARY_TABLE: paths.ANALYSES,
    paths.WORD_ORDER_METRICS_TABLE: paths.ANALYSES,
    paths.WORD_ORDER_TABLE: paths.ANALYSES,
}
# tables the paper uses when they were written: by stages outside `all`, or by one source only
OPTIONAL: dict[str, str] = {
    paths.EVALS_RESCORE_TABLE: paths.MEMORIZATION,  # memorization.source = "memorized-evals"
    paths.LEAVE_OUT_TABLE: paths.LEAVE_OUT,
    paths.LEAVE_OUT_RUNS_TABLE: paths.LEAVE_OUT,
    paths.LEAVE_OUT_METRICS_TABLE: paths.LEAVE_OUT,
}


class Study:
    """The tables of one profile's results folder, read lazily and once."""

    def __init__(self, results: Path, profile: str):
        self.results = Path(results)
        self.profile = profile
        if not self.results.is_dir():
            raise MissingInputError(
                f"no results for profile {profile!r} at {self.results}; run `nox -s all -- --profile "
                f"{profile}` first"
            )

    def has(self, table: str) -> bool:
        """Whether a table (of NEEDED or OPTIONAL) was written for this profile."""
        stage = NEEDED.get(table) or OPTIONAL[table]
        return paths.table_path(self.results / stage, table).is_file()

    def path(self, table: str) -> Path:
        stage = NEEDED.get(table) or OPTIONAL[table]
        path = paths.table_path(self.results / stage, table)
        if not path.is_file():
            raise MissingInputError(
                f"the paper needs {path}, which is missing; run `{paths.session(stage, self.profile)}` (or "
                f"`{paths.session('all', self.profile)}`) first"
            )
        return path

    def check_all(self) -> None:
        """Fail before any figure is drawn if a table is missing (naming the first one)."""
        for table in NEEDED:
            self.path(table)

    @functools.cache  # noqa: B019 - one Study per build; the cache is the point
    def frame(self, table: str, columns: tuple[str, ...] | None = None) -> pl.DataFrame:
        with pa.memory_map(str(self.path(table)), "r") as source:
            data = ipc.open_file(source).read_all()
        if columns is not None:
            data = data.select(list(columns))
        return pl.from_arrow(data)

    @functools.cache  # noqa: B019
    def provenance(self, table: str) -> dict:
        return tables.provenance(self.path(table))

    def config(self, table: str, section: str) -> dict:
        """A config section as recorded in the table that was made with it."""
        return self.provenance(table)["config"][section]

    def commits(self) -> dict[str, str]:
        """Stage -> the git commit (and a dirty mark) of the code that wrote its tables."""
        out = {}
        present = {t: s for t, s in OPTIONAL.items() if self.has(t)}
        for table, stage in {**NEEDED, **present}.items():
            prov = self.provenance(table)
            commit = prov.get("git_commit", "unknown")
            out.setdefault(stage, commit + ("+dirty" if prov.get("git_dirty") else ""))
        return out
