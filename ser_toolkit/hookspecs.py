"""The sertk plugin hooks: these docstrings are the plugin reference.

A plugin is any module or object with functions named after these hooks and
decorated with :data:`ser_toolkit.hookimpl`. Third-party plugins are found
through the ``sertk`` entry-point group::

    [project.entry-points.sertk]
    my_plugin = "my_package.my_module"

Every hook receives one ``registry`` argument. New information is added to
that object, never as new hook arguments, so a plugin written today keeps
working. A hook implementation may also accept no arguments it does not use
(pluggy passes only the arguments an implementation names).

Built-in plugins (``ser_toolkit/plugins/``) use exactly these hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ser_toolkit.registry import ProviderRegistry

hookspec = pluggy.HookspecMarker("sertk")


@hookspec
def register_datasets(registry: "ProviderRegistry") -> None:
    """Register dataset plugins: ``registry.register(MyDataset)``.

    ``MyDataset`` subclasses :class:`ser_toolkit.datasets.Dataset` and sets:

    - ``name``: the name users type (``sertk cache NAME``); unique across all plugins.
    - ``description``: one line for ``sertk plugins``.
    - ``label_map``: corpus label -> canonical emotion (``neutral``, ``happy``, ``sad``,
      ``angry``, ``fear``, ``disgust``, ``surprise``) or ``None`` for labels that
      are dropped. Declared explicitly, so every mapping is visible and listed.
    - ``params``: a tuple of :class:`ser_toolkit.params.Param`; user values
      (``--set key=value``) are validated when the dataset is constructed.
    - ``needs_root``: ``False`` for corpora made in code (no ``--root``).

    and implements ``scan(root) -> Scan``: the utterances found under ``root``
    (id, audio path, emotion, speaker, gender, corpus, extra fields) plus counts of
    files ignored and why. Datasets that synthesise audio also override
    ``load(utterance)`` and ``fingerprint(utterance)``.
    """


@hookspec
def register_augmentations(registry: "ProviderRegistry") -> None:
    """Register augmentation plugins: ``registry.register(MyAugmentation)``.

    ``MyAugmentation`` subclasses :class:`ser_toolkit.augmentations.Augmentation` and sets:

    - ``name``, ``description``, and ``params`` (a tuple of
      :class:`ser_toolkit.params.Param` with defaults, units and allowed
      ranges/choices, validated at construction; cross-parameter checks go in
      ``check_options()``).
    - ``stochastic = False`` if the output never depends on the seed;
      ``needs_partners = True`` if it draws other utterances.

    and implements ``apply(wave, rng, context) -> (new_wave, params)``:

    - ``wave``: 16 kHz mono float32; never modify it in place.
    - ``rng``: a ``numpy.random.Generator``; the only source of randomness, so the
      same seed gives bit-identical output.
    - ``context``: an :class:`ser_toolkit.augmentations.AugmentContext` with the
      input's ``utterance_id`` and ``emotion`` and ``partners``, a pool of
      training-split utterances (``context.partners.draw(rng, "neutral")``;
      ``pick`` draws the id alone and ``size(id)`` gives its length, for ``randomize``).
    - ``params``: the values actually sampled, JSON-serialisable (they are logged
      per utterance).

    Or, in two steps (as audiomentations does; optional, recommended for
    augmentations that change the length):

    - ``randomize(n, rng, context) -> plan``: every parameter sampled for an
      ``n``-sample input, before any audio is processed; the same draws from
      ``rng``, in the same order, as a one-step ``apply`` would make. A plan is a
      picklable dict (keys starting with ``_`` may hold what is not logged, e.g. a
      generator state or an impulse response).
    - ``apply_params(wave, plan, context) -> (new_wave, params)``: renders the
      plan, drawing nothing. ``apply`` is then ``randomize`` + ``apply_params``.
    - ``output_length(n, plan) -> int``: the output's samples (default ``n``;
      override it when the length changes, e.g. ``timestretch``).

    ``keeps_length = True`` declares that the output always has the input's
    length. Training with ``--batch-seconds`` forms each epoch's batches on the
    lengths that epoch's augmentation produces: it samples the plans first and
    computes their lengths. For a one-step plugin it renders the audio to learn
    the length, in the training process, every epoch (slow; ``keeps_length``
    avoids it).

    Augmentations keep the input's label. Objects must pickle (they run in
    DataLoader workers). Run ``ser_toolkit.testing.check_augmentation(MyAugmentation)``
    in your tests: it checks all of the above.
    """


@hookspec
def register_featurizers(registry: "ProviderRegistry") -> None:
    """Register featurizer plugins: ``registry.register(MyFeaturizer)``.

    ``MyFeaturizer`` subclasses :class:`ser_toolkit.featurizers.Featurizer` and sets
    ``name``, ``description``, ``params`` (validated at construction) and
    ``version`` (bump it when the output changes for the same options: cached
    features are keyed by name, options and version). It implements
    ``extract(wave, rate) -> np.ndarray``: a float32 array of the same shape for
    every utterance (e.g. eGeMAPS functionals, or every layer's pooled hidden
    states of a frozen SSL model). ``parallel = False`` runs ``extract_many``
    (override it to batch) in the calling process instead of worker processes,
    e.g. for a model on a GPU. ``feature_names()`` may name a vector's entries.

    Features are computed once per input cache and featurizer into the feature
    cache beside it (``sertk features``) and reused by every run, seed, fold and
    evaluation; feature models (``features=NAME``) read them from there.
    """


@hookspec
def register_models(registry: "ProviderRegistry") -> None:
    """Register model plugins: ``registry.register(MyModel)``.

    ``MyModel`` subclasses :class:`ser_toolkit.models.ModelPlugin` and sets
    ``name``, ``description``, ``params`` and ``train_defaults`` (training
    settings it prefers, e.g. ``{"lr": 1e-3, "epochs": 30}``, by the names
    ``sertk train --help`` lists, declared in ``ser_toolkit/settings.py``; they
    replace the declared defaults, and config files and options replace them).
    It implements:

    - ``build(num_labels, run_dir=None)``: a new torch module for training. It
      may save into ``run_dir`` what ``rebuild`` needs (e.g. a config).
    - ``rebuild(num_labels, run_dir)``: the same architecture without network
      access; the weights then come from the run's checkpoint.

    The module maps ``(inputs, attention_mask)`` to logits over the canonical
    emotions and mixes in :class:`ser_toolkit.models.SerModelMixin`:
    ``input_kind`` (``"wave"``: padded audio batches with an attention mask;
    ``"vector"``: fixed-size feature vectors), ``featurizer()`` (a picklable
    per-utterance preprocessing function run in DataLoader workers),
    ``static_features`` (its output may be computed once) and ``prepare(features)``
    (called with the training inputs before training, e.g. to fit a
    standardiser). Training, evaluation and prediction are the same for every model.
    """
