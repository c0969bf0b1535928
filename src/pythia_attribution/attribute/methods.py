"""Attribution methods as named configs (``experiments/methods.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pythia_attribution.config import from_dict, read_toml
from pythia_attribution.errors import ConfigError

KINDS = ("gradient", "ekfac", "bm25", "activation", "activation_change", "random")
QUERIES = ("mean", "difference")
HESSIANS = ("none", "autocorrelation")
# where Adam's second moments come from when optimizer_normalize is set (attribute/moments.py)
SECOND_MOMENTS = {"saved": "adam", "estimated": "adam_est"}
# the name of the causal evaluations' reference row: the ground-truth sequences themselves, selected
# (tail-patch, select-and-fine-tune) or removed (leave-k-out) like a method's top k. Not a method
# of methods.toml, so no method may take it.
REFERENCE = "ground_truth"


@dataclass(frozen=True)
class Method:
    """One attribution method."""

    name: str
    kind: str
    description: str = ""
    optimizer_normalize: bool = False
    second_moments: str = "saved"  # optimizer_normalize's moments: the saved state, or "estimated"
    hessian: str = "none"
    unit_norm: bool = True
    damping: float = 0.1  # ekfac: the inverse's damping, as a multiple of the mean eigenvalue
    fit_rows: int = 0  # ekfac: training sequences (a seeded sample) the factors are fitted on; 0: all
    # activation: the query's vector, its mean activation ("mean") or the target-minus-control
    # difference ("difference", residual_diff; see attribute/activations.py)
    query: str = "mean"

    @property
    def index_name(self) -> str:
        """Gradient methods with the same normalization share one bergson index: ``raw``, ``adam``
        (the saved optimizer state) or ``adam_est`` (estimated second moments)."""
        return SECOND_MOMENTS[self.second_moments] if self.optimizer_normalize else "raw"


def load_methods(path: Path, names: list[str]) -> list[Method]:
    data = read_toml(path)
    methods = []
    for name in names:
        if name not in data:
            raise ConfigError(f"{path}: no method named '{name}' (known: {', '.join(data)})")
        if name == REFERENCE:
            raise ConfigError(
                f"{path}: '{REFERENCE}' names the causal evaluations' reference row (the ground-truth "
                "sequences); give the method another name"
            )
        if not isinstance(data[name], dict):
            raise ConfigError(f"{path}: method '{name}' must be a table ([{name}]), got {data[name]!r:.60}")
        method = from_dict(Method, {"name": name, **data[name]}, str(path), prefix=f"{name}.")
        if method.kind not in KINDS:
            raise ConfigError(
                f"{path}: method '{name}': unknown kind '{method.kind}' (known: {', '.join(KINDS)})"
            )
        if method.hessian not in HESSIANS:
            raise ConfigError(f"{path}: method '{name}': unknown hessian '{method.hessian}'")
        if method.second_moments not in SECOND_MOMENTS:
            raise ConfigError(
                f"{path}: method '{name}': unknown second_moments '{method.second_moments}' "
                f"(known: {', '.join(SECOND_MOMENTS)})"
            )
        if method.query not in QUERIES:
            raise ConfigError(
                f"{path}: method '{name}': unknown query '{method.query}' (known: {', '.join(QUERIES)})"
            )
        if method.damping <= 0:
            raise ConfigError(f"{path}: method '{name}': damping must be > 0, got {method.damping}")
        if method.fit_rows < 0:
            raise ConfigError(
                f"{path}: method '{name}': fit_rows must be >= 0 (0: all), got {method.fit_rows}"
            )
        methods.append(method)
    return methods


# what a memorized sequence (a 64-token window, no probe prompt) can be attributed by
MEMORIZATION_KINDS = ("gradient", "bm25")


def memorization_methods(path: Path, names: list[str]) -> list[Method]:
    """``memorization.methods`` from ``path``, each of a kind in ``MEMORIZATION_KINDS`` (read by the
    memorization stage, and by ``check`` before any stage runs)."""
    methods = load_methods(path, names)
    for method in methods:
        if method.kind not in MEMORIZATION_KINDS:
            raise ConfigError(
                f"memorization.methods: '{method.name}' is of kind '{method.kind}'; memorized sequences "
                f"are attributed by {' and '.join(MEMORIZATION_KINDS)} methods"
            )
    return methods


def analysed_methods(path: Path, ran: list[str], chosen: list[str]) -> list[Method]:
    """The gradient methods among ``ran`` (``attribute.methods``) that ``chosen``
    (``analyses.methods``) names, or all of them when it names none; a chosen name that is not one
    of them is the profile's error (read by the analyses stage, and by ``check`` before any stage runs)."""
    gradient = [m for m in load_methods(path, ran) if m.kind == "gradient"]
    names = [m.name for m in gradient]
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ConfigError(
            f"analyses.methods: '{missing[0]}' is not a gradient method in attribute.methods (the "
            f"analyses split gradient methods' scores; the gradient methods run: {', '.join(names)})"
        )
    return [m for m in gradient if not chosen or m.name in chosen]
