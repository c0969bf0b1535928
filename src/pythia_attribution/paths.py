"""The one module that knows where files live.

Results layout: ``results/<profile>/<stage>/<table>.arrow``. A stage writes into
``<stage>.part/`` and renames it to ``<stage>/`` when complete, so a killed stage never
looks done. Nothing else in the package builds paths by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout (or image) root holding ``experiments/`` and ``data_manifests/``."""
    env = os.environ.get("PYTHIA_ATTRIBUTION_ROOT")
    if env:
        return Path(env).resolve()
    return PACKAGE_ROOT.parent.parent


def results_root() -> Path:
    env = os.environ.get("PYTHIA_ATTRIBUTION_RESULTS")
    return Path(env).resolve() if env else project_root() / "results"


def cache_root() -> Path:
    """Where downloaded source artifacts are kept (checked by sha256 on every use)."""
    env = os.environ.get("PYTHIA_ATTRIBUTION_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pythia-attribution"


def profiles_dir() -> Path:
    return project_root() / "experiments" / "profiles"


def resolve_input(path: str) -> Path:
    """A path named in a profile: absolute as is, relative to the project root otherwise."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


def world_dir(profile: str) -> Path:
    """A fixture world built for a profile (``world.fixture``): its Hub cache and manifest."""
    return results_root() / profile / "world"


def expand(template: str, profile: str) -> Path:
    """A path named in a profile, with ``{world}`` standing for the profile's fixture world."""
    return resolve_input(template.replace("{world}", str(world_dir(profile))))


# Profiles this process loaded from a file outside experiments/profiles: name -> that file, the
# argument that selects them again (`--profile nano` would load the shipped nano, not this one).
_PROFILE_FILES: dict[str, str] = {}


def remember_profile_file(name: str, path: Path) -> None:
    """Record that profile ``name`` was loaded from ``path``, for the commands errors print."""
    if path.parent.resolve() == profiles_dir().resolve():
        _PROFILE_FILES.pop(name, None)
    else:
        _PROFILE_FILES[name] = str(path)


def session(name: str, profile: str) -> str:
    """The command that runs stage or session ``name`` for ``profile``, as error messages print it
    (the profile named always: a bare `nox -s probe` would run the default profile's; a profile
    loaded from its own file is named by that file's path)."""
    return f"nox -s {name} -- --profile {_PROFILE_FILES.get(profile, profile)}"


# Stages, in pipeline order, and the tables each one writes.
CORPUS, TRAIN, PROBE, ATTRIBUTE, DUPLICATES = "corpus", "train", "probe", "attribute", "duplicates"
MEMORIZATION, CAUSAL, ANALYSES = "memorization", "causal", "analyses"
LEAVE_OUT = "leave_out"
# The pipeline that `all` runs, in order.
STAGES = (CORPUS, TRAIN, PROBE, ATTRIBUTE, DUPLICATES, MEMORIZATION, CAUSAL, ANALYSES)
# Stages outside `all`, run by name (each costs a retraining per run: see README, "Measured").
OPTIONAL_STAGES = (LEAVE_OUT,)

# The stage graph: each stage and the stages whose tables it reads. Declared once, here, in plain
# data (this module imports nothing outside the standard library, so the noxfile reads it too);
# ``stage.SPECS`` (how each stage runs) and the nox sessions are built from it.
GRAPH: dict[str, tuple[str, ...]] = {
    CORPUS: (),
    TRAIN: (CORPUS,),
    PROBE: (CORPUS, TRAIN),
    ATTRIBUTE: (CORPUS, TRAIN, PROBE),
    DUPLICATES: (CORPUS, PROBE, ATTRIBUTE),
    MEMORIZATION: (CORPUS, TRAIN, ATTRIBUTE),
    CAUSAL: (CORPUS, TRAIN, PROBE, ATTRIBUTE),
    ANALYSES: (CORPUS, TRAIN, PROBE, ATTRIBUTE),
    LEAVE_OUT: (CORPUS, TRAIN, PROBE, ATTRIBUTE),
}
STAGE_HELP: dict[str, str] = {
    CORPUS: "the training sequences in training order: micro-Pile built here, or the Pile by byte range",
    TRAIN: "checkpoints: micro-Pythia trained on exactly corpus.arrow's order, or Pythia from the Hub",
    PROBE: "probe every behavior at every checkpoint (greedy completion, log-prob, rank)",
    ATTRIBUTE: "attribute exhibited behaviors to training sequences (bergson, BM25, activations)",
    DUPLICATES: "classify what attribution retrieves: exact / near-duplicate / thematic / unrelated",
    MEMORIZATION: "memorization at every checkpoint, against duplication, and its attribution",
    CAUSAL: "tail-patch and select-and-fine-tune: training on what a method retrieves, and the change",
    ANALYSES: "where influence sits: tokenwise scores, layer-third retrieval, word-order query variants",
    LEAVE_OUT: "leave-k-out: retrain without each method's top k for sampled behaviors, and the change",
}

CORPUS_TABLE = "corpus"
DOCUMENTS_TABLE = "documents"
GROUND_TRUTH_TABLE = "ground_truth"
TRAINING_LOG_TABLE = "training_log"
CHECKPOINTS_TABLE = "checkpoints"
PROBES_TABLE = "probes"
PROBE_SUMMARY_TABLE = "behavior_summary"
ATTRIBUTIONS_TABLE = "attributions"
LAYER_SCORES_TABLE = "layer_scores"
SCORE_SUMMARY_TABLE = "score_summary"
SKIPPED_TABLE = "skipped"
CONTROLS_TABLE = "activation_controls"
TRACING_TABLE = "tracing"
TRACING_METRICS_TABLE = "tracing_metrics"
DUPLICATES_TABLE = "duplicates"
COMPOSITION_TABLE = "composition"
MEMORIZATION_TABLE = "memorization"
MEMORIZATION_SUMMARY_TABLE = "memorization_summary"
MEMORIZATION_BY_DUP_TABLE = "memorization_by_dup"
DUPLICATION_TABLE = "duplication"
MEMORIZED_ATTRIBUTION_TABLE = "memorized_attribution"
MEMORIZED_COMPOSITION_TABLE = "memorized_composition"
CANARY_MEMORIZATION_TABLE = "canary_memorization"
CANARY_ATTRIBUTION_TABLE = "canary_attribution"
EVALS_RESCORE_TABLE = "evals_rescore"
TAIL_PATCH_TABLE = "tail_patch"
TAIL_PATCH_METRICS_TABLE = "tail_patch_metrics"
FINETUNE_TABLE = "select_finetune"
FINETUNE_METRICS_TABLE = "select_finetune_metrics"
TOKENWISE_TABLE = "tokenwise"
LAYER_THIRDS_TABLE = "layer_thirds"
LAYER_THIRDS_SUMMARY_TABLE = "layer_thirds_summary"
WORD_ORDER_TABLE = "word_order"
WORD_ORDER_METRICS_TABLE = "word_order_metrics"
LEAVE_OUT_TABLE = "leave_out"
LEAVE_OUT_RUNS_TABLE = "leave_out_runs"
LEAVE_OUT_METRICS_TABLE = "leave_out_metrics"

TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
RETRAINED_DIR = "retrained"  # results/<profile>/retrained/<key>/: leave-out's models, kept across runs
STAGE_RECORD = "_stage.json"
RESOLVED_CONFIG = "config.resolved.json"


def stage_dir(profile: str, stage: str) -> Path:
    return results_root() / profile / stage


def partial_dir(profile: str, stage: str) -> Path:
    return results_root() / profile / f"{stage}.part"


def set_aside_dir(stage_root: Path) -> Path:
    """Where a stage's previous outputs step aside while new ones are renamed into place."""
    return stage_root.with_name(stage_root.name + ".old")


def table_path(stage_root: Path, table: str) -> Path:
    return stage_root / f"{table}.arrow"


def tokenizer_dir(profile: str) -> Path:
    return stage_dir(profile, CORPUS) / TOKENIZER_DIR


def retrained_dir(profile: str) -> Path:
    return results_root() / profile / RETRAINED_DIR


def checkpoint_dir(profile: str, step: int) -> Path:
    return stage_dir(profile, TRAIN) / CHECKPOINTS_DIR / f"step{step}"
