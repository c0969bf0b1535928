"""The paper's figures, drawn with plotnine from the tables (PNG for quick looks, SVG for print).

Each figure function takes a :class:`Study` and returns a ggplot and its size in inches; colours
and labels come from :mod:`style`, so a method has one colour in every figure.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import polars as pl
from plotnine import (
    aes,
    coord_flip,
    element_blank,
    element_text,
    facet_grid,
    facet_wrap,
    geom_boxplot,
    geom_col,
    geom_hline,
    geom_jitter,
    geom_line,
    geom_point,
    geom_pointrange,
    ggplot,
    guide_legend,
    guides,
    labs,
    position_dodge,
    scale_color_cmap_d,
    scale_color_manual,
    scale_fill_manual,
    scale_x_continuous,
    scale_x_discrete,
    scale_x_sqrt,
    scale_y_continuous,
    theme,
    theme_bw,
)
from plotnine.exceptions import PlotnineError

from pythia_attribution import paths
from pythia_attribution.paper import derive, style
from pythia_attribution.paper.data import Study
from pythia_attribution.paper.variables import DATA_ABSENT


def _theme():
    return theme_bw(base_size=style.FONT_SIZE) + theme(
        legend_position="bottom",
        legend_title=element_text(size=style.FONT_SIZE),
        panel_grid_minor=element_blank(),
        strip_text=element_text(size=style.FONT_SIZE - 1),
    )


def _percent(values):
    return [f"{100 * v:.0f}%" for v in values]


_NO_LEGEND_TITLE = theme(legend_title=element_blank())
# panels of horizontal 0-100% shares side by side: room between one's "100%" and the next one's "0%"
_SHARE_PANELS = theme(panel_spacing_x=0.035)


def _method_scales(methods: list[str], fill: bool = False, ncol: int = 3):
    labels = {m: style.method_label(m) for m in methods}
    colours = {m: style.method_colour(m) for m in methods}
    scale = scale_fill_manual if fill else scale_color_manual
    # Three columns, because eleven methods in one row run off the page. A legend title beside
    # them would too, so the figures using this scale add ``_NO_LEGEND_TITLE`` after ``_theme()``.
    return scale(values=colours, labels=labels, breaks=methods, name="Method", guide=guide_legend(ncol=ncol))


def _category_fill(categories: list[str]):
    order = [c for c in style.CATEGORIES if c in set(categories)]
    return scale_fill_manual(
        values={c: style.CATEGORIES[c][1] for c in order},
        labels={c: style.category_label(c) for c in order},
        breaks=order,
        name="Retrieved sequence is",
        guide=guide_legend(nrow=2),  # in one row the last label ran past the page's width
    )


def _family_order(families) -> list[str]:
    for f in families:
        style.family_label(f)
    return [style.family_label(f) for f in style.FAMILIES if f in set(families)]


def learning(study: Study):
    """Share of behaviors exhibited at each checkpoint, per family and injected count."""
    curves = derive.dose_curves(study)
    data = curves.with_columns(
        pl.col("family").map_elements(style.family_label, return_dtype=pl.Utf8).alias("family_label")
    ).to_pandas()
    data["dose"] = data["dose"].astype("category").cat.set_categories(derive.dose_order(curves), ordered=True)
    data["family_label"] = (
        data["family_label"].astype("category").cat.set_categories(_family_order(curves["family"]))
    )
    # without a designed dose (the Pile) there is one curve per family, natural against pooled
    # says nothing (every behavior is natural text): one colour, and no legend of injected copies
    designed = any(d.isdigit() for d in curves["dose"].unique())
    colours = derive.dose_colours(curves)
    if not designed:
        colours = dict.fromkeys(colours, style.POOLED_COLOUR)
    plot = (
        ggplot(data, aes("checkpoint", "fraction_exhibited", colour="dose", group="dose"))
        + geom_line(size=0.6)
        + geom_point(size=0.9)
        + facet_wrap("family_label", ncol=3)
        + scale_x_sqrt()
        + scale_y_continuous(labels=_percent, limits=(0, 1))
        + scale_color_manual(values=colours, name="Injected copies / documents")
        + labs(x="Training step (checkpoint, square-root scale)", y="Behaviors exhibited")
        + _theme()
        + guides(colour=guide_legend(nrow=2))
    )
    if not designed:
        plot += theme(legend_position="none")
    return plot, (style.FIGURE_WIDTH_IN, 4.2)


def tracing(study: Study):
    """Ground-truth tracing: MRR and recall@10 per family and method, with bootstrap intervals,
    under each truth definition (a row of panels each)."""
    tm = study.frame(paths.TRACING_METRICS_TABLE)
    long = pl.concat(
        [
            tm.select(
                pl.col("truth").map_elements(TRUTH_LABELS.get, return_dtype=pl.Utf8).alias("truth"),
                "method",
                "family",
                pl.lit(label).alias("metric"),
                pl.col(col).alias("value"),
                pl.col(f"{col}_lo").alias("lo"),
                pl.col(f"{col}_hi").alias("hi"),
            )
            for col, label in [("mrr", "Mean reciprocal rank"), ("recall_at_10", "Recall@10")]
        ]
    )
    data, methods = _by_family_and_method(long)
    order = [TRUTH_LABELS[t] for t in derive.TRUTH_ORDER]
    data["truth"] = data["truth"].astype("category").cat.set_categories(order)
    dodge = position_dodge(width=0.7)
    plot = (
        ggplot(data, aes("family_label", "value", ymin="lo", ymax="hi", colour="method"))
        + geom_pointrange(position=dodge, size=0.3, fatten=1.5)
        + facet_grid("truth ~ metric", scales="free_x")
        + coord_flip()
        + _method_scales(methods)
        + labs(x="", y="")
        + _theme()
        + _NO_LEGEND_TITLE
    )
    return plot, (style.FIGURE_WIDTH_IN, 9.6)


# How the paper names the truth definitions of attribute's tracing tables (ordered by
# ``derive.TRUTH_ORDER``).
TRUTH_LABELS = {
    "partial": "partial: touches a source document",
    "complete": "complete: holds the whole item",
    "target": "target: a source document's target tokens",
}


def _by_family_and_method(frame: pl.DataFrame):
    """``frame`` as pandas with ordered ``family_label`` and ``method`` categories (for a flipped
    per-family plot, one colour per method), and the methods in the style's order."""
    methods = derive.ordered_methods(frame["method"].unique())
    data = frame.with_columns(
        pl.col("family").map_elements(style.family_label, return_dtype=pl.Utf8).alias("family_label")
    ).to_pandas()
    order = _family_order(frame["family"].unique())
    data["family_label"] = data["family_label"].astype("category").cat.set_categories(order[::-1])
    data["method"] = data["method"].astype("category").cat.set_categories(methods[::-1])
    return data, methods


def causal(study: Study):
    """Tail-patch: effect of one training step on each method's top-k, per family, with intervals."""
    tp = study.frame(paths.TAIL_PATCH_METRICS_TABLE)
    if tp.is_empty():
        return _no_data("causal"), (6.0, 1.5)
    data, methods = _by_family_and_method(tp)
    plot = (
        ggplot(data, aes("family_label", "effect", ymin="effect_lo", ymax="effect_hi", colour="method"))
        + geom_hline(yintercept=0, colour="#999999", size=0.3)
        + geom_pointrange(position=position_dodge(width=0.75), size=0.3, fatten=1.5)
        + coord_flip()
        + _method_scales(methods)
        + labs(x="", y="Change in the target's log-probability (beyond the momentum-only step)")
        + _theme()
        + _NO_LEGEND_TITLE
    )
    return plot, (style.FIGURE_WIDTH_IN, 4.4)


def _composition_bars(pdf, facet):
    """Stacked bars of duplicate categories per method (one bar per method, per facet panel).

    ``pdf`` is a pandas frame with ``method``, ``category`` and ``share`` plus the facet columns.
    """
    methods = derive.ordered_methods(pdf["method"].unique())
    pdf = pdf.assign(method_label=pdf["method"].map(style.method_label))
    pdf["method_label"] = (
        pdf["method_label"]
        .astype("category")
        .cat.set_categories([style.method_label(m) for m in methods][::-1])
    )
    categories = [c for c in style.CATEGORIES if c in set(pdf["category"])]
    pdf["category"] = pdf["category"].astype("category").cat.set_categories(categories[::-1])
    return (
        ggplot(pdf, aes("method_label", "share", fill="category"))
        + geom_col(width=0.75)
        + facet
        + coord_flip()
        + scale_y_continuous(labels=_percent)
        + _category_fill(categories)
        + labs(x="", y="Share of the top-k retrieved sequences")
        + _theme()
        + _SHARE_PANELS
    )


def composition(study: Study):
    """What each method retrieves in its top-k, by behavior family."""
    comp = study.frame(paths.COMPOSITION_TABLE)
    pooled = derive.pooled_composition(study).with_columns(pl.lit("all").alias("family"))
    data = pl.concat(
        [
            comp.select("family", "method", "category", "share"),
            pooled.select("family", "method", "category", "share"),
        ]
    )
    pdf = data.with_columns(
        pl.col("family").map_elements(style.family_label, return_dtype=pl.Utf8).alias("family_label")
    ).to_pandas()
    pdf["family_label"] = (
        pdf["family_label"].astype("category").cat.set_categories(_family_order(data["family"].unique()))
    )
    plot = _composition_bars(pdf, facet_wrap("family_label", ncol=2))
    return plot, (style.FIGURE_WIDTH_IN, 5.4)


def layers(study: Study):
    """How the top-1 sequence's score splits over layers, per gradient method."""
    shares = derive.layer_shares(study)
    methods = derive.ordered_methods(shares["method"].unique())
    plot = (
        ggplot(shares.to_pandas(), aes("layer", "share", colour="method", group="method"))
        + geom_line()
        + geom_point(size=1.5)
        + scale_x_continuous(breaks=sorted(shares["layer"].unique().to_list()))  # layers are whole
        + scale_y_continuous(labels=_percent, limits=(0, None))
        + _method_scales(methods, ncol=1)
        + labs(x="Layer", y="Share of the top-1 sequence's score")
        + _theme()
        + _NO_LEGEND_TITLE
        + theme(legend_position="right")
    )
    return plot, (style.FIGURE_WIDTH_IN * 0.85, 3.0)


CONCENTRATION_METRICS = [  # two lines each: one is wider than a panel where the method names are long
    ("top1pct_share", "Share of the positive score\nin the top 1%"),
    ("tail_exponent", "Hill tail exponent\n(smaller: heavier tail)"),
]


def concentration(study: Study):
    """Influence concentration per query: top-1% share and the Hill tail exponent."""
    ss = study.frame(paths.SCORE_SUMMARY_TABLE)
    seed = study.config(paths.SCORE_SUMMARY_TABLE, "runtime")["seed"]  # the jitter is reproducible
    methods = derive.ordered_methods(ss["method"].unique())
    long = pl.concat(
        [
            ss.select("method", "behavior_id", pl.lit(label).alias("metric"), pl.col(col).alias("value"))
            for col, label in CONCENTRATION_METRICS
        ]
    ).filter(pl.col("value").is_finite())  # NaN: undefined, the query has no positive score
    data = long.to_pandas()
    data["method"] = data["method"].astype("category").cat.set_categories(methods[::-1])
    data["metric"] = (
        data["metric"].astype("category").cat.set_categories([m[1] for m in CONCENTRATION_METRICS])
    )
    plot = (
        ggplot(data, aes("method", "value", colour="method"))
        + geom_jitter(width=0.2, height=0, size=0.5, alpha=0.4, random_state=seed)
        + geom_boxplot(outlier_shape="", fill="none", width=0.5, colour="black", size=0.4)
        + facet_wrap("metric", scales="free_x")
        + coord_flip()
        + _method_scales(methods)
        + scale_x_discrete(labels=lambda ms: [style.method_label(m) for m in ms])
        + labs(x="", y="")
        + _theme()
        + theme(legend_position="none")
    )
    return plot, (style.FIGURE_WIDTH_IN, 2.8)


MAX_LEVEL_BINS = 7  # duplication bins a half-width panel labels level (micro's 1 to 33-64)


def memorization_by_duplication(study: Study):
    """Share of sequences memorized at the final checkpoint against how often their text recurs."""
    dup = study.frame(paths.MEMORIZATION_BY_DUP_TABLE).with_columns(
        pl.col("bin").map_elements(derive.bin_lower, return_dtype=pl.Int64).alias("lower"),
        pl.col("duplication")
        .replace_strict(
            {"exact_window": "Exact copies of a window", "near_duplicate": "Near-duplicates (MinHash)"},
            default=pl.col("duplication"),
        )
        .alias("kind"),
    )
    data = dup.sort("lower").to_pandas()
    data["bin"] = (
        data["bin"]
        .astype("category")
        .cat.set_categories(list(dict.fromkeys(dup.sort("lower")["bin"].to_list())))
    )
    plot = (
        ggplot(data, aes("bin", "fraction", ymin="ci_lo", ymax="ci_hi"))
        + geom_pointrange(size=0.3)
        + facet_wrap("kind", scales="free_x")
        + scale_y_continuous(labels=_percent, limits=(0, 1))
        + labs(x="Occurrences in the training corpus", y="Memorized at the final checkpoint")
        + _theme()
    )
    if dup.group_by("kind").agg(pl.col("bin").n_unique())["bin"].max() > MAX_LEVEL_BINS:
        plot += theme(axis_text_x=element_text(rotation=45, ha="right"))  # wide bins would overlap
    return plot, (style.FIGURE_WIDTH_IN, 2.8)


def canary_memorization(study: Study):
    """Canaries memorized over training, by how many copies were injected."""
    cm = study.frame(paths.CANARY_MEMORIZATION_TABLE).with_columns(
        pl.col("injected_count").cast(pl.Utf8).alias("copies")
    )
    counts = [str(c) for c in sorted(set(cm["injected_count"].to_list()))]
    data = cm.to_pandas()
    data["copies"] = data["copies"].astype("category").cat.set_categories(counts, ordered=True)
    plot = (
        ggplot(data, aes("checkpoint", "fraction", colour="copies", group="copies"))
        + geom_line()
        + geom_point(size=0.9)
        + scale_x_sqrt()
        + scale_y_continuous(labels=_percent, limits=(0, 1))
        + scale_color_cmap_d("viridis", name="Injected copies")
        + labs(x="Training step (checkpoint, square-root scale)", y="Canaries memorized")
        + _theme()
    )
    return plot, (style.FIGURE_WIDTH_IN * 0.75, 3.0)


def early_late(study: Study):
    """Top-k composition of memorized sequences' attributions: early- versus late-memorized."""
    el = derive.early_late(study)
    pdf = el.with_columns(
        pl.col("group").replace_strict(style.MEMORIZATION_GROUPS, default=pl.col("group")).alias("grp"),
        pl.col("setting").replace_strict(style.SETTINGS, default=pl.col("setting")).alias("set"),
    ).to_pandas()
    plot = _composition_bars(pdf, facet_grid("grp ~ set")) + guides(fill=guide_legend(nrow=2))
    return plot, (style.FIGURE_WIDTH_IN, 3.8)


def layer_thirds(study: Study):
    """Composition of the primary gradient method's top-k (``derive.primary_method``: TrackStar
    where it ran) ranked by one third of the layers (or all), per family."""
    summary = study.frame(paths.LAYER_THIRDS_SUMMARY_TABLE)
    method = derive.primary_method(summary["method"].unique())
    summary = summary.filter((pl.col("family") != "all") & (pl.col("method") == method))
    if summary.is_empty():
        return _no_data("layer-thirds"), (6.0, 1.5)
    thirds = [t for t in ("lower", "middle", "upper", "all") if t in set(summary["third"])]
    long = summary.unpivot(
        index=["family", "third"],
        on=[c for c in style.CATEGORIES if c in summary.columns],
        variable_name="category",
        value_name="share",
    )
    pdf = long.with_columns(
        pl.col("family").map_elements(style.family_label, return_dtype=pl.Utf8).alias("family_label"),
    ).to_pandas()
    pdf["third"] = pdf["third"].astype("category").cat.set_categories(thirds[::-1])
    pdf["family_label"] = (
        pdf["family_label"].astype("category").cat.set_categories(_family_order(summary["family"].unique()))
    )
    categories = [c for c in style.CATEGORIES if c in set(pdf["category"])]
    pdf["category"] = pdf["category"].astype("category").cat.set_categories(categories[::-1])
    plot = (
        ggplot(pdf, aes("third", "share", fill="category"))
        + geom_col(width=0.75)
        + facet_wrap("~family_label", ncol=3)
        + coord_flip()
        + scale_y_continuous(labels=_percent)
        + _category_fill(categories)
        + labs(x="Layers ranked by", y=f"Share of {style.method_name(method)}'s top-k retrieved sequences")
        + _theme()
        + _SHARE_PANELS
    )
    return plot, (style.FIGURE_WIDTH_IN, 3.6)


class _TokenPicture:
    """A training sequence typeset token by token, each on a patch shaded by its score; drawn into a
    matplotlib figure (``draw``), which ``_save`` writes as it writes a plotnine plot's. The title
    may have several lines."""

    def __init__(self, tokens: list[str], scores: list[float], title: str, width_chars: int = 92):
        self.tokens, self.scores, self.title, self.width = tokens, scores, title, width_chars

    def lines(self) -> list[list[tuple[int, str]]]:
        """(token index, text) runs per typeset line; newlines in a token break the line."""
        lines, line, used = [], [], 0
        for i, tok in enumerate(self.tokens):
            for j, piece in enumerate(tok.split("\n")):
                if j:
                    lines.append(line)
                    line, used = [], 0
                if used + len(piece) > self.width and line:
                    lines.append(line)
                    line, used = [], 0
                if piece:
                    line.append((i, piece))
                    used += len(piece)
        lines.append(line)
        return lines

    def draw(self, width: float, height: float, dpi: float):
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        peak = max(abs(s) for s in self.scores) or 1.0
        lines, titles = self.lines(), self.title.split("\n")
        fig = plt.figure(figsize=(width, height), dpi=dpi)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, self.width + 2)
        ax.set_ylim(len(lines) + len(titles) + 1, 0)
        ax.axis("off")
        for row, title in enumerate(titles):
            ax.text(1, row + 0.9, title, fontsize=style.FONT_SIZE, family="sans-serif", va="center")
        for row, line in enumerate(lines, start=len(titles) + 1):
            x = 1
            for i, piece in line:
                s = self.scores[i]
                colour = (0.90, 0.38, 0.0) if s > 0 else (0.145, 0.39, 0.92)
                shade = (*colour, min(abs(s) / peak, 1.0))
                ax.add_patch(Rectangle((x, row - 0.45), len(piece), 0.9, color=shade, linewidth=0))
                ax.text(x, row, piece.replace("$", r"\$"), fontsize=style.FONT_SIZE - 1, family="monospace",
                        va="center")  # fmt: skip
                x += len(piece)
        return fig


TOKENWISE_WIDTH = 240  # tokens drawn of a longer sequence (about 12 lines): those with the most influence


def tokenwise(study: Study):
    """The primary gradient method's top-1 sequence of one behavior (``derive.tokenwise_example``),
    tokens shaded by their part of the score; of a sequence longer than ``TOKENWISE_WIDTH`` tokens,
    the window of that many that holds the most absolute score (``derive.tokenwise_window``)."""
    example = derive.tokenwise_example(study)
    if example.is_empty():
        return _no_data("tokenwise"), (6.0, 1.5)
    behavior, method = example["behavior_id"][0], style.method_name(example["method"][0])
    total = example["score"].sum()
    shown = derive.tokenwise_window(example, TOKENWISE_WIDTH)
    tokens = shown["token"].to_list()
    scores = shown["score"].to_list()
    where = ""
    if shown.height < example.height:
        first, last = shown["position"].min(), shown["position"].max()
        held = shown["score"].abs().sum() / example["score"].abs().sum()
        n = example.height
        where = f"\ntokens {first:,}-{last:,} of the {n:,} scored, {held:.0%} of their absolute score"
    title = f"{behavior}: {method}'s top-1 sequence, score {total:.3f}{where}"
    pic = _TokenPicture(tokens, scores, title)
    return pic, (style.FIGURE_WIDTH_IN, 0.22 * (len(pic.lines()) + title.count("\n") + 2))


log = logging.getLogger(__name__)

FIGURES = {
    "learning": learning,
    "tracing": tracing,
    "causal": causal,
    "composition": composition,
    "layers": layers,
    "tokenwise": tokenwise,
    "layer-thirds": layer_thirds,
    "concentration": concentration,
    "memorization": memorization_by_duplication,
    "canaries": canary_memorization,
    "early-late": early_late,
}


def write_all(study: Study, folder: Path, names: list[str] | None = None) -> list[Path]:
    """Draw every figure (or those of ``names``) into ``folder`` as ``<name>.png`` and ``<name>.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "pythia-attribution"  # stable ids: same tables, same SVG
    matplotlib.rcParams["svg.fonttype"] = "path"
    written = []
    for name, draw in FIGURES.items():
        if names is not None and name not in names:
            continue
        try:
            written += _save(folder, name, *draw(study))
        except (*DATA_ABSENT, PlotnineError) as exc:
            log.warning("paper: figure '%s' has no data in this profile (%s)", name, exc)
            written += _save(folder, name, _no_data(name), (6.0, 1.5))
    return written


def _save(folder: Path, name: str, plot, size: tuple[float, float]) -> list[Path]:
    """The figure as PNG and SVG from one drawing: plotnine's ``save`` draws the figure anew for
    each file, and drawing is most of the paper's time (32.6 s -> 23.7 s for the micro paper). The
    PNG is byte for byte what ``plot.save`` writes; the SVG's coordinates differ from it in the sixth
    decimal (the layout was computed at the PNG's resolution)."""
    import matplotlib.pyplot as plt

    figure, context = _drawn(plot, size)
    files = [folder / f"{name}.{ext}" for ext in ("png", "svg")]
    try:
        with context:
            for path in files:
                figure.savefig(path, metadata=_metadata(path.suffix[1:]))
    finally:
        plt.close(figure)
    return files


def _drawn(plot, size: tuple[float, float]):
    """The plot drawn into a matplotlib figure at ``size`` and the paper's resolution, and the
    matplotlib settings to write it under (a plotnine plot's theme, as ``plot.save`` applies it)."""
    width, height = size
    if isinstance(plot, _TokenPicture):
        return plot.draw(width, height, style.DPI), contextlib.nullcontext()
    from plotnine._utils.context import plot_context

    view = plot.save_helper(width=width, height=height, dpi=style.DPI, verbose=False)
    return view.figure, plot_context(plot).rc_context


def _no_data(name: str):
    """A placeholder that says the profile's tables hold nothing for this figure."""
    import pandas as pd
    from plotnine import aes, annotate, ggplot, theme_void

    text = f"No data for this figure in this profile ({name})."
    return ggplot(pd.DataFrame({"x": [0]}), aes("x")) + annotate("text", x=0, y=0, label=text) + theme_void()


def _metadata(ext: str) -> dict:
    # no creation dates or software versions in the files: identical tables give identical bytes
    return {"Software": None} if ext == "png" else {"Date": None, "Creator": None}
