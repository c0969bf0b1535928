"""``check``: validate every input a profile names, without running a stage.

The checks are the ones the stages themselves run where they read each input (the same
functions), gathered so that a long run can be checked before it starts: the profile (types,
ranges, cross-key rules: already done by loading it), the method table, the source manifest or
the Hub manifest, and the behavior files; against the tokenizer and every checkpoint's context
length and vocabulary once the corpus and train stages have run. The first problem stops the check
with the same one-line error the stage would give.
"""

from __future__ import annotations

from collections.abc import Collection

from pythia_attribution import paths, stage
from pythia_attribution.config import Profile
from pythia_attribution.errors import ConfigError


def check_inputs(profile: Profile, deep: bool = True, stages: Collection[str] | None = None) -> list[str]:
    """One line per input checked; the first problem raises the stage's own one-line error.
    ``deep`` False checks structure only (no corpus or checkpoint is read), as every stage command
    does before it starts (for the stages of ``all`` and its own), so that a misnamed method or a
    broken behavior file stops a long run at its start rather than when the stage that reads it
    comes. ``stages``: whose method rules apply (None: every stage's, ``leave_out`` included)."""
    from pythia_attribution.attribute.methods import analysed_methods, load_methods, memorization_methods
    from pythia_attribution.behaviors import read_file

    lines = [f"ok      profile {profile.name}: keys, types, ranges and cross-key rules"]
    attribute, memorization = profile.attribute, profile.memorization
    methods_file = paths.resolve_input(attribute.methods_file)
    load_methods(methods_file, attribute.methods)
    memorization_methods(methods_file, memorization.methods)
    lines.append(
        f"ok      methods {methods_file}: {', '.join(sorted({*attribute.methods, *memorization.methods}))}"
    )
    if stages is None or paths.ANALYSES in stages:
        analysed_methods(methods_file, attribute.methods, profile.analyses.methods)
    for key, names, what in (
        ("leave_out.methods", profile.leave_out.methods,
         "leave-k-out removes what a method the attribute stage ran retrieved"),
        ("causal.methods", profile.causal.methods,
         "tail-patch steps on what a method the attribute stage ran retrieved"),
    ):  # fmt: skip
        if stages is not None and key.split(".")[0] not in stages:
            continue
        unknown = [n for n in names if n not in attribute.methods]
        if unknown:
            raise ConfigError(f"{key}: '{unknown[0]}' is not in attribute.methods ({what})")
    leave_out = stages is None or paths.LEAVE_OUT in stages
    if leave_out and profile.leave_out.methods and profile.train.source != "train":
        raise ConfigError(
            f"leave_out.methods: retraining needs train.source = 'train', not '{profile.train.source}'; "
            "set leave_out.methods = [] for this profile"
        )
    if profile.corpus.source == "micro-pile":
        from pythia_attribution.corpus.manifest import load_manifest

        manifest = load_manifest(paths.resolve_input(profile.corpus.manifest))
        for name in profile.corpus.natural_sources:
            manifest.source(name)
        lines.append(f"ok      source manifest {manifest.path}")
    if profile.world.manifest:
        from pythia_attribution.sources.hub import world_manifest

        hub = world_manifest(profile)
        lines.append(f"ok      Hub manifest {hub.path}: {len(hub.revisions)} revisions pinned")

    folder = paths.resolve_input(profile.probe.behaviors_dir)
    if not deep or stage.read_record(profile.name, paths.CORPUS) is None:
        files = sorted(folder.glob("*.toml"))
        seen: dict[str, str] = {}  # the ids written out; a behavior_set's come from the corpus's items
        for path in files:
            for entry in read_file(path)[0]:
                if entry.id in seen:
                    raise ConfigError(
                        f"{path}: duplicate behavior id '{entry.id}' (also in {folder / seen[entry.id]})"
                    )
                seen[entry.id] = path.name
        if not files:
            raise ConfigError(f"{folder}: no behavior files (*.toml)")
        lines.append(
            f"ok      behaviors {folder}: {len(files)} file{'s' * (len(files) != 1)} (structure only: run "
            "the corpus stage to check them against the tokenizer)"
        )
        lines.extend(_check_variant_files(profile, None, None))
        return lines
    from pythia_attribution.probe import read_behaviors

    trained = stage.read_record(profile.name, paths.TRAIN) is not None
    train_dir = paths.stage_dir(profile.name, paths.TRAIN) if trained else None
    corpus_dir = paths.stage_dir(profile.name, paths.CORPUS)
    inputs = read_behaviors(profile.probe, corpus_dir, train_dir)
    if inputs.limits is None:
        lines.append(
            f"ok      behaviors {folder}: {len(inputs.behaviors)} behaviors tokenize (train the model "
            "to check them against its context)"
        )
    else:
        positions = sorted({p for p, _ in inputs.limits.values()})
        lines.append(
            f"ok      behaviors {folder}: {len(inputs.behaviors)} behaviors fit all {len(inputs.limits)} "
            f"checkpoints (context {', '.join(map(str, positions))} positions)"
        )
    lines.extend(_check_variant_files(profile, corpus_dir, inputs.tokenizer))
    return lines


def _check_variant_files(profile: Profile, corpus_dir, tokenizer) -> list[str]:
    """The word-order file (analyses) and the paraphrase file (causal's select-and-fine-tune), read
    as those stages read them: their structure and templates always, each query filled in and
    tokenized once the corpus exists (its ground truth and tokenizer)."""
    import pyarrow as pa

    from pythia_attribution import tables
    from pythia_attribution.behaviors import encoder
    from pythia_attribution.variants import read_variants

    files = [("word-order variants", profile.analyses.word_order_file)]
    if profile.causal.finetune_families:
        files.append(("paraphrases", profile.causal.paraphrase_file))
    if corpus_dir is None:
        ground_truth, encode, scope = pa.table({}), None, "structure only"
    else:
        ground_truth = tables.read_table(
            paths.table_path(corpus_dir, paths.GROUND_TRUTH_TABLE), made_by=paths.CORPUS
        )
        encode, scope = encoder(tokenizer), "filled in and tokenized"
    lines = []
    for what, name in files:
        if not name:
            continue
        path = paths.resolve_input(name)
        queries = read_variants(path, ground_truth, encode)
        count = "" if encode is None else f"{len(queries)} queries, "
        lines.append(f"ok      {what} {path}: {count}{scope}")
    return lines
