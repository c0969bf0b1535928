"""One look for every figure and table: a colour and a label per method, family and category.

Plain data, no imports, so that any code (figures, tables, a notebook) can share it. Colours are
the Okabe-Ito palette, distinguishable with the common colour-vision deficiencies, and where it
runs out, Paul Tol's muted scheme (indigo, wine, olive), chosen for the same property.
"""

# method -> (label, colour); the order is the order of legends and table rows.
METHODS: dict[str, tuple[str, str]] = {
    "trackstar": ("TrackStar", "#0072B2"),
    "trackstar_noadam": ("TrackStar without Adam state", "#332288"),
    "trackstar_est": ("TrackStar with estimated Adam state", "#999933"),
    "grad_cosine": ("Gradient cosine", "#56B4E9"),
    "ekfac": ("EK-FAC", "#009E73"),
    "bm25": ("BM25", "#E69F00"),
    "activation": ("Activation similarity", "#CC79A7"),
    "residual_diff": ("Residual difference", "#D55E00"),
    "residual_change": ("Residual change", "#882255"),
    "random": ("Random", "#999999"),
    "ground_truth": ("Ground truth (reference)", "#000000"),
}

FAMILIES: dict[str, str] = {
    "factual": "Factual recall",
    "fictional_fact": "Fictional facts",
    "memorized": "Memorized sequences",
    "stereotype": "Stereotyped association",
    "toxic": "Toxic language (proxy)",
    "style": "Distinctive style",
    "all": "All behaviors",
}

# duplicate categories of a retrieved sequence, from closest to farthest from the query.
CATEGORIES: dict[str, tuple[str, str]] = {
    "self": ("The sequence itself", "#332288"),
    "exact": ("Exact duplicate", "#882255"),
    "near_duplicate": ("Near-duplicate", "#CC6677"),
    "thematic": ("Thematic", "#DDCC77"),
    "unrelated": ("Unrelated", "#DDDDDD"),
}

MEMORIZATION_GROUPS: dict[str, str] = {"early": "Memorized early", "late": "Memorized late"}
SETTINGS: dict[str, str] = {
    "final": "At the final checkpoint",
    "first_memorized": "At first memorization,\nover what was trained before",  # one line overran its strip
}

# injected-count ramp (light to dark, cividis-like) and the two non-dose curves
DOSE_RAMP = [
    "#E0C600",
    "#B5DE2B",
    "#6ECE58",
    "#35B779",
    "#1F9E89",
    "#26828E",
    "#31688E",
    "#3E4989",
    "#482878",
]
NATURAL_COLOUR = "#D55E00"
POOLED_COLOUR = "#000000"

FONT_SIZE = 9
FIGURE_WIDTH_IN = 6.5
DPI = 200


def ramp(n: int) -> list[str]:
    """``n`` colours spread evenly over the dose ramp (light = few copies)."""
    if n <= 1:
        return DOSE_RAMP[-1:] * n
    return [DOSE_RAMP[round(i * (len(DOSE_RAMP) - 1) / (n - 1))] for i in range(n)]


def method_label(method: str) -> str:
    return _lookup(METHODS, method, "method")[0]


def method_name(method: str) -> str:
    """The method's label inside a sentence: a common noun in lower case ("gradient cosine"), a
    name as it is written ("TrackStar", "BM25", "EK-FAC")."""
    label = method_label(method)
    first = label.split()[0]
    return label if any(c.isupper() for c in first[1:]) else label[0].lower() + label[1:]


def method_colour(method: str) -> str:
    return _lookup(METHODS, method, "method")[1]


def family_label(family: str) -> str:
    return _lookup(FAMILIES, family, "behavior family")


def category_label(category: str) -> str:
    return _lookup(CATEGORIES, category, "duplicate category")[0]


def _lookup(table: dict, key: str, what: str):
    if key not in table:
        raise KeyError(
            f"{what} {key!r} has no entry in pythia_attribution/paper/style.py; add one there "
            f"(one colour and label per {what}, used by every figure and table)"
        )
    return table[key]
