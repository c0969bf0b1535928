"""The explorer: a static HTML site of the influential training sequences, built from the tables.

``python -m pythia_attribution explorer --profile P`` (``nox -s explorer``; ``nox -s paper`` builds
it too) writes ``results/<profile>/explorer/``: ``index.html`` with the tracing, causal and
analyses tables and every attributed behavior, and one page per behavior with its prompt, target,
greedy completion and learning curve, and each method's top k side by side (rank, score,
duplicate category, ground-truth mark, the steps that trained the sequence), the sequence's tokens
shaded by their influence where the analyses stage split its score. Everything is in the HTML
(no CDN, no fetch): the core content reads without JavaScript; a few lines of inline script add
the filters (family on the index; method and category on a behavior page). The site is written to
a ``.part`` folder and renamed into place, so a failed build leaves the previous one whole.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pythia_attribution import derived, paths, tables
from pythia_attribution.attribute.candidates import TRUTHS, load_candidates, truth_sets
from pythia_attribution.attribute.methods import REFERENCE
from pythia_attribution.errors import MissingInputError

log = logging.getLogger(__name__)
SHOWN = 10  # top sequences shown per method on a behavior page
CATEGORY_ORDER = ("exact", "near_duplicate", "thematic", "unrelated")


def _table(results: Path, stage: str, table: str, required: bool = True):
    path = paths.table_path(results / stage, table)
    if not path.is_file():
        if required:
            raise MissingInputError(
                f"the explorer needs {path}, which is missing; run "
                f"`{paths.session(stage, results.name)}` (or `{paths.session('all', results.name)}`) first"
            )
        return None
    return tables.read_table(path).to_pandas()


def slug(behavior_id: str) -> str:
    """A file name for a behavior page: its id with every run of unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", behavior_id).strip("_") + ".html"


def slugs(behavior_ids) -> dict[str, str]:
    """Each behavior's page file: its :func:`slug`, unless that is empty (an id of non-ASCII text
    only) or shared with another id ('style/a' and 'style_a'), when the id's hash is added, so no
    page overwrites another."""
    ids = sorted(set(behavior_ids))
    base = {b: slug(b) for b in ids}
    taken = Counter(base.values())
    return {
        b: name
        if name != ".html" and taken[name] == 1
        else f"{name[: -len('.html')]}-{hashlib.sha256(b.encode()).hexdigest()[:10]}.html".lstrip("-")
        for b, name in base.items()
    }


def _shown(folder: Path) -> str:
    """The results folder as the index names it: relative to the working directory when inside it
    (``results/micro`` from the project root), so that two clones write the same page."""
    folder = folder.resolve()
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def build(results: Path, out: Path) -> Path:
    """Write the site for one profile's results folder into ``out`` (replaced whole)."""
    from transformers import AutoTokenizer

    probes = _table(results, paths.PROBE, paths.PROBES_TABLE)
    attributions = _table(results, paths.ATTRIBUTE, paths.ATTRIBUTIONS_TABLE)
    dups = _table(results, paths.DUPLICATES, paths.DUPLICATES_TABLE)
    tracing = _table(results, paths.ATTRIBUTE, paths.TRACING_METRICS_TABLE)
    ckpts = _table(results, paths.TRAIN, paths.CHECKPOINTS_TABLE)
    causal = _table(results, paths.CAUSAL, paths.TAIL_PATCH_METRICS_TABLE, required=False)
    finetuned = _table(results, paths.CAUSAL, paths.FINETUNE_METRICS_TABLE, required=False)
    left_out = _table(results, paths.LEAVE_OUT, paths.LEAVE_OUT_METRICS_TABLE, required=False)
    tokenwise = _table(results, paths.ANALYSES, paths.TOKENWISE_TABLE, required=False)
    thirds = _table(results, paths.ANALYSES, paths.LAYER_THIRDS_SUMMARY_TABLE, required=False)
    word = _table(results, paths.ANALYSES, paths.WORD_ORDER_METRICS_TABLE, required=False)
    corpus = tables.read_table(paths.table_path(results / paths.CORPUS, paths.CORPUS_TABLE))
    cands = load_candidates(corpus)
    ground_truth = tables.read_table(paths.table_path(results / paths.CORPUS, paths.GROUND_TRUTH_TABLE))
    truth = {name: truth_sets(ground_truth, cands, name) for name in TRUTHS}
    steps_of = defaultdict(list)
    for pid, step in zip(corpus["packed_id"].to_numpy(), corpus["step"].to_numpy(), strict=True):
        steps_of[int(pid)].append(int(step))
    final_row = ckpts.sort_values("step").iloc[-1]
    final = int(final_row["step"])
    tokenizer = AutoTokenizer.from_pretrained(results / paths.TRAIN / final_row["path"])

    attributions = attributions[attributions["checkpoint"] == final]
    category = {
        (r.behavior_id, r.method, int(r.rank)): r.category
        for r in dups[dups["checkpoint"] == final].itertuples()
    }
    shading: dict[tuple[str, str, int], np.ndarray] = {}
    if tokenwise is not None:
        tokenwise = tokenwise[tokenwise["checkpoint"] == final].sort_values(
            ["behavior_id", "method", "rank", "position"]
        )
        for key, g in tokenwise.groupby(["behavior_id", "method", "rank"], sort=False):
            shading[(key[0], key[1], int(key[2]))] = g["score"].to_numpy()

    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    (part / "behavior").mkdir(parents=True)
    (part / "style.css").write_text(CSS)
    (part / "filter.js").write_text(JS)
    methods = list(dict.fromkeys(attributions["method"]))  # the profile's order (attribute.methods)
    behaviors = sorted(attributions["behavior_id"].unique())
    page_of = slugs(behaviors)
    by_behavior = {b: g for b, g in probes.groupby("behavior_id")}
    listing = []
    has_truth = False  # whether any behavior has a ground-truth item (none in the Pile's world)
    for b in behaviors:
        curve = by_behavior[b].sort_values("checkpoint")
        last = curve.iloc[-1]
        rows = attributions[attributions["behavior_id"] == b]
        item = last["item_id"] if isinstance(last["item_id"], str) else None  # null: no ground truth
        has_truth = has_truth or item is not None
        gt = {name: set(sets[item].tolist()) if item in sets else None for name, sets in truth.items()}
        count = "" if item is None or np.isnan(last["count"]) else f" (stated {int(last['count'])} times)"
        columns, shown = [], set()
        for m in methods:
            cards = []
            for r in rows[rows["method"] == m].sort_values("rank").head(SHOWN).itertuples():
                pid = int(r.packed_id)
                cat = category.get((b, m, int(r.rank)), "unclassified")
                shown.add(cat)
                mark = _truth_mark(pid, gt)
                tokens = cands.tokens[pid]
                scores = shading.get((b, m, int(r.rank)))
                text = (
                    _shaded(tokenizer, tokens, scores)
                    if scores is not None
                    else html.escape(cands.texts[pid])
                )
                cards.append(
                    CARD.format(
                        method=m, category=cat, rank=int(r.rank), score=f"{r.score:.4f}", mark=mark,
                        steps=", ".join(map(str, steps_of[pid])), seq_idx=int(r.seq_idx), packed=pid,
                        text=text, shaded=" shaded" if scores is not None else "",
                    )
                )  # fmt: skip
            columns.append(COLUMN.format(method=m, cards="\n".join(cards)))
        page = BEHAVIOR.format(
            title=html.escape(b),
            family=html.escape(last["family"]),
            item=html.escape(item or "none"),
            count=count,
            prompt=html.escape(last["prompt"]),
            target=html.escape(last["target"]),
            completion=html.escape(last["completion"]),
            exhibited="yes" if last["exhibited"] else "no",
            step=final,
            curve=_curve(
                curve["checkpoint"].to_numpy(), curve["target_logprob"].to_numpy(), curve["exhibited"]
            ),
            method_boxes=_boxes("method", methods),
            # the categories this page's cards have ("unclassified": a row the duplicates stage has not seen)
            category_boxes=_boxes("category", [c for c in [*CATEGORY_ORDER, "unclassified"] if c in shown]),
            columns="\n".join(columns),
            k=SHOWN,
        )
        (part / "behavior" / page_of[b]).write_text(page)
        top1 = rows[(rows["method"] == "trackstar") & (rows["rank"] == 1)]
        listing.append(
            LISTED.format(
                family=html.escape(last["family"]), href=f"behavior/{page_of[b]}", id=html.escape(b),
                prompt=html.escape(last["prompt"][-60:]), target=html.escape(last["target"]),
                count="" if item is None or np.isnan(last["count"]) else int(last["count"]),
                top1=_truth_mark(int(top1["packed_id"].iloc[0]), gt) if len(top1) else "",
            )
        )  # fmt: skip
    families = sorted(attributions["family"].unique())
    sections = [_tracing_section(tracing, final, methods)]
    if causal is not None:
        tail_patch = paths.table_path(results / paths.CAUSAL, paths.TAIL_PATCH_TABLE)
        step = tables.provenance(tail_patch).get("step", "") if tail_patch.is_file() else ""
        sections.append(_causal_section(causal, step))
    if finetuned is not None and len(finetuned):
        sections.append(_finetune_section(finetuned))
    if left_out is not None and len(left_out):
        sections.append(_leave_out_section(left_out))
    if thirds is not None:
        sections.append(_thirds_section(thirds))
    if word is not None:
        sections.append(_word_section(word))
    (part / "index.html").write_text(
        INDEX.format(
            n=len(behaviors), step=final, results=html.escape(_shown(results)),
            family_options="".join(f'<option value="{f}">{f}</option>' for f in map(html.escape, families)),
            listing="\n".join(listing), sections="\n".join(sections),
            top1_header="TrackStar top-1" if has_truth else "",
        )
    )  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)
    return out


STAMP = derived.EXPLORER_STAMP


def build_if_stale(results: Path, out: Path, force: bool = False) -> Path:
    """:func:`build`, unless the site in ``out`` was made from the same tables and code and is
    whole (``derived``): a second ``nox -s paper`` then costs a second, not a rebuild."""
    made_from = derived.key(results, [__name__], [], shown=_shown(results))
    if not force and derived.is_current(out, out / STAMP, made_from):
        log.info("explorer: up to date in %s, skipping (--force rebuilds it)", out)
        return out
    build(results, out)
    written = [rel for rel in derived.files_under(out, ".") if rel != STAMP]
    derived.write_stamp(out, written, out / STAMP, made_from)
    return out


def _truth_mark(pid: int, gt: dict) -> str:
    if gt.get("complete") is not None and pid in gt["complete"]:
        return '<span class="gt complete" title="holds a complete copy of the item">&#10003; complete</span>'
    if gt.get("target") is not None and pid in gt["target"]:
        title = "touches a document with the item and holds its target tokens"
        return f'<span class="gt target" title="{title}">~ target</span>'
    if gt.get("partial") is not None and pid in gt["partial"]:
        return '<span class="gt partial" title="touches a document with the item">~ partial</span>'
    if gt.get("partial") is not None:
        return '<span class="gt none" title="not a ground-truth sequence">&#10007;</span>'
    return ""


def _shaded(tokenizer, tokens: np.ndarray, scores: np.ndarray) -> str:
    """Each token a span shaded by its share of the largest absolute score in the sequence
    (orange: raises the score, blue: lowers it); the last token has no score of its own."""
    peak = float(np.abs(scores).max()) or 1.0
    out = []
    for t, tok in enumerate(tokens.tolist()):
        piece = html.escape(tokenizer.decode([tok]))
        if t >= len(scores):
            out.append(piece)
            continue
        s = float(scores[t])
        alpha = min(abs(s) / peak, 1.0)
        colour = "230,97,0" if s > 0 else "37,99,235"
        out.append(f'<span style="background:rgba({colour},{alpha:.2f})" title="{s:+.4g}">{piece}</span>')
    return "".join(out)


def _curve(steps: np.ndarray, logprob: np.ndarray, exhibited) -> str:
    """The target's log-probability over checkpoints as an inline SVG (x: log(1 + step))."""
    w, h, pad = 420, 140, 28
    x = np.log1p(steps.astype(float))
    x = (x - x.min()) / ((x.max() - x.min()) or 1.0)
    lo, hi = float(np.min(logprob)), float(np.max(logprob))
    y = (logprob - lo) / ((hi - lo) or 1.0)
    pts = [(pad + xi * (w - 2 * pad), h - pad - yi * (h - 2 * pad)) for xi, yi in zip(x, y, strict=True)]
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
    dots = "".join(
        f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" class="{"on" if e else "off"}"><title>step{s}: '
        f"{lp:.2f}{' (exhibited)' if e else ''}</title></circle>"
        for (a, b), s, lp, e in zip(pts, steps, logprob, list(exhibited), strict=True)
    )
    return (
        f'<svg class="curve" viewBox="0 0 {w} {h}" role="img" aria-label="target log-probability by step">'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" class="axis"/>'
        f'<polyline points="{line}" class="line"/>{dots}'
        f'<text x="{pad}" y="{h - 6}">step {int(steps.min())}</text>'
        f'<text x="{w - pad}" y="{h - 6}" text-anchor="end">step {int(steps.max())} (log scale)</text>'
        f'<text x="4" y="{pad - 10}">log p(target) {lo:.1f} .. {hi:.1f}</text></svg>'
    )


def _boxes(kind: str, values: list[str]) -> str:
    return " ".join(
        f'<label><input type="checkbox" data-filter="{kind}" value="{v}" checked> {v}</label>'
        for v in map(html.escape, values)
    )


def _table_html(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ci(row, col: str, digits: int = 3) -> str:
    """A value with its interval; 'n/a' where it is undefined (NaN: nothing to count it over)."""
    if row[col] != row[col]:
        return "n/a"
    return (
        f"{row[col]:.{digits}f} <small>[{row[col + '_lo']:.{digits}f}, {row[col + '_hi']:.{digits}f}]</small>"
    )


def _value(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


NO_TRUTH = (
    "Not measured for these tables: no behavior has known sources (a world without planted items, such "
    "as the Pile's own training sequences, has no ground truth to score against)."
)


def _tracing_section(tracing, final: int, methods: list[str]) -> str:
    """The tracing metrics, by truth definition (the attribute stage's order) and method (the
    profile's order, as on the behavior pages)."""
    t = tracing[(tracing["checkpoint"] == final) & (tracing["family"] == "all")]
    t = t.assign(
        _truth=t["truth"].map({name: i for i, name in enumerate(TRUTHS)}),
        _method=t["method"].map({name: i for i, name in enumerate(methods)}),
    ).sort_values(["_truth", "_method", "method"])
    rows = [[r["truth"], r["method"], str(int(r["n_behaviors"])), _ci(r, "mrr"), _ci(r, "recall_at_10"),
             _ci(r, "top1_hit")] for _, r in t.iterrows()]  # fmt: skip
    if not rows:
        return f"<h2>Tracing: is a ground-truth sequence retrieved?</h2><p>{NO_TRUTH}</p>"
    return (
        "<h2>Tracing: is a ground-truth sequence retrieved?</h2><p>Every family, final checkpoint, "
        "under each truth definition (complete: the sequence holds the whole item; partial: it touches "
        "a document with the item; target: it touches such a document and holds the target's tokens). "
        "95% bootstrap intervals over behaviors.</p>"
        + _table_html(["truth", "method", "behaviors", "MRR", "recall@10", "top-1 hit"], rows)
    )


def _causal_section(causal, step: str) -> str:
    """The tail-patch metrics; ``step``: how the step was taken (the tail-patch table's provenance)."""
    t = causal[causal["family"] == "all"].sort_values("effect", ascending=False)
    rows = [[r["method"], str(int(r["n_behaviors"])), _ci(r, "effect", 4), _ci(r, "positive")]
            for _, r in t.iterrows()]  # fmt: skip
    how = f" The step: {html.escape(step)}." if step else ""
    reference = " (ground_truth: the behavior's own complete copies)" if REFERENCE in set(t["method"]) else ""
    return (
        "<h2>Tail-patch: does a step on the retrieved sequence raise the target?</h2>"
        "<p>Mean change in the target's log-probability beyond the same step with a zero gradient, over "
        f"each method's top k{reference}.{how}</p>"
        + _table_html(["method", "behaviors", "effect", "share positive"], rows)
    )


def _copies(truth, selected) -> str:
    """'3/50' complete copies among a selection; 'n/a' where the world has none to count (the Pile)."""
    return "n/a" if truth is None or truth != truth else f"{truth:.0f}/{selected:.0f}"


def _finetune_section(finetuned) -> str:
    t = finetuned.sort_values(["family", "prompt_kind", "delta_logp"], ascending=[True, True, False])
    rows = [[r["family"], r["prompt_kind"], r["method"], _copies(r["n_selected_truth"], r["n_selected"]),
             _ci(r, "delta_logp", 2), f"{r['exhibited_before']:.0%} &rarr; {r['exhibited_after']:.0%}"]
            for _, r in t.iterrows()]  # fmt: skip
    return (
        "<h2>Select and fine-tune: does training an early checkpoint on a method's selection teach the "
        "family?</h2><p>Change in the targets' log-probability over the family's evaluation set, on the "
        "probe's prompts and on paraphrases (copies: complete ground-truth copies among the selection).</p>"
        + _table_html(["family", "prompts", "selection", "copies", "change", "exhibited"], rows)
    )


def _leave_out_section(left_out) -> str:
    t = left_out[left_out["family"] == "all"].sort_values("delta_logp")
    rows = [[r["run"], str(int(r["n_behaviors"])), _ci(r, "delta_logp", 2),
             "" if r["run"] == "random" or r["vs_random"] != r["vs_random"] else _ci(r, "vs_random", 2),
             f"{int(r['random_costlier_than'])} of {int(r['random_runs'])}" if r["random_runs"] else "",
             f"{r['lost']:.0%}"] for _, r in t.iterrows()]  # fmt: skip
    return (
        "<h2>Leave-k-out: retrained without a method's top k, how much does the target fall?</h2>"
        "<p>Change in the sampled behaviors' target log-probability at the final step against the training "
        "run (ground_truth: the behaviors' own complete copies removed), paired difference from random "
        "removal, how many of the random removals (random, random_2, ...: seeded draws of as many random "
        "sequences; a random run among the others) cost less, share of exhibited behaviors lost "
        "(<code>nox -s leave_out</code>).</p>"
        + _table_html(
            ["removed", "behaviors", "change", "beyond random", "random draws costing less", "lost"], rows
        )
    )


def _thirds_section(thirds) -> str:
    t = thirds[thirds["family"] == "all"].sort_values(["method", "third"])
    rows = [[r["method"], r["third"], str(int(r["n_behaviors"])), _ci(r, "exact"), _ci(r, "thematic"),
             _ci(r, "unrelated"), _value(r["mrr_complete"])] for _, r in t.iterrows()]  # fmt: skip
    return "<h2>Layer thirds: what each third of the network retrieves</h2>" + _table_html(
        ["method", "third", "behaviors", "exact", "thematic", "unrelated", "MRR (complete)"], rows
    )


def _word_section(word) -> str:
    t = word.sort_values(["kind", "method", "variant"])
    rows = [[r["kind"], r["order"], r["method"], r["variant"], str(int(r["n_items"])), _ci(r, "gt_score", 4),
             _ci(r, "relative", 2), _ci(r, "mrr")] for _, r in t.iterrows()]  # fmt: skip
    if not rows:
        return f"<h2>Word order: the item's own sequences under query variants</h2><p>{NO_TRUTH}</p>"
    return "<h2>Word order: the item's own sequences under query variants</h2>" + _table_html(
        ["items", "order", "method", "variant", "n", "ground-truth score", "relative to original", "MRR"],
        rows,
    )


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 110rem; padding: 0 1rem;
       color: #1f2328; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .2rem .6rem; text-align: left;
  border-bottom: 1px solid #d0d7de; vertical-align: top; } small { color: #57606a; }
.meta dt { font-weight: 600; float: left; clear: left; width: 9rem; } .meta dd { margin-left: 9.5rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); gap: .8rem; }
.column h3 { font-size: 1rem; margin: .3rem 0; position: sticky; top: 0; background: #fff; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: .4rem .5rem; margin-bottom: .5rem; }
.card header { font-size: .85rem; display: flex; flex-wrap: wrap; gap: .4rem; align-items: baseline; }
.card .text { font: 12px/1.4 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word;
  max-height: 14rem; overflow: auto; margin-top: .3rem; }
.cat { border-radius: 4px; padding: 0 .3rem; font-size: .8rem; }
.cat.exact { background: #ffebe9; } .cat.near_duplicate { background: #fff8c5; }
.cat.thematic { background: #dafbe1; } .cat.unrelated { background: #eaeef2; }
.gt.complete { color: #1a7f37; font-weight: 600; } .gt.target { color: #4d7c0f; }
.gt.partial { color: #9a6700; } .gt.none { color: #8c959f; }
.filters { margin: .6rem 0; padding: .4rem .6rem; background: #f6f8fa; border-radius: 6px; }
.filters label { margin-right: .7rem; white-space: nowrap; }
.curve { width: 420px; max-width: 100%; } .curve .line { fill: none; stroke: #0969da; stroke-width: 1.5; }
.curve .axis { stroke: #8c959f; } .curve circle.on { fill: #1a7f37; } .curve circle.off { fill: #fff;
  stroke: #8c959f; } .curve text { font-size: 10px; fill: #57606a; }
.hidden { display: none !important; } .legend span { padding: 0 .3rem; }
"""

JS = """
// Filters: a checkbox (data-filter="method" or "category") or the family select hides the
// elements whose data attribute holds an unchecked value. The page is complete without this.
function applyFilters() {
  const off = {};
  document.querySelectorAll('input[data-filter]').forEach(box => {
    off[box.dataset.filter] = off[box.dataset.filter] || new Set();
    if (!box.checked) off[box.dataset.filter].add(box.value);
  });
  const family = document.getElementById('family');
  document.querySelectorAll('[data-method], [data-category], [data-family]').forEach(el => {
    let hide = false;
    for (const key of ['method', 'category']) {
      if (el.dataset[key] !== undefined && off[key] && off[key].has(el.dataset[key])) hide = true;
    }
    const fam = el.dataset.family;
    if (family && fam !== undefined && family.value && fam !== family.value) hide = true;
    el.classList.toggle('hidden', hide);
  });
  const shown = [...document.querySelectorAll('.card, tr[data-family]')]
    .filter(e => e.offsetParent !== null).length;
  const counter = document.getElementById('shown');
  if (counter) counter.textContent = shown;
}
document.addEventListener('DOMContentLoaded', () => {
  document.querySelectorAll('input[data-filter], #family')
    .forEach(el => el.addEventListener('change', applyFilters));
  applyFilters();
});
"""

INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Influential training sequences</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="style.css"><script src="filter.js" defer></script></head><body>
<h1>Influential training sequences</h1>
<p>{n} behaviors attributed at step {step}, from the tables in <code>{results}</code>.
Each behavior's page shows every method's top sequences side by side.</p>
{sections}
<h2>Behaviors</h2>
<div class="filters"><label>family <select id="family"><option value="">all</option>
{family_options}</select></label>
<span><span id="shown">{n}</span> shown</span></div>
<table class="behaviors"><thead><tr><th>behavior</th><th>family</th><th>count</th><th>prompt</th>
<th>target</th><th>{top1_header}</th></tr></thead><tbody>
{listing}
</tbody></table></body></html>
"""

LISTED = (
    '<tr data-family="{family}"><td><a href="{href}">{id}</a></td><td>{family}</td><td>{count}</td>'
    "<td>&hellip;{prompt}</td><td>{target}</td><td>{top1}</td></tr>"
)

BEHAVIOR = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="../style.css"><script src="../filter.js" defer></script></head><body>
<p><a href="../index.html">&larr; all behaviors</a></p>
<h1>{title}</h1>
<dl class="meta"><dt>family</dt><dd>{family}</dd><dt>item</dt><dd>{item}{count}</dd>
<dt>prompt</dt><dd><code>{prompt}</code></dd><dt>target</dt><dd><code>{target}</code></dd>
<dt>greedy completion</dt><dd><code>{completion}</code> (step {step}; exhibited: {exhibited})</dd></dl>
{curve}
<div class="filters"><div>methods: {method_boxes}</div><div>categories: {category_boxes}</div>
<div class="legend">tokens: <span style="background:rgba(230,97,0,.6)">raise the score</span>
<span style="background:rgba(37,99,235,.6)">lower it</span> (shaded where the analyses stage split the score);
<span id="shown"></span> sequences shown</div></div>
<div class="grid">
{columns}
</div></body></html>
"""

COLUMN = (
    '<section class="column" data-method="{method}"><h3>{method}: top {k}</h3>\n{cards}\n</section>'.replace(
        "{k}", str(SHOWN)
    )
)

CARD = (
    '<article class="card" data-category="{category}"><header><b>#{rank}</b> <span>{score}</span>'
    '<span class="cat {category}">{category}</span>{mark}</header>'
    "<small>seq_idx {seq_idx} (packed {packed}); trained at step {steps}</small>"
    '<div class="text{shaded}">{text}</div></article>'
)
