"""``verify``: are a profile's results what their records say, and do the records chain?

For every stage of the graph: each recorded output still matches (size and sha256; large binary
files by their stamp unless ``full``), each table's embedded provenance names the record's
fingerprint and inputs, the inputs recorded equal the upstream stage's current outputs (the
provenance chain), and the fingerprint still matches the profile and code (else: stale).

``compare`` checks the determinism guarantee between two results folders of one profile: the
same files, tables equal apart from their volatile fields, every other file byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pythia_attribution import derived, outputs, paths, stage, tables
from pythia_attribution.config import Profile
from pythia_attribution.errors import CorruptOutputError, MissingInputError

RECORD_VOLATILE = ("seconds", "peak_rss_mib", "git_commit", "git_dirty")


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: int = 0

    def ok(self, text: str) -> None:
        self.lines.append(f"ok      {text}")

    def note(self, text: str) -> None:
        self.lines.append(f"note    {text}")

    def fail(self, text: str) -> None:
        self.problems += 1
        self.lines.append(f"FAIL    {text}")


def verify(profile: Profile, full: bool = False) -> Report:
    report = Report()
    for name in (*paths.STAGES, *paths.OPTIONAL_STAGES):
        _verify_stage(profile, name, full, report)
    return report


def _verify_stage(profile: Profile, name: str, full: bool, report: Report) -> None:
    root = paths.stage_dir(profile.name, name)
    part = paths.partial_dir(profile.name, name)
    if part.exists():
        report.note(f"{name}: {part} is left from an interrupted run (the next run removes it)")
    set_aside = paths.set_aside_dir(root)
    if set_aside.exists():
        report.note(
            f"{name}: {set_aside} holds outputs set aside by an interrupted run (the next run "
            + ("removes it)" if root.exists() else "puts them back)")
        )
    record = stage.read_record(profile.name, name)
    if record is None:
        if root.exists():
            report.fail(
                f"{name}: {root} has no readable {paths.STAGE_RECORD} (damaged, or written by an older "
                f"version of the package); `{paths.session(name, profile.name)}` recomputes it"
            )
        else:
            report.note(f"{name}: not run")
        return
    before = report.problems
    recorded = record["outputs"]
    for problem in outputs.check_all(root, recorded, full):
        report.fail(f"{name}: {problem}")
    for rel in recorded:
        if outputs.is_table(rel) and (root / rel).is_file():
            _check_provenance(name, root / rel, record, report)
    spec = stage.SPECS[name]
    for up in spec.upstream:
        up_record = stage.read_record(profile.name, up)
        if up_record is None:
            report.fail(
                f"{name}: its upstream stage '{up}' has no record (it was removed or never completed)"
            )
            return
        elif record["inputs"].get(up) != outputs.digests(up_record["outputs"]):
            report.fail(
                f"{name}: the outputs of '{up}' it was computed from are not the current ones "
                f"('{up}' was recomputed with a different result since); rerun "
                f"`{paths.session(name, profile.name)}`"
            )
    try:
        current, _ = stage.fingerprint(profile, spec)
    except MissingInputError as exc:
        report.fail(f"{name}: {exc}")
        return
    if current != record["fingerprint"]:
        report.fail(
            f"{name}: stale: the profile's config, behavior/method files or the stage's code changed "
            f"since it ran; `{paths.session(name, profile.name)}` recomputes it"
        )
    if report.problems == before:
        how = "size, sha256" if full else "size, sha256; stamps for files over 64 MiB"
        report.ok(f"{name}: {len(recorded)} files match their record ({how}); inputs and fingerprint current")


def _check_provenance(name: str, path: Path, record: dict, report: Report) -> None:
    try:
        prov = tables.provenance(path)
    except CorruptOutputError as exc:
        report.fail(f"{name}: {exc}")
        return
    for key in ("fingerprint", "inputs", "stage", "profile"):
        if prov.get(key) != record.get(key):
            report.fail(f"{name}: {path.name}'s embedded provenance has a different '{key}' than the record")
            return


def compare(a: Path, b: Path, stages: tuple[str, ...] | None = None) -> list[str]:
    """Differences between two results folders of one profile (only ``stages``' folders, if
    given), volatile fields aside."""
    diffs = []
    files_a = {str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()}
    files_b = {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()}
    ignored = {
        "/".join(p.parts)
        for p in map(Path, files_a | files_b)
        if _ignored(p) or (stages is not None and p.parts[0] not in stages)
    }
    diffs += _only_in_one(a, files_a, b, files_b, ignored)
    for rel in sorted((files_a & files_b) - ignored):
        pa_, pb_ = a / rel, b / rel
        parts = Path(rel).parts
        if len(parts) == 2 and parts[1] == paths.STAGE_RECORD:
            ra, rb = (json.loads(p.read_text()) for p in (pa_, pb_))
            # a table's bytes (size, sha256) include its volatile fields; its digest does not
            ra["outputs"], rb["outputs"] = outputs.digests(ra["outputs"]), outputs.digests(rb["outputs"])
            keys = sorted(k for k in set(ra) | set(rb) if k not in RECORD_VOLATILE and ra.get(k) != rb.get(k))
            if keys:
                diffs.append(f"{rel}: differs in {', '.join(keys)}")
        elif parts[-1] == derived.EXPLORER_STAMP:
            # a build stamp: its key covers the code and the commit; the files it lists are
            # compared one by one above and below, so only its list of them (by digest) counts
            sa, sb = (outputs.digests(json.loads(p.read_text())["outputs"]) for p in (pa_, pb_))
            if sa != sb:
                diffs.append(f"{rel}: lists other files or other contents")
        elif len(parts) == 2 and outputs.is_table(parts[1]):
            why = _table_difference(pa_, pb_)
            if why:
                diffs.append(f"{rel}: {why}")
        elif tables.sha256_file(pa_) != tables.sha256_file(pb_):
            diffs.append(f"{rel}: bytes differ")
    return diffs


def _only_in_one(a: Path, files_a: set[str], b: Path, files_b: set[str], ignored: set[str]) -> list[str]:
    """The files one folder has and the other lacks; a top-level folder the other lacks entirely
    (a stage run in one only, e.g. leave_out and its retrained models) is one line with its count
    of files, not a line per file."""
    tops_a, tops_b = ({Path(r).parts[0] for r in files} for files in (files_a, files_b))
    lines: dict[str, str] = {}
    whole: dict[tuple[str, Path], int] = {}
    for rel in sorted((files_a ^ files_b) - ignored):
        side, other_tops = (a, tops_b) if rel in files_a else (b, tops_a)
        top = Path(rel).parts[0]
        if top != rel and top not in other_tops:
            whole[(top, side)] = whole.get((top, side), 0) + 1
        else:
            lines[rel] = f"{rel}: only in {side}"
    for (top, side), count in whole.items():
        lines[top + "/"] = f"{top}/: only in {side} ({count} file{'s' if count > 1 else ''})"
    return [lines[key] for key in sorted(lines)]


def _ignored(rel: Path) -> bool:
    """The lock, the world's Hub cache bookkeeping and interrupted runs are not results."""
    return rel.name.startswith(".lock") or rel.parts[0].endswith(".part") or rel.parts[0] == "logs"


def _table_difference(a: Path, b: Path) -> str | None:
    """How two tables differ: their provenance (volatile keys aside) and their values (volatile
    columns aside), both compared, since runs of two commits differ in provenance and the
    question then is whether the values moved; None when neither differs."""
    ta, tb = tables.read_table(a), tables.read_table(b)
    prov_a, prov_b = (tables.stable_provenance(tables.provenance(t)) for t in (ta, tb))
    keys = sorted(k for k in set(prov_a) | set(prov_b) if prov_a.get(k) != prov_b.get(k))
    values = _value_difference(ta, tb)
    if not keys:
        return values
    return f"provenance differs in {', '.join(keys)}; {values or 'values identical'}"


def _value_difference(ta: pa.Table, tb: pa.Table) -> str | None:
    volatile = tables.volatile_columns(ta.schema)
    ta, tb = (t.drop_columns(volatile).replace_schema_metadata(None) for t in (ta, tb))
    if ta.schema != tb.schema:
        return "schemas differ"
    if len(ta) != len(tb):
        return f"{len(ta)} rows against {len(tb)}"
    cols = [c for c in ta.column_names if not _same_values(ta[c], tb[c])]
    return f"values differ in {', '.join(cols)}" if cols else None


def _same_values(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Two columns of one type hold the same values, a NaN equal to a NaN in the same place (Arrow's
    own equality says NaN != NaN, so an undefined statistic, e.g. a tail exponent fitted to one
    score, made two identical runs differ); nulls must fall in the same places. Lists are compared
    by their lengths and then their values, so NaNs inside them count the same way."""
    if a.equals(b):
        return True
    if not a.is_null().equals(b.is_null()):
        return False
    kind = a.type
    if pa.types.is_floating(kind):
        x, y = (c.to_numpy(zero_copy_only=False) for c in (a, b))  # a null reads as NaN, in both
        return bool(np.array_equal(x, y, equal_nan=True))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if not pc.list_value_length(a).equals(pc.list_value_length(b)):
            return False
        return _same_values(pc.list_flatten(a), pc.list_flatten(b))
    return False
