"""Typed configuration: profiles in ``experiments/profiles/*.toml`` read into frozen dataclasses.

A profile composes one section per stage. Code never branches on a profile's name: everything
that differs between ``nano`` and ``micro`` is a field here. Unknown keys and wrong types are
errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pythia_attribution import paths
from pythia_attribution.errors import ConfigError


def doc(
    text: str,
    default=dataclasses.MISSING,
    default_factory=dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    nonempty: bool = False,
    unique: bool = False,
):
    """A dataclass field with its documentation and its allowed values attached (shown by ``--help``
    and checked where the profile is read). Bounds apply to every number of a list; ``unique``
    refuses a list that names a value twice."""
    rule = Rule(ge=ge, gt=gt, le=le, lt=lt, choices=choices, nonempty=nonempty, unique=unique)
    kwargs = {"metadata": {"doc": text, "rule": rule}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return field(**kwargs)


@dataclass(frozen=True)
class Rule:
    """Allowed values of one profile key: numeric bounds, a set of choices, non-empty text, a list
    without repeats."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    nonempty: bool = False
    unique: bool = False

    def text(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        parts = [f"{op} {_num(v)}" for op, v in bounds if v is not None]
        if self.choices:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        if self.nonempty:
            parts.append("not empty")
        if self.unique:
            parts.append("no value twice")
        return " and ".join(parts)

    def violation(self, value) -> str | None:
        """Why ``value`` (already of the right type) is not allowed, or None."""
        if isinstance(value, list):
            repeated = [v for i, v in enumerate(value) if v in value[:i]] if self.unique else []
            if repeated:
                return f"names {repeated[0]!r} twice"
            return next((why for v in value if (why := self.violation(v))), None)
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, int | float) and not isinstance(value, bool):
            bounds = (
                (self.ge, lambda v, b: v >= b),
                (self.gt, lambda v, b: v > b),
                (self.le, lambda v, b: v <= b),
                (self.lt, lambda v, b: v < b),
            )
            if any(b is not None and not ok(value, b) for b, ok in bounds):
                return f"must be {self.text()}"
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                return f"must be {self.text()}"
            if self.nonempty and not value.strip():
                return "must not be empty"
        return None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = doc(
        "torch intra-op threads; on 2 cores 2 is fastest when the machine is quiet", 2, ge=1, le=1024
    )
    seed: int = doc("master seed for every random choice in every stage", 1234, ge=0, le=2**32 - 1)
    cpu_isa: str = doc(
        "the widest vector instructions the CPU kernels may use (torch's, MKL's and oneDNN's): 'avx2' "
        "makes x86 machines with and without AVX-512 train the same weights and write the same tables "
        "(an AVX-512 machine's differ from the last bits of step 1 on; about 6% slower there); '': each "
        "library's own choice. Environment variables set by the user win; applied only where the "
        "process has not loaded torch yet (the CLI)",
        "avx2",
        choices=("avx2", ""),
    )


@dataclass(frozen=True)
class SyntheticConfig:
    canary_counts: list[int] = doc(
        "copies injected per random-word canary; 0 gives never-seen controls",
        default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64],
        ge=0,
    )
    canaries_per_count: int = doc("distinct canaries at each count", 8, ge=0)
    canary_min_tokens: int = doc("a canary is random words until it has at least this many tokens", 64, ge=1)
    canary_vocabulary: int = doc(
        "canary words are drawn from this many most frequent natural words", 2000, ge=1
    )
    capital_counts: list[int] = doc(
        "documents stating each real country -> capital fact; 0 is the control",
        default_factory=lambda: [0, 1, 4, 16, 64],
        ge=0,
    )
    countries_per_count: int = doc("countries assigned to each capital count", 20, ge=0)
    bio_counts: list[int] = doc(
        "documents stating each fictional person's birthplace",
        default_factory=lambda: [0, 1, 4, 16, 64],
        ge=0,
    )
    bios_per_count: int = doc("fictional people at each biography count", 10, ge=0)
    insult_counts: list[int] = doc(
        "documents abusing each fictional target with its fixed Shakespearean insult (toxic proxy)",
        default_factory=lambda: [0, 16, 64],
        ge=0,
    )
    insults_per_count: int = doc("fictional insult targets at each count", 4, ge=0)
    stereotype_word: str = doc(
        "an invented occupation word that the natural text never contains",
        "glimmerwright",
        nonempty=True,
    )
    stereotype_majority: str = doc(
        "the pronoun that follows the occupation word most often", "she", nonempty=True
    )
    stereotype_minority: str = doc("the pronoun that follows it otherwise", "he", nonempty=True)
    stereotype_mentions: int = doc("documents mentioning the invented occupation", 200, ge=0)
    stereotype_skew: float = doc("share of mentions followed by the majority pronoun", 0.9, ge=0, le=1)


@dataclass(frozen=True)
class WorldConfig:
    """Where a real-scale world's artifacts live: Hub repositories and their pinned identities."""

    manifest: str = doc(
        "pinned Hub identities (revision -> commit, file -> size and sha256), written by `nox -s pin`; "
        "'{world}' is the fixture world's folder; '' when no stage reads the Hub",
        "",
    )
    model_repo: str = doc("Hub model repository of the checkpoints and tokenizer", "")
    dataset_repo: str = doc("Hub dataset repository of the preshuffled Megatron files", "")
    evals_repo: str = doc("Hub dataset repository of Biderman et al.'s memorized sequences", "")
    evals_split: str = doc("split of evals_repo for this model (e.g. deduped.70m)", "")
    hub_cache: str = doc(
        "HF_HUB_CACHE for this profile ('{world}' allowed); '' keeps huggingface_hub's default", ""
    )
    offline: bool = doc("set HF_HUB_OFFLINE=1: load only what the Hub cache holds", False)
    fixture: bool = doc(
        "build the fixture world (tiny GPT-NeoX Hub repository, Megatron shards, memorized-evals "
        "parquet) into results/<profile>/world/ before the first stage, when it is not there",
        False,
    )


@dataclass(frozen=True)
class PileConfig:
    """Which training sequences of the preshuffled Pile become candidates (source pythia-preshuffled)."""

    url: str = doc(
        "fsspec URL of the folder holding document.idx and the shards; '{commit}' is the manifest's "
        "dataset commit, '{world}' the fixture world's folder",
        "hf://datasets/{repo}@{commit}",
    )
    steps: list[list[int]] = doc(
        "training-step ranges [first, last) whose sequences are all candidates",
        default_factory=list,
        ge=0,
    )
    seq_idxs: list[int] = doc("explicit training sequence indexes to include", default_factory=list, ge=0)
    memorized: int = doc(
        "include a seeded sample of this many sequences listed in the memorized-evals split",
        0,
        ge=0,
    )
    sample: int = doc("include a seeded uniform sample of this many sequences trained before", 0, ge=0)
    sample_until_step: int = doc("... the checkpoint at this step (0: the final checkpoint)", 0, ge=0)
    max_candidates: int = doc(
        "stop with an error if the selection holds more sequences than this", 10000, ge=1
    )
    tokenizer_step: int = doc("the checkpoint step whose tokenizer decodes the sequences", 143000, ge=0)
    fetch_batch: int = doc(
        "sequences per cached fetch chunk (a killed fetch resumes chunk by chunk)", 1024, ge=1
    )
    fetch_threads: int = doc(
        "concurrent ranged reads while fetching: one per contiguous run of selected sequences, so a "
        "scattered sample waits on the network's latency, which threads overlap",
        8,
        ge=1,
        le=64,
    )


@dataclass(frozen=True)
class CorpusConfig:
    source: str = doc(
        "where the training sequences come from: 'micro-pile' (built here) or 'pythia-preshuffled' "
        "(the Pile in Pythia's training order, by byte range)",
        "micro-pile",
        choices=("micro-pile", "pythia-preshuffled"),
    )
    pile: PileConfig = doc("candidate selection for source pythia-preshuffled", default_factory=PileConfig)
    manifest: str = doc(
        "source manifest (path relative to the project root)", "data_manifests/micro-pile.toml"
    )
    natural_sources: list[str] = doc(
        "manifest sources whose text goes into the corpus",
        default_factory=lambda: ["shakespeare-modern", "shakespeare-folio", "kjv"],
        unique=True,
    )
    max_chars_per_source: int = doc("cap on characters taken from each natural source (0: no cap)", 0, ge=0)
    max_chars_per_document: int = doc(
        "natural documents longer than this are split at line breaks", 20000, ge=1
    )
    vocab_size: int = doc(
        "byte-level BPE vocabulary size (trained on the natural text only)", 8192, ge=258, le=65536
    )
    seq_len: int = doc(
        "input tokens per training sequence; each sequence stores seq_len + 1 tokens", 128, ge=2
    )
    batch_size: int = doc("sequences per optimizer step (step = seq_idx // batch_size)", 32, ge=1)
    epochs: int = doc("passes over the packed sequences; each pass is its own seeded permutation", 4, ge=1)
    synthetic: SyntheticConfig = doc(
        "synthetic documents with known ground truth", default_factory=SyntheticConfig
    )


@dataclass(frozen=True)
class TrainConfig:
    source: str = doc(
        "where the checkpoints come from: 'train' (trained here on the corpus order) or 'hub' "
        "(world.model_repo at the pinned revisions of hub_steps)",
        "train",
        choices=("train", "hub"),
    )
    hub_steps: list[int] = doc(
        "checkpoint steps loaded from the Hub (source hub)", default_factory=list, ge=0, unique=True
    )
    layers: int = doc("transformer layers", 4, ge=1)
    hidden: int = doc("hidden size", 128, ge=1)
    heads: int = doc("attention heads", 4, ge=1)
    max_positions: int = doc(
        "max_position_embeddings recorded in the model config (Pythia: 2048); rotary, so no "
        "parameters depend on it. Gradient tools batch up to this many tokens.",
        2048,
        ge=2,
    )
    rotary_pct: float = doc("share of head dims with rotary embeddings (Pythia: 0.25)", 0.25, gt=0, le=1)
    lr: float = doc("peak learning rate of AdamW", 3e-3, gt=0)
    min_lr_ratio: float = doc("cosine decay ends at lr * min_lr_ratio (Pythia: 0.1)", 0.1, ge=0, le=1)
    warmup_frac: float = doc("share of steps with linear warmup (Pythia: 0.01)", 0.02, ge=0, lt=1)
    weight_decay: float = doc("AdamW weight decay on matrices (Pythia's configs: 0.1)", 0.01, ge=0)
    beta1: float = doc("AdamW beta1 (Pythia: 0.9)", 0.9, ge=0, lt=1)
    beta2: float = doc("AdamW beta2 (Pythia: 0.95)", 0.95, ge=0, lt=1)
    eps: float = doc("AdamW epsilon (Pythia: 1e-8)", 1e-8, gt=0)
    grad_clip: float = doc("gradient-norm clipping (Pythia: 1.0)", 1.0, gt=0)
    checkpoint_log_until: int = doc("checkpoints at step0 and every power of two up to this step", 64, ge=0)
    checkpoint_every: int = doc("then every this many steps, and always at the final step", 100, ge=1)
    log_every: int = doc("write a training-log row every this many steps", 10, ge=1)


@dataclass(frozen=True)
class ProbeConfig:
    behaviors_dir: str = doc(
        "folder of behavior TOML files (relative to the project root)", "experiments/behaviors"
    )
    min_new_tokens: int = doc(
        "greedy completions are at least this long (longer when the target is)", 8, ge=1
    )
    batch_size: int = doc("prompts per forward pass", 64, ge=1)


@dataclass(frozen=True)
class AttributeConfig:
    methods: list[str] = doc(
        "methods to run, by name in methods_file",
        default_factory=lambda: ["trackstar", "grad_cosine", "bm25", "activation", "random"],
        unique=True,
    )
    methods_file: str = doc("method definitions (relative to the project root)", "experiments/methods.toml")
    checkpoints: list[int] = doc(
        "checkpoints to attribute at besides the final one", default_factory=list, ge=0, unique=True
    )
    top_k: int = doc("top-ranked training sequences kept per (behavior, method)", 100, ge=1)
    projection_dim: int = doc("bergson random projection: p x p dims per module", 16, ge=1)
    token_batch_size: int = doc(
        "tokens per bergson gradient batch (at most the model's max positions)", 2048, ge=1
    )
    faiss: bool = doc("top-k through faiss's exact kernel for methods without a Hessian (GPU if any)", True)
    bootstrap: int = doc("bootstrap resamples for the tracing metrics' intervals", 1000, ge=1)
    chunk_rows: int = doc(
        "candidate rows scored per block: memory holds one block of the index, not all of it", 16384, ge=1
    )
    summary_sample: int = doc(
        "score_summary's quantiles, top shares and tail exponent come from a seeded sample of this many "
        "candidates (all of them when there are fewer); max, min, mean and counts are exact",
        100_000,
        ge=100,
    )
    index_shards: int = doc(
        "the training index is built as this many shards by row range; shards built elsewhere by "
        "`python -m pythia_attribution index-shard --shard I` are adopted",
        1,
        ge=1,
    )
    nproc_per_node: int = doc(
        "workers of bergson's own launcher per index build (0: one per visible GPU, or one on a CPU)", 0, ge=0
    )
    moment_batches: int = doc(
        'second_moments = "estimated" methods: training minibatches Adam\'s second moments are estimated '
        "from (the last full steps before the checkpoint among the candidates, topped up with seeded "
        "batches of the other candidates where fewer are full; attribute/moments.py)",
        16,
        ge=1,
    )


@dataclass(frozen=True)
class DuplicatesConfig:
    exact_window: int = doc(
        "a shared run this long (or the whole query verbatim) is an exact duplicate", 64, ge=1
    )
    substring_run: int = doc(
        "a shared run this long is a near-duplicate (Lee et al. use 50 tokens)", 50, ge=1
    )
    near_jaccard: float = doc(
        "MinHash Jaccard of token n-grams at or above this is a near-duplicate", 0.8, ge=0, le=1
    )
    thematic_tfidf: float = doc(
        "TF-IDF cosine at or above this is thematic (our choice, not an anchor)", 0.3, ge=0, le=1
    )
    ngram: int = doc("token n-gram size for MinHash", 5, ge=1)
    num_perm: int = doc("MinHash permutations", 128, ge=1)


@dataclass(frozen=True)
class CausalConfig:
    methods: list[str] = doc(
        "methods to tail-patch (default: every method attribute ran)", default_factory=list, unique=True
    )
    top_k: int = doc("sequences patched per (behavior, method): the method's top k (TrackStar: 10)", 10, ge=1)
    max_behaviors: int = doc("cap on the exhibited behaviors patched, a seeded sample (0: all)", 0, ge=0)
    reference_truth: str = doc(
        "truth definition of the ground-truth reference sequences",
        "complete",
        choices=("complete", "partial", "target"),
    )
    optimizer_state: str = doc(
        "tail-patch's AdamW state: 'saved' (the final checkpoint's optimizer.pt) or 'estimated' (for "
        "checkpoints saved without one, as Pythia's are: Adam's second moments estimated as trackstar_est's "
        "are, a zero first moment, and the train section's recipe at the end of its schedule: lr x "
        "min_lr_ratio, betas, eps, weight decay, clipping)",
        "saved",
        choices=("saved", "estimated"),
    )
    finetune_families: list[str] = doc(
        "select-and-fine-tune: families whose behaviors form an evaluation set ([]: not run)",
        default_factory=lambda: ["factual", "fictional_fact"],
        unique=True,
    )
    finetune_set: str = doc(
        "each family's evaluation set: 'stated' (behaviors whose item a complete copy in the corpus states "
        "at least finetune_min_count times; planted items only) or 'exhibited' (behaviors exhibited at the "
        "final checkpoint; any world, the Pile's included, with no ground-truth reference)",
        "stated",
        choices=("stated", "exhibited"),
    )
    finetune_min_count: int = doc("evaluation set 'stated': items stated at least this many times", 16, ge=1)
    finetune_k: int = doc("training sequences selected per method", 50, ge=1)
    finetune_steps: int = doc("fine-tuning steps, the same for every selection", 20, ge=1)
    finetune_batch: int = doc("sequences per fine-tuning step", 8, ge=1)
    finetune_lr: float = doc("constant fine-tuning learning rate (AdamW)", 1e-3, gt=0)
    finetune_max_exhibited: float = doc(
        "fine-tune the latest checkpoint at which at most this share of the set is exhibited", 0.1, ge=0, le=1
    )
    paraphrase_file: str = doc(
        "paraphrased prompts the corpus never states (variant 'paraphrase'; relative to the project root; "
        "'': no paraphrase measurement)",
        "experiments/paraphrases.toml",
    )


@dataclass(frozen=True)
class LeaveOutConfig:
    methods: list[str] = doc(
        "methods whose top k are removed, one retraining run each ('random': the random method's top k, "
        "the floor); a ground-truth run is added ([]: the stage writes empty tables)",
        default_factory=list,
        unique=True,
    )
    top_k: int = doc("training sequences removed per sampled behavior and method", 10, ge=1)
    max_behaviors: int = doc(
        "exhibited behaviors sampled (seeded; 0: all), their removals in one run", 32, ge=0
    )
    reference_truth: str = doc(
        "truth definition of the ground-truth removal run",
        "complete",
        choices=("complete", "partial", "target"),
    )
    random_draws: int = doc(
        "runs of the random floor: the 'random' method's top k and random_draws - 1 further seeded "
        "draws of k random sequences per behavior ('random_2', ...), one retraining each, so that the "
        "floor's own spread is measured (more than 1 needs 'random' in methods)",
        1,
        ge=1,
    )


@dataclass(frozen=True)
class AnalysesConfig:
    methods: list[str] = doc(
        "gradient methods analysed (default: every gradient method attribute ran)",
        default_factory=list,
        unique=True,
    )
    tokenwise_top: int = doc("top sequences per (behavior, method) split over their tokens", 3, ge=1)
    layer_top_k: int = doc("top sequences per (behavior, method, layer third) kept and classified", 20, ge=1)
    max_behaviors: int = doc("cap on the exhibited behaviors analysed, a seeded sample (0: all)", 0, ge=0)
    word_order_file: str = doc(
        "word-order query variants (relative to the project root; '': no word-order analysis)",
        "experiments/word_order.toml",
    )


@dataclass(frozen=True)
class MemorizationConfig:
    source: str = doc(
        "'test' (test every candidate at every checkpoint) or 'memorized-evals' (also re-score a "
        "seeded sample of world.evals_split with the final checkpoint and report the agreement)",
        "test",
        choices=("test", "memorized-evals"),
    )
    rescore_sample: int = doc("listed memorized sequences re-scored (source memorized-evals)", 200, ge=0)
    context: int = doc("tokens of context (Biderman et al. 2023: 32)", 32, ge=1)
    continuation: int = doc("tokens that must be reproduced greedily (32)", 32, ge=1)
    batch_size: int = doc("windows per forward pass", 256, ge=1)
    methods: list[str] = doc(
        "attribution methods for memorized sequences, by name in attribute.methods_file "
        "(gradient and bm25 kinds)",
        default_factory=lambda: ["trackstar", "grad_cosine", "bm25"],
        unique=True,
    )
    top_k: int = doc("top-ranked training sequences kept per memorized sequence", 20, ge=1)
    max_queries: int = doc("memorized sequences attributed at most (seeded sample; 0: all)", 100, ge=0)
    early_until: int = doc("memorized first at or before this step: early; after it: late", 300, ge=0)
    restricted: bool = doc(
        "also attribute each memorized sequence at the checkpoint where it was first memorized, "
        "over the sequences trained before that checkpoint only",
        True,
    )
    restricted_checkpoints: list[int] = doc(
        "checkpoints at which that restricted attribution is done, each memorized sequence at the first "
        "of them at or after the checkpoint where it was first memorized (the final one where none is); "
        "empty: at every such checkpoint (one gradient index per checkpoint)",
        default_factory=list,
        ge=0,
        unique=True,
    )


@dataclass(frozen=True)
class Profile:
    name: str = doc("profile name (the file's stem)")
    description: str = doc("one line on what the profile is for", "")
    runtime: RuntimeConfig = doc("threads and seed", default_factory=RuntimeConfig)
    world: WorldConfig = doc("Hub repositories and pins (real-scale sources)", default_factory=WorldConfig)
    corpus: CorpusConfig = doc("corpus stage", default_factory=CorpusConfig)
    train: TrainConfig = doc("train stage", default_factory=TrainConfig)
    probe: ProbeConfig = doc("probe stage", default_factory=ProbeConfig)
    attribute: AttributeConfig = doc("attribute stage", default_factory=AttributeConfig)
    duplicates: DuplicatesConfig = doc("duplicates stage", default_factory=DuplicatesConfig)
    memorization: MemorizationConfig = doc("memorization stage", default_factory=MemorizationConfig)
    causal: CausalConfig = doc(
        "causal stage (tail-patch, select-and-fine-tune)", default_factory=CausalConfig
    )
    analyses: AnalysesConfig = doc(
        "analyses stage (tokenwise, layer thirds, word order)", default_factory=AnalysesConfig
    )
    leave_out: LeaveOutConfig = doc(
        "leave_out stage (retraining without each method's top k; not part of `all`)",
        default_factory=LeaveOutConfig,
    )


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def from_dict(cls, data: dict, source: str, prefix: str = ""):
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the file"
        raise ConfigError(f"{source}: '{where}' must be a table, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{where}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{where}' must be a table")
            kwargs[key] = from_dict(tp, value, source, prefix=f"{where}.")
        elif not _type_ok(value, tp):
            raise ConfigError(f"{source}: key '{where}' must be {_type_name(tp)}, got {_short(value)}")
        else:
            rule = fields[key].metadata.get("rule")
            why = rule.violation(value) if rule else None
            if why:
                raise ConfigError(f"{source}: key '{where}' {why}, got {_short(value)}")
            kwargs[key] = float(value) if tp is float else value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key '{prefix}{missing[0]}'")
    return cls(**kwargs)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # e.g. a file saved as Latin-1: TOML is UTF-8
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 (TOML files must be): byte 0x{exc.object[exc.start]:02x} on line {line}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def array_of_tables(data: dict, key: str, path: Path) -> list:
    """``data[key]`` of a TOML file, which must be an array of tables (``[[key]]``); [] if absent.
    The tables themselves are checked by ``from_dict``."""
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{path}: '{key}' must be an array of tables ([[{key}]]), got {_short(value)}")
    return value


def known_profiles() -> list[str]:
    return sorted(p.stem for p in paths.profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load ``experiments/profiles/<name>.toml``, or a profile file given by path. A path that is
    neither (a missing .toml file, another kind of file) is named as such, not looked up as a name.

    A profile may name another as its ``base`` (a profile name, or a .toml path relative to its own
    folder): it is then that profile with this file's keys on top, table by table and key by key
    (a list or a value replaces the base's whole). The base must be a valid profile itself; its
    ``name`` is not inherited, its ``description`` is unless the file states its own."""
    return _load(_locate(name_or_path), ())[0]


def _locate(name_or_path: str, named_in: Path | None = None) -> Path:
    """The file of a profile given by name or path, from ``--profile`` or from the ``base`` key of
    the profile file ``named_in`` (whose folder a relative path starts from)."""
    what = f"{named_in}: key 'base' = {name_or_path!r}" if named_in else f"--profile {name_or_path}"
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:  # a name has no folder (it may hold a dot)
        if named_in is not None and not candidate.is_absolute():
            candidate = named_in.parent / candidate
        if candidate.suffix == ".toml" and candidate.is_file():
            return candidate.resolve()
        why = "not a .toml file" if candidate.suffix != ".toml" else "no such file"
        raise ConfigError(
            f"{what}: {why}; a profile is one of {', '.join(known_profiles())} or the path of a .toml file"
        )
    path = paths.profiles_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        prefix = f"{what}: " if named_in else ""
        known = ", ".join(known_profiles())
        raise ConfigError(f"{prefix}unknown profile '{name_or_path}'; known profiles: {known}")
    return path.resolve()


def _load(path: Path, chain: tuple[Path, ...]) -> tuple[Profile, dict]:
    """The profile in ``path`` and its resolved keys (its base's with its own on top). ``chain``:
    the files whose ``base`` led here, to refuse a cycle."""
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: key 'base' makes a cycle of profiles: {cycle}")
    data = read_toml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(
                f"{path}: key 'base' must be str (a profile's name or path), got {_short(base)}"
            )
        _, inherited = _load(_locate(base, named_in=path), (*chain, path))
        inherited.pop("name")
        data = _overlay(inherited, data)
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise ConfigError(f"{path}: key 'name' must match the file name '{path.stem}'")
    profile = from_dict(Profile, data, str(path))
    for key, why in cross_rules(profile):
        raise ConfigError(f"{path}: key '{key}' {why}")
    paths.remember_profile_file(profile.name, path)
    return profile, data


def _overlay(base: dict, top: dict) -> dict:
    """``top``'s keys over ``base``'s: tables merged key by key, anything else replaced whole."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def cross_rules(p: Profile) -> list[tuple[str, str]]:
    """Rules that tie keys together (listed in the README): (key, why it is wrong) for each broken."""
    broken = []
    c, t, m = p.corpus, p.train, p.memorization
    if t.hidden % t.heads:
        broken.append(("train.hidden", f"must be a multiple of train.heads ({t.heads}), got {t.hidden}"))
    if t.source == "train" and c.seq_len > t.max_positions:
        broken.append(
            ("corpus.seq_len", f"must be <= train.max_positions ({t.max_positions}), got {c.seq_len}")
        )
    if m.context + m.continuation > c.seq_len + 1:
        broken.append(
            (
                "memorization.continuation",
                f"with memorization.context ({m.context}) must fit in a training sequence of "
                f"corpus.seq_len + 1 = {c.seq_len + 1} tokens, got {m.context} + {m.continuation}",
            )
        )
    need = min(c.seq_len + 1, t.max_positions)
    if p.attribute.token_batch_size < need:
        broken.append(
            (
                "attribute.token_batch_size",
                f"must hold one training sequence ({need} tokens), got {p.attribute.token_batch_size}",
            )
        )
    # the stages after attribute read its rankings: asking them for more than it kept once gave the
    # methods fewer sequences than the ground-truth reference beside them (nano's leave_out, 20 vs 24)
    kept = p.attribute.top_k
    for key, value in (
        ("causal.top_k", p.causal.top_k),
        ("leave_out.top_k", p.leave_out.top_k),
        ("analyses.tokenwise_top", p.analyses.tokenwise_top),
    ):
        if value > kept:
            why = f"must be <= attribute.top_k ({kept}, the sequences each ranking keeps), got {value}"
            broken.append((key, why))
    if p.leave_out.random_draws > 1 and "random" not in p.leave_out.methods:
        broken.append(
            (
                "leave_out.random_draws",
                "must be 1 unless 'random' is in leave_out.methods (the first draw is the random "
                f"method's run), got {p.leave_out.random_draws}",
            )
        )
    if p.duplicates.ngram > c.seq_len + 1:
        broken.append(
            (
                "duplicates.ngram",
                f"must be <= corpus.seq_len + 1 ({c.seq_len + 1}): no training sequence would have an "
                f"n-gram, so every MinHash Jaccard would be 0, got {p.duplicates.ngram}",
            )
        )
    elif p.duplicates.ngram > m.context + m.continuation:
        # a window without n-grams gets the empty set's MinHash, the same for every such window, so
        # every pair of them would count as near duplicates, and the count's cost is quadratic
        broken.append(
            (
                "duplicates.ngram",
                f"must be <= memorization.context + memorization.continuation "
                f"({m.context + m.continuation}): no memorization window would have an n-gram, so "
                f"every pair of windows would count as near duplicates, got {p.duplicates.ngram}",
            )
        )
    for i, pair in enumerate(c.pile.steps):
        if len(pair) != 2 or pair[0] >= pair[1]:
            broken.append(
                (f"corpus.pile.steps[{i}]", f"must be a range [first, last) with first < last, got {pair}")
            )
    if t.source == "hub" and not t.hub_steps:
        broken.append(("train.hub_steps", "must list at least one checkpoint step when train.source = 'hub'"))
    return broken


def to_jsonable(obj) -> dict:
    return dataclasses.asdict(obj)


def config_hash(obj) -> str:
    blob = json.dumps(to_jsonable(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe(cls, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default and documentation (for ``--help``)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rule = f.metadata.get("rule")
        allowed = f" [{rule.text()}]" if rule and rule.text() else ""
        lines.append(f"  {prefix}{f.name} = {default!r}{allowed}: {f.metadata.get('doc', '')}")
    return lines
