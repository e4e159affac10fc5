"""The ``sertk`` command line (Typer + rich).

Heavy libraries (numpy, h5py, torch, librosa...) are imported inside the
commands that need them, so ``sertk --help`` stays instant. User errors
(:class:`ser_toolkit.errors.SertkError`, usage errors, unreadable paths) print
one line and exit 2; ``--debug`` (or ``SERTK_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ser_toolkit import __version__
from ser_toolkit.errors import WRITE_ELSEWHERE, DiskFull, SertkError, os_error_line
from ser_toolkit.settings import EVAL_BATCH_SECONDS, EXECUTION, GPU_EVAL_BATCH, SETTINGS

app = typer.Typer(
    name="sertk",
    help="Speech emotion recognition toolkit: cache corpora, augment, train HuBERT models, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_CACHE_DIR = Path("cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sertk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Speech emotion recognition toolkit."""


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _dataset(name: str, assignments: Optional[List[str]]):
    from ser_toolkit.params import parse_assignments
    from ser_toolkit.registry import get

    cls = get("dataset", name).obj
    return cls(**parse_assignments(assignments))


@app.command()
def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only dataset, augmentation, featurizer or model plugins."),
) -> None:
    """List every plugin: kind, name, provider, parameters with defaults and allowed values."""
    from ser_toolkit.registry import KINDS, get_registry

    if kind is not None and kind not in KINDS:
        raise SertkError(f"unknown plugin kind {kind!r}", f"use one of {', '.join(KINDS)}")
    entries = [e.describe() for e in get_registry().entries(kind)]
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    from rich.table import Table

    table = Table("kind", "name", "provider", "parameters", "description", show_lines=False)
    for e in entries:
        params = "\n".join(
            f"{p['name']}={p['default']}" + (f" ({'|'.join(map(str, p['choices']))})" if "choices" in p else "")
            for p in e["params"]) or "-"
        table.add_row(e["kind"], e["name"], f"{e['distribution']} {e['version']}", params,
                      e["description"] + (f" (down-mix: {e['mono']})" if e.get("mono") else ""))
    _console().print(table)


@app.command()
def cache(
    dataset: str = typer.Argument(..., help="Dataset plugin name (see 'sertk plugins'); with --verify, a cache."),
    root: Optional[Path] = typer.Option(None, "--root", help="Corpus folder (not needed for synthetic corpora)."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Folder of cache files."),
    name: Optional[str] = typer.Option(None, "--name", help="Cache file stem (default: the dataset's)."),
    assignments: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Dataset parameter key=value."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", "-j", min=1, help="Decoding processes."),
    mono: Optional[str] = typer.Option(None, "--mono", help="Down-mix rule: mean, first or loudest "
                                                            "(default: the dataset's own, usually mean)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Stored sample type: float32 (default) or int16."),
    resampler: Optional[str] = typer.Option(None, "--resampler", help="soxr-hq (default; = librosa.load) or "
                                                                      "soxr-vhq."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Skip longer files (default 600)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad file instead of skipping it."),
    force: bool = typer.Option(False, "--force", help="Replace the cache even if it holds another corpus, other "
                                                      "options or is not a sertk cache."),
    verify: bool = typer.Option(False, "--verify", help="Check every checksum of an existing cache; build nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON."),
) -> None:
    """Decode and resample a corpus once into an HDF5 cache of model inputs (or --verify one)."""
    from dataclasses import asdict

    from ser_toolkit.cache.build import build_cache, cache_file, preprocess_for

    if verify:
        ignored = [flag for flag, value in (("--root", root), ("--name", name), ("--set", assignments),
                                            ("--mono", mono), ("--dtype", dtype), ("--resampler", resampler),
                                            ("--max-seconds", max_seconds), ("--strict", strict),
                                            ("--force", force)) if value]
        if ignored:
            raise SertkError(f"--verify checks an existing cache and builds nothing, so {', '.join(ignored)} "
                             f"{'does' if len(ignored) == 1 else 'do'} not apply",
                             "drop them, or build without --verify")
        _verify_cache(dataset, cache_dir, quiet or as_json, as_json)
        return
    ds = _dataset(dataset, assignments)
    if ds.needs_root:
        from ser_toolkit.datasets import check_root

        root = check_root(dataset, root, allow_file=ds.root_may_be_file)
    elif root is not None:
        raise SertkError(f"dataset '{dataset}' is made in code and takes no --root", "drop --root")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SertkError(f"--cache-dir {cache_dir} is a file, not a folder", "pass a folder for cache files")
    path = cache_file(cache_dir, name or ds.cache_name())
    pre = preprocess_for(ds, mono, dtype, resampler, max_seconds)
    summary = build_cache(ds, root, path, pre, workers=workers, strict=strict, quiet=quiet or as_json, force=force,
                          protect_runs=True)
    if as_json:
        typer.echo(json.dumps(asdict(summary), indent=2))
        return
    con = _console()
    state = "unchanged" if summary.unchanged else (summary.mode if summary.rebuilt else "written")
    con.print(f"[bold]{path}[/bold] {state}: {summary.utterances} utterances, {summary.hours:.2f} h "
              f"({summary.decoded} decoded, {summary.reused} reused, {summary.resumed} resumed) "
              f"in {summary.seconds:.1f} s; data {summary.digest[:12]}")
    for reason, count in sorted(summary.ignored.items()):
        con.print(f"  ignored {count} files: {reason}")
    if summary.clipped_utterances:
        con.print(f"  {summary.clipped_utterances} utterances contain clipped samples")
    for s in summary.skipped:
        con.print(f"  [yellow]skipped[/yellow] {s['reason']}")


def _verify_cache(cache_arg: str, cache_dir: Path, quiet: bool, as_json: bool) -> None:
    """``sertk cache --verify``: every chunk checksum and utterance digest of a cache; exit 2 if damaged."""
    from ser_toolkit.cache.build import locate_cache, verify_cache

    path = locate_cache(cache_arg, cache_dir)
    result = verify_cache(path, quiet=quiet)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    if result["damaged"]:
        raise SertkError(f"cache {path} is damaged: {len(result['damaged'])} of {result['utterances']} utterances "
                         f"fail their checksums (first: {result['damaged'][0]})",
                         "rebuild it with 'sertk cache DATASET --force'")
    if not as_json:
        _console().print(f"{path}: OK, {result['utterances']} utterances, data {result['digest'][:12]}")


def _cache_path(cache_arg: str) -> Path:
    """A cache path, or a cache name looked up as ``cache/<name>.h5``."""
    from ser_toolkit.cache.build import locate_cache

    return locate_cache(cache_arg, DEFAULT_CACHE_DIR)


@app.command()
def inspect(
    cache_file: str = typer.Argument(..., metavar="CACHE", help="Cache file (or dataset name in ./cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Summarise a cache: utterances per emotion and speaker, hours, config, skipped files, feature caches."""
    from ser_toolkit.cache.features import feature_caches
    from ser_toolkit.cache.reader import CacheReader

    reader = CacheReader(_cache_path(cache_file))
    summary = reader.summary()
    summary["feature_caches"] = feature_caches(reader.path, reader.digest)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    con.print(f"[bold]{summary['path']}[/bold]: {summary['dataset']}, {summary['utterances']} utterances, "
              f"{summary['hours']:.2f} h at {summary['sample_rate']} Hz, "
              f"{len(summary['speakers'])} speakers, schema {summary['schema_version']}, "
              f"data {summary['digest'][:12]}")
    t = Table("emotion", "utterances")
    for e, n in summary["emotions"].items():
        t.add_row(e, str(n))
    con.print(t)
    con.print("genders: " + ", ".join(f"{g} {n}" for g, n in summary["genders"].items()))
    pre = summary["config"]["preprocess"]
    con.print(f"preprocessing: {pre['mono']} down-mix, {pre['resampler']}, {pre['dtype']}")
    for reason, count in sorted(summary["ignored"].items()):
        con.print(f"ignored {count} files: {reason}")
    for s in summary["skipped"]:
        con.print(f"skipped {s['reason']}")
    for f in summary["feature_caches"]:
        size = f"{f['size_bytes'] / 1e6:.1f} MB" if f["size_bytes"] >= 1e6 else f"{f['size_bytes'] / 1e3:.0f} kB"
        if "error" in f:
            con.print(f"features {f['path']}: [red]damaged[/red] ({size}): {escape(f['error'])}")
            continue
        options = ", ".join(f"{k}={v}" for k, v in f["options"].items()) or "default options"
        state = "current" if f["state"] == "current" else "[yellow]stale[/yellow] (the cache changed since)"
        con.print(f"features {f['featurizer']} ({escape(options)}; version {f['version']}): shape "
                  f"{tuple(f['shape'])}, {f['utterances']} utterances, {state}, {size}, {f['path']}")


@app.command()
def features(
    cache_file: str = typer.Argument(..., metavar="CACHE", help="Cache file, or a cache name in --cache-dir."),
    featurizer: str = typer.Option(..., "--featurizer", "-f",
                                   help="Featurizer plugin (see 'sertk plugins --kind featurizer')."),
    assignments: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Featurizer parameter key=value."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Folder of cache files (for a name)."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", "-j", min=0,
                                help="Feature processes (0 or 1: in this process)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Compute a featurizer's features for every utterance of a cache once (incremental, resumable).

    They are stored beside the cache in CACHE.features/<featurizer>-<key>.h5 and
    reused by every run; a rerun computes only new or changed utterances.
    """
    import time

    from rich.markup import escape

    from ser_toolkit.cache.build import locate_cache
    from ser_toolkit.cache.features import load_features
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.featurizers import get_featurizer
    from ser_toolkit.params import parse_assignments

    feat = get_featurizer(featurizer, parse_assignments(assignments))
    t0 = time.perf_counter()
    reader = CacheReader(locate_cache(cache_file, cache_dir))
    err = _console(stderr=True)
    fr = load_features(reader, feat, workers=workers, quiet=quiet or as_json,
                       log=lambda msg: err.print(f"[yellow]{escape(msg)}[/yellow]", soft_wrap=True))
    seconds = time.perf_counter() - t0
    n = len(fr)
    build = {"computed": 0, "reused": n, "resumed": 0, "utterances_per_s": None} if fr.hit else fr.build
    result = {"path": str(fr.path), "cache": str(reader.path), "featurizer": fr.identity, "key": feat.key(),
              "utterances": n, "shape": list(fr.shape), "unchanged": bool(fr.hit),
              "computed": build.get("computed", 0), "reused": build.get("reused", 0),
              "resumed": build.get("resumed", 0), "shared": build.get("shared", 0), "seconds": round(seconds, 3),
              "utterances_per_s": build.get("utterances_per_s"), "digest": fr.digest,
              "source_digest": fr.source_digest}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    speed = f", {result['utterances_per_s']:.1f} utt/s" if result["utterances_per_s"] else ""
    _console().print(f"[bold]{escape(str(fr.path))}[/bold] {'unchanged' if fr.hit else 'written'}: {n} utterances, "
                     f"shape {tuple(fr.shape)} ({result['computed']} computed, {result['reused']} reused, "
                     + (f"{result['shared']} from other sets, " if result["shared"] else "")
                     + f"{result['resumed']} resumed) in {seconds:.1f} s{speed}; features {fr.digest[:12]}",
                     soft_wrap=True)


@app.command()
def split(
    cache_file: str = typer.Argument(..., metavar="CACHE", help="Cache file (or dataset name in ./cache)."),
    spec: str = typer.Option("stratified", "--split", help="stratified|speaker|kfold|loso[:opts] or file:PATH (kfold:k=6,order=sorted: the EmoBox folds)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write utterance,split CSV here."),
    as_json: bool = typer.Option(False, "--json", help="Print counts as JSON."),
) -> None:
    """Apply a split spec to a cache; print counts per split and emotion, optionally write the CSV."""
    from collections import Counter

    from ser_toolkit import atomic
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.emotions import EMOTIONS
    from ser_toolkit.splits import make_split

    reader = CacheReader(_cache_path(cache_file))
    utts = reader.utterances
    assignment = make_split(utts, spec)
    counts: dict = {}
    for u in utts:
        side = counts.setdefault(assignment[u.id], {"utterances": 0, "emotions": Counter(), "speakers": set()})
        side["utterances"] += 1
        side["emotions"][u.emotion] += 1
        side["speakers"].add(u.speaker)
    result = {name: {"utterances": s["utterances"], "emotions": {e: s["emotions"].get(e, 0) for e in EMOTIONS},
                     "speakers": sorted(s["speakers"])} for name, s in sorted(counts.items())}
    if output is not None:
        atomic.write_text(output, "utterance,split\n" + "".join(f"{u.id},{assignment[u.id]}\n" for u in utts))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    con = _console()
    for name, s in result.items():
        con.print(f"[bold]{name}[/bold]: {s['utterances']} utterances, {len(s['speakers'])} speakers; "
                  + ", ".join(f"{e} {n}" for e, n in s["emotions"].items()))
    if output is not None:
        con.print(f"wrote {output}")


def _click_exceptions():
    """Typer >= 0.20 vendors click as ``typer._click``; older versions raise click's own classes."""
    from types import SimpleNamespace

    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import ClickException

        NoArgsIsHelpError = type("_Never", (Exception,), {})
    return SimpleNamespace(Exit=typer.Exit, Abort=typer.Abort, ClickException=ClickException,
                           NoArgsIsHelpError=NoArgsIsHelpError)


def _grouped_options(assignments: Optional[List[str]], names: List[str]) -> dict:
    """``--set name.key=value`` (or ``key=value`` with one method) -> {name: {key: value}}."""
    from ser_toolkit.params import parse_assignments

    out: dict = {n: {} for n in names}
    for key, value in parse_assignments(assignments).items():
        method, dot, param = key.partition(".")
        if not dot:
            if len(names) != 1:
                raise SertkError(f"--set {key}=... is ambiguous with several augmentations",
                                 f"write --set METHOD.{key}=... (methods: {', '.join(names)})")
            method, param = names[0], key
        if method not in out:
            raise SertkError(f"--set {key}: '{method}' is not one of the chosen augmentations",
                             f"chosen: {', '.join(names)}")
        out[method][param] = value
    return out


@app.command()
def augment(
    name: str = typer.Argument(..., help="Augmentation plugin name (see 'sertk plugins --kind augmentation')."),
    input_file: Path = typer.Argument(..., metavar="IN", help="Input audio (any common format, rate, channels)."),
    output_file: Path = typer.Argument(..., metavar="OUT", help="Output file (16 kHz; format from the extension)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    assignments: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Fix a parameter: key=value."),
    partner: Optional[Path] = typer.Option(None, "--partner", help="Partner utterance (ncp: the neutral one)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"augmentation": NAME, "params": {...}}.'),
    mono: str = typer.Option("mean", "--mono", help="Down-mix rule for multichannel input: mean, first or loudest."),
) -> None:
    """Augment one file and print the parameters it sampled, to listen to an augmentation."""
    import numpy as np
    import soundfile as sf

    from ser_toolkit import atomic
    from ser_toolkit.audio import load
    from ser_toolkit.augmentations import AugmentContext, PartnerPool
    from ser_toolkit.params import parse_assignments
    from ser_toolkit.registry import get

    from ser_toolkit.audio import MONO_RULES

    if mono not in MONO_RULES:
        raise SertkError(f"unknown --mono rule {mono!r}", f"use one of {', '.join(MONO_RULES)}")
    if output_file.exists() and input_file.exists() and output_file.resolve() == input_file.resolve():
        raise SertkError(f"OUT {output_file} is the input file", "write the augmented audio to another file")
    cls = get("augmentation", name).obj
    aug = cls(**parse_assignments(assignments))
    formats = {f".{k.lower()}": k for k in sf.available_formats()}
    fmt = formats.get(output_file.suffix.lower())
    if fmt is None:
        raise SertkError(f"cannot write {output_file}: unknown audio extension {output_file.suffix!r}",
                         "use .wav, .flac or .ogg")
    wave = load(input_file, mono)
    context = AugmentContext(utterance_id=input_file.stem, emotion=None)
    if partner is not None:
        other = load(partner, mono)
        context.partners = PartnerPool(["partner"], ["neutral"], lambda _: other, split="given")
        context.extra["partner_id"] = "partner"
    elif getattr(cls, "needs_partners", False):
        raise SertkError(f"augmentation '{name}' needs a partner utterance", "pass --partner NEUTRAL_FILE")
    out, params = aug(wave, np.random.default_rng(seed), context)
    if out.size and np.abs(out).max() > 1:
        params = {**params, "output_peak": float(np.abs(out).max())}
    with atomic.atomic_path(output_file) as tmp:
        try:
            sf.write(str(tmp), out, 16000, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
        except sf.LibsndfileError as exc:  # libsndfile says "System error." for a full disk
            import errno
            import shutil

            if shutil.disk_usage(tmp.parent).free < 4 * out.nbytes + (1 << 20):
                raise OSError(errno.ENOSPC, "No space left on device", str(output_file.parent)) from None
            raise SertkError(f"cannot write {output_file}: {exc}", "check the path and its permissions") from None
    if as_json:
        typer.echo(json.dumps({"augmentation": name, "params": params}))
        return
    _console().print(f"wrote {output_file}: {wave.size / 16000:.2f} s -> {out.size / 16000:.2f} s, {name} "
                     + ", ".join(f"{k}={v}" for k, v in params.items()))


@app.command()
def materialize(
    cache_file: str = typer.Argument(..., metavar="CACHE", help="Cache file (or dataset name in ./cache)."),
    plugins_arg: str = typer.Option(..., "--plugins", help="Comma-separated augmentation names."),
    spec: str = typer.Option("stratified", "--split", help="Split spec (see 'sertk split')."),
    subset: str = typer.Option("test", "--subset", help="test: one set per method plus 'mixed'; train: copies."),
    copies: int = typer.Option(1, "--copies", min=1, help="Augmented copies per utterance (train)."),
    seed: int = typer.Option(0, "--seed", help="Seed (per utterance id, so order does not matter)."),
    assignments: Optional[List[str]] = typer.Option(None, "--set", "-s", help="METHOD.key=value parameters."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Materialise augmented sets into the cache folder: held-out sets per method and mixed, or training copies."""
    from ser_toolkit.augment_sets import build_augmentation, materialize as write_set, materialize_heldout
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.splits import make_split

    names = [n.strip() for n in plugins_arg.split(",") if n.strip()]
    if not names:
        raise SertkError("--plugins is empty", "name at least one augmentation, e.g. --plugins specaugment")
    options = _grouped_options(assignments, names)
    reader = CacheReader(_cache_path(cache_file))
    assignment = make_split(reader.utterances, spec)
    parts = sorted(set(assignment.values()))
    if subset not in parts:
        raise SertkError(f"--subset {subset!r} is not a part of split {spec!r}", f"use one of {', '.join(parts)}")
    con = _console()
    if subset == "train":
        done = {n: write_set(reader, assignment, subset, n, build_augmentation([n], options), copies=copies,
                             seed=seed, aug_config={"methods": {n: options[n]}}, quiet=quiet) for n in names}
    else:
        done = materialize_heldout(reader, assignment, subset, names, options, seed=seed, quiet=quiet,
                                   log=lambda msg: con.print(f"[yellow]{msg}[/yellow]"))
    for path, written in done.values():
        con.print(f"{path} {'written' if written else 'unchanged'}")


def _cross_paths(specs: Optional[List[str]], cache_dir: str) -> list:
    """``--cross`` values (cache names in ``cache_dir`` or cache paths) as absolute paths of existing caches."""
    from ser_toolkit.cache.identity import cache_name
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.evaluation import distinct_sets
    from ser_toolkit.training.loop import resolve_cache

    paths = [resolve_cache(spec, cache_dir).resolve() for spec in specs or ()]
    readers = [CacheReader(p) for p in paths]  # each named by what it holds: two of one name are refused now
    distinct_sets([(f"cross-{cache_name(r.config)}", r, None, {}) for r in readers])
    return [str(p) for p in paths]


def _parse_weights(text: Optional[str]) -> Optional[dict]:
    """``NAME=W,...`` (``--weights``) -> {name: weight}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SertkError(f"--weights item {item!r} is not NAME=NUMBER", "e.g. --weights specaugment=0.6,noise=0.4")
    return out


def _with_settings(command=None, *, study: bool = False):
    """Give ``command`` one option per generated training setting (see :mod:`ser_toolkit.settings`).

    Typer reads options from the signature, so the declared settings become keyword
    parameters (collected by ``**given``) with the declared default, help and flag;
    the command tells the given ones by :func:`_given`. ``@_with_settings(study=True)``:
    only the settings a study's ``[training]`` takes, overriding the config.
    """
    import inspect as _inspect

    from ser_toolkit.settings import TRAIN_SETTINGS

    if command is None:
        return lambda c: _with_settings(c, study=study)

    def shown(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return format(v, "g") if isinstance(v, (int, float)) else str(v)

    kinds = {"int": int, "float": float, "str": str, "path": Path, "bool": bool}
    sig = _inspect.signature(command, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params}
    for s in TRAIN_SETTINGS:
        if not s.generated or (study and not s.study):
            continue
        if s.name in taken:
            raise TypeError(f"{command.__name__}: option {s.name!r} is both hand-written and generated")
        decls = [f"{s.option}/--no-{s.option[2:]}"] if s.type == "bool" else [s.option]
        text = s.help + (f" Unit: {s.unit}." if s.unit else "")
        fallback = "the model's, else " if s.model_default else ""
        if study:
            text += f"  [default: the config's, else {fallback}{'unset' if s.default is None else shown(s.default)}]"
        elif s.model_default:
            text += f"  [default: {fallback}{shown(s.default)}]"
        metavar = "[" + "|".join(s.choices) + "]" if s.choices else None
        option = typer.Option(s.default, *decls, help=text, metavar=metavar,
                              show_default=s.default is not None and not s.model_default and not study)
        kind = kinds[s.type]
        params.append(_inspect.Parameter(s.name, _inspect.Parameter.KEYWORD_ONLY, default=option,
                                         annotation=Optional[kind] if s.default is None else kind))
    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    return command


def _given(ctx) -> set:
    """Names of the options given on the command line (not left at their defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(name)
    return out


# hand-written train options -> the TrainConfig fields they set (generated options set their own)
_OPTION_FIELDS = {"plugins_arg": ("plugins",), "assignments": ("plugin_options",), "weights": ("weights", "plugins"),
                  "weights_from": ("weights", "weights_from", "plugins"), "top_k": ("weights", "weights_from"),
                  "model": ("model",), "model_set": ("model_options",), "freeze_feature_encoder": ("model_options",),
                  "probe": ("model_options",), "gradient_checkpointing": ("model_options",)}


def _given_fields(given: set) -> set:
    """The TrainConfig fields that the given ``sertk train`` options set."""
    fields = set()
    for name in given:
        fields.update(_OPTION_FIELDS.get(name, (name,) if name in SETTINGS else ()))
    return fields


def _resume_changes(stored: dict, wanted: dict, given: set, run_dir: Optional[Path] = None) -> List[str]:
    """``name: stored -> wanted`` for each setting that a given option changes (runtime settings may change;
    the training cache may be given at another place if it holds the data the run started on)."""
    from ser_toolkit.settings import RUNTIME, SETTINGS

    fields = _given_fields(given)

    def same(name: str) -> bool:
        old, new = stored.get(name), wanted[name]
        if name in ("dataset", "cache_dir") and run_dir is not None and _same_data(run_dir, wanted):
            return True
        if SETTINGS[name].type == "path" and old is not None and new is not None:
            return Path(old) == Path(new)
        return old == new

    def show(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    return [f"{n}: {show(stored.get(n))} -> {show(wanted[n])}" for n in SETTINGS
            if n in fields and n not in RUNTIME and not same(n)]


def _same_data(run_dir: Path, wanted: dict) -> bool:
    """Whether the cache ``wanted`` names holds the data run ``run_dir`` started on (by content digest)."""
    from ser_toolkit.cache.reader import CacheReader
    from ser_toolkit.training import runs
    from ser_toolkit.training.loop import resolve_cache

    try:
        reader = CacheReader(resolve_cache(wanted["dataset"], wanted["cache_dir"]))
        return reader.digest == runs.run_info(run_dir)["data"]["cache"]["digest"]
    except (SertkError, KeyError, TypeError):
        return False


def _check_new_run(run_dir: Path) -> None:
    """A new run never starts in a folder that holds one (finished or not)."""
    from ser_toolkit.training import runs

    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        if runs.is_sealed(run_dir):
            raise SertkError(f"{run_dir} already holds a finished run", "evaluate it (sertk evaluate "
                             f"{run_dir}), or train a new run with another --out")
        raise SertkError(f"{run_dir} holds an unfinished run", "pass --resume to continue it, or another --out")


def _is_run_config(run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` is a regular file sertk wrote for a run (JSON with its 'train' table)."""
    import json

    path = run_dir / "config.json"
    try:
        return path.is_file() and not path.is_symlink() and isinstance(json.loads(path.read_text()).get("train"),
                                                                        dict)
    except (OSError, ValueError, AttributeError):
        return False


def _check_model_name(model: str, registry) -> None:
    """``--model`` is a model plugin, a hub id (org/name) or a folder; a bare unknown name is a typo."""
    import difflib

    names = registry.names("model")
    if model in names or "/" in model or "\\" in model or Path(model).expanduser().exists():
        return
    close = difflib.get_close_matches(model, names, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    raise SertkError(f"unknown model '{model}'",
                     f"{guess}--model takes a model plugin ({', '.join(names)}; see 'sertk plugins'), a Hugging "
                     "Face hub id of the form org/name, or a local model folder")


@app.command()
@_with_settings
def train(
    ctx: typer.Context,
    plugins_arg: str = typer.Option("", "--plugins", help="Augmentations, comma-separated."),
    weights: Optional[str] = typer.Option(None, "--weights", help="NAME=W,... probabilities of a combination."),
    weights_from: Optional[List[Path]] = typer.Option(None, "--weights-from",
                                                      help="Baseline run, then one run per method (repeat)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="With --weights-from: keep the k largest gains."),
    model: str = typer.Option(SETTINGS["model"].default, "--model", help=SETTINGS["model"].help),
    model_set: Optional[List[str]] = typer.Option(None, "--model-set", help="Model parameter key=value."),
    cross: Optional[List[str]] = typer.Option(None, "--cross", help=SETTINGS["cross"].help),
    assignments: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Augmentation METHOD.key=value."),
    freeze_feature_encoder: bool = typer.Option(False, "--freeze-feature-encoder", help="Freeze the CNN encoder."),
    probe: bool = typer.Option(False, "--probe", help="Frozen encoder + learnable weighted sum of layers."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Save memory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<dataset>-<model>-<plugins>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint "
                                "(options that change its settings are refused)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    **settings_given: object,
) -> None:
    """Fine-tune a model on a cached corpus, with augmentation on the fly or materialised.

    The training settings below are declared once (ser_toolkit/settings.py); a
    study's [training] section takes the same names. Every resolved value is saved
    in RUN/config.json.
    """
    import signal
    import sys as _sys
    from dataclasses import asdict

    from ser_toolkit.params import parse_assignments
    from ser_toolkit.registry import get_registry
    from ser_toolkit.settings import RUNTIME
    from ser_toolkit.training import runs
    from ser_toolkit.training.checkpoints import TrainingStopped
    from ser_toolkit.training.loop import TrainConfig, train as run_training

    given = _given(ctx)
    values = {n: str(v) if isinstance(v, Path) else v for n, v in settings_given.items() if n in given}
    names = [n.strip() for n in plugins_arg.split(",") if n.strip()]
    registry = get_registry()
    for n in names:
        registry.get("augmentation", n)
    model_options = parse_assignments(model_set)
    _check_model_name(model, registry)
    if model not in registry.names("model"):
        model_options = {"checkpoint": model, **model_options}
        model = "hubert"
        given.add("model_set")  # the checkpoint is a model option
    plugin_cls = registry.get("model", model).obj
    flags = {"freeze_feature_encoder": freeze_feature_encoder, "probe": probe,
             "gradient_checkpointing": gradient_checkpointing}
    known = {p.name for p in plugin_cls.params}
    for flag, value in flags.items():
        if value:
            if flag not in known:
                raise SertkError(f"--{flag.replace('_', '-')} does not apply to model '{model}'", "drop the flag")
            model_options[flag] = True
    checked = plugin_cls(**model_options).options  # validated now; recorded with their declared types
    model_options = {k: checked[k] for k in model_options}
    folder = Path(str(model_options.get("checkpoint", ""))).expanduser()
    if model_options.get("checkpoint") and folder.is_dir():  # a local folder: found from any working directory
        model_options["checkpoint"] = str(folder.resolve())
    combo = _parse_weights(weights)
    weights_info = None
    if weights_from:
        if combo:
            raise SertkError("--weights and --weights-from exclude each other", "give one of them")
        from ser_toolkit.combination import gains_from_runs, weights_from_runs

        combo = weights_from_runs(weights_from[0], weights_from[1:], top_k)
        f1, base, _ = gains_from_runs(weights_from[0], weights_from[1:])
        weights_info = {"baseline": str(weights_from[0]), "runs": [str(r) for r in weights_from[1:]],
                        "f1": f1, "baseline_f1": base, "top_k": top_k, "weights": combo}
        names = list(combo)
    if combo and set(combo) != set(names):
        raise SertkError(f"--weights names {sorted(combo)} but --plugins names {sorted(names)}",
                         "name the same augmentations in both")
    cfg = TrainConfig.from_settings(values, {
        "plugins": names, "plugin_options": _grouped_options(assignments, names) if names else {},
        "weights": combo, "weights_from": weights_info, "model": model, "model_options": model_options,
        "cross": _cross_paths(cross, values.get("cache_dir", SETTINGS["cache_dir"].default))})
    if cfg.split.startswith("file:"):  # a split file is found again from any working directory
        cfg.split = "file:" + str(Path(cfg.split[5:]).expanduser().resolve())
    run_dir = out or Path("runs") / "-".join([Path(cfg.dataset).stem, cfg.model, *(cfg.plugins or ["clean"])])
    if run_dir.exists() and not resume and (run_dir / "config.json").exists() and not _is_run_config(run_dir):
        raise SertkError(f"{run_dir} holds a config.json that is not a sertk run's",
                         "pass another --out (sertk never writes over a file it did not write)")
    if resume:
        if not (run_dir / "config.json").is_file():
            raise SertkError(f"{run_dir} holds no run to resume", "drop --resume to start it")
        stored = runs.read_json(run_dir / "config.json")
        if not isinstance(stored, dict) or not isinstance(stored.get("train"), dict):
            raise SertkError(f"{run_dir / 'config.json'} is malformed (no 'train' settings)",
                             "the run folder is damaged; train a new run with another --out")
        stored = stored["train"]
        sealed = runs.read_json(run_dir / runs.SEAL_FILE) if runs.is_sealed(run_dir) else {}
        recorded = sealed.get("files", {}).get("config.json") if isinstance(sealed, dict) else None
        if recorded is not None and recorded != runs.file_digest(run_dir / "config.json"):  # not an option's fault
            raise SertkError(f"{run_dir / 'config.json'} was changed after the run was sealed ({runs.SEAL_FILE} "
                             "records another digest), so it no longer says how the run was trained",
                             "restore that file (the run is finished; nothing to resume), or train a new run "
                             "with another --out")
        changes = _resume_changes(stored, asdict(cfg), given, run_dir)
        if changes:
            raise SertkError(f"--resume: {run_dir} was trained with other settings ({'; '.join(changes)})",
                             "drop those options to continue it as it was, or train a new run with another --out")
        moved = {n: getattr(cfg, n) for n in ("dataset", "cache_dir") if n in _given_fields(given)}  # same data
        cfg = TrainConfig.from_settings(stored, {n: getattr(cfg, n) for n in RUNTIME if n in given}, moved)
        if runs.is_sealed(run_dir):
            print(f"{run_dir} is already finished (final.json); nothing to resume")
            return
    else:
        _check_new_run(run_dir)
    if cfg.early_stopping and not cfg.valid:
        raise SertkError("--early-stopping needs a validation split", "add --valid 0.1")
    from ser_toolkit.training.loop import resolve_cache

    if resume and (run_dir / runs.RUN_FILE).is_file():  # the data it started on, wherever it is now
        try:
            given: Optional[Path] = resolve_cache(cfg.dataset, cfg.cache_dir)
        except SertkError:
            given = None
        cache_path = runs.locate_cache(run_dir, runs.run_info(run_dir), given, option="--dataset")
    else:
        cache_path = resolve_cache(cfg.dataset, cfg.cache_dir)  # fails before anything is written
    created = not run_dir.exists()
    main_process = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 writes and prints
    if main_process:  # one writer per run folder: a lock on the folder itself, held until the command ends
        from ser_toolkit.atomic import lock_folder

        run_dir.mkdir(parents=True, exist_ok=True)
        held = lock_folder(run_dir, SertkError(f"another sertk process is training run {run_dir} now",
                                               "wait for it to end, or pass another --out"))
        ctx.call_on_close(lambda: os.close(held))
        if not resume:
            _check_new_run(run_dir)  # again, under the lock: another process may have trained it meanwhile
    if not resume and main_process:
        runs.write_run_config(run_dir, cfg, cache_path, ["sertk", *_sys.argv[1:]], _given_fields(given))
    try:
        summary = run_training(cfg, run_dir, resume=resume, quiet=quiet)
    except TrainingStopped as exc:  # its state is on disk: say how to go on (typer would turn it into "130")
        name = signal.Signals(exc.signum).name
        if main_process:
            print(f"Stopped by {name} once run {run_dir} was finished and sealed" if exc.finished else
                  f"Stopped by {name}; run {run_dir} keeps its state after epoch {exc.epochs_done} of {cfg.epochs}: "
                  f"continue it with 'sertk train --out {run_dir} --resume'" if exc.epochs_done else
                  f"Stopped by {name} before the first epoch ended; nothing to resume (run the command again)",
                  file=_sys.stderr)
        _sys.exit(exc.exit_code)
    except SertkError:
        if created and main_process and not runs.last_epoch_checkpoint(run_dir):  # refused before any epoch: none left
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not main_process:
        return
    if "classifier" in summary:  # a feature classifier, fitted once
        fitted = summary["classifier"]
        chosen = ", ".join(f"{k.replace('clf__', '')}={v}" for k, v in fitted["chosen"].items())
        _console().print(f"[bold]{run_dir}[/bold]: fitted on {fitted['features']} features ({chosen}; "
                         f"{fitted['cv']}, CV UAR {fitted['cv_uar']:.3f}) in {summary['seconds']:.1f} s")
        return
    last = summary["history"][-1] if summary["history"] else {}
    _console().print(f"[bold]{run_dir}[/bold]: {summary['epochs_run']} epochs, train loss "
                     f"{last.get('train_loss', float('nan')):.4f}, {last.get('utterances_per_s', 0):.1f} utt/s")


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (from sertk train)."),
    test: Optional[List[str]] = typer.Option(None, "--test", help="test, augmented, cross or a cache (repeat)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data",
                                            help="Evaluate even if the run's data changed since training."),
    allow_unfinished: bool = typer.Option(False, "--allow-unfinished", help="Evaluate a run that did not finish."),
    batch_seconds: float = typer.Option(EVAL_BATCH_SECONDS, "--batch-seconds",
                                        help="Waveform models: at most this much padded audio per batch."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="At most this many utterances per batch (default: the run's "
                                                  f"batch size, at least 8; {GPU_EVAL_BATCH} on CUDA)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Where the run's training cache is now, if it "
                                         "moved (the run checks it holds the data it trained on)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", min=1.0, max=6 * 3600.0,
                                                help="Waveform models: predict longer utterances in windows of at "
                                                     "most this many seconds, averaged (default: the run's "
                                                     "training crop; without one, longer than 60 s is refused)."),
) -> None:
    """Evaluate a run on its test split, every augmented test set and cross-corpus sets.

    Warns when the model did not learn (final training loss at chance) or predicts
    one emotion for nearly all of a test set (on stderr with --json).
    """
    from rich.markup import escape

    from ser_toolkit.diagnostics import run_flags
    from ser_toolkit.evaluation import evaluate_run

    if not batch_seconds > 0:
        raise SertkError(f"--batch-seconds {batch_seconds} is not above 0", f"e.g. --batch-seconds {EVAL_BATCH_SECONDS:g}")
    summary = evaluate_run(run, test, batch_size, allow_changed=allow_changed_data, allow_unfinished=allow_unfinished,
                           batch_seconds=batch_seconds, cache=cache, max_seconds=max_seconds)
    flags = run_flags(run, list(summary))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        err = _console(stderr=True)
        for flag in flags:
            err.print(f"[yellow]warning: {escape(flag)}[/yellow]")
        return
    from rich.table import Table

    t = Table("test set", "n", "accuracy", "weighted F1", "macro F1", "UAR", "missing")
    for name, m in summary.items():
        t.add_row(name, str(m["n"]), f"{m['accuracy']:.3f}", f"{m['weighted_f1']:.3f}", f"{m['macro_f1']:.3f}",
                  f"{m['uar']:.3f}", ",".join(m["missing_emotions"]) or "-")
    con = _console()
    con.print(t)
    for flag in flags:
        con.print(f"[yellow]warning: {escape(flag)}[/yellow]")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder (from sertk train)."),
    audio: List[Path] = typer.Argument(..., help="Audio files (any common format, rate, channels)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    mono: Optional[str] = typer.Option(None, "--mono", help="Down-mix rule: mean, first or loudest "
                                                            "(default: the run's training cache's)."),
    allow_unfinished: bool = typer.Option(False, "--allow-unfinished", help="Use a run that did not finish."),
) -> None:
    """Emotion and class probabilities for new audio files."""
    from ser_toolkit.audio import MONO_RULES, RESAMPLER, load
    from ser_toolkit.emotions import EMOTIONS
    from ser_toolkit.evaluation import load_run_model, predict_features, predict_waves
    from ser_toolkit.memory import PREDICT_FIX
    from ser_toolkit.training import runs

    info = runs.check_run(run, allow_unfinished)
    pre = info.get("data", {}).get("cache", {}).get("preprocess", {})
    mono = mono or pre.get("mono", "mean")
    if mono not in MONO_RULES:
        raise SertkError(f"unknown --mono rule {mono!r}", f"use one of {', '.join(MONO_RULES)}")
    waves = [load(p, mono, resampler=pre.get("resampler", RESAMPLER)) for p in audio]
    model, featurize, cfg, device = load_run_model(run, info=info)
    classifier = hasattr(model, "predict_proba")  # a fitted FeatureClassifier, else a torch model
    spec = getattr(model, "feature_spec", None) or (model.featurizer_spec() if classifier else None)
    if spec is not None:  # features as in training, normalised over the files given (one speaker or corpus)
        import numpy as np

        from ser_toolkit.featurizers import get_featurizer
        from ser_toolkit.normalize import MIN_GROUP, normalize

        mode = cfg.get("normalize", "none")
        if mode != "none" and len(waves) < MIN_GROUP:
            raise SertkError(f"run {run} normalises features per {mode}: it needs at least {MIN_GROUP} "
                             f"utterances of the same {mode} to predict, got {len(waves)}",
                             f"pass {MIN_GROUP} or more files of one {mode} together")
        featurizer = get_featurizer(*spec)
        x = np.stack([featurizer.extract(w, 16000) for w in waves])
        x = normalize(x, np.zeros(len(x), dtype=np.int64) if mode != "none" else np.empty(0))
        probs = model.predict_proba(x) if classifier else predict_features(model, list(x), 8, device,
                                                                           fix=PREDICT_FIX)
    else:
        probs = predict_waves(model, featurize, waves, 8, device, fix=PREDICT_FIX)
    import numpy as np

    if not np.isfinite(np.asarray(probs)).all():
        raise SertkError(f"run {run} predicts NaN or infinite probabilities (its weights are damaged or training "
                         "diverged)", "retrain the run (a lower --lr, if its training loss became NaN)")
    results = [{"file": str(p), "emotion": EMOTIONS[int(pr.argmax())],
                "probabilities": {e: float(v) for e, v in zip(EMOTIONS, pr)}} for p, pr in zip(audio, probs)]
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for r in results:
        top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        _console().print(f"{r['file']}: [bold]{r['emotion']}[/bold] (" + ", ".join(f"{e} {v:.2f}" for e, v in top) + ")")


_EXECUTION = {s.name: s for s in EXECUTION}


@app.command()
@_with_settings(study=True)
def study(
    ctx: typer.Context,
    preset: Optional[str] = typer.Option(None, "--preset", help="demo (offline, CPU, minutes), reference (GPU) "
                                         "or reference-cpu (the acoustic model on the real corpora)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Study config (TOML); overrides the preset."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Repeat every model with N seeds."),
    split_spec: Optional[str] = typer.Option(None, "--split", help="Override the split (e.g. speaker:test=0.2)."),
    folds: Optional[str] = typer.Option(None, "--folds", help="one, or all: every fold of a kfold/loso split."),
    cross_matrix: bool = typer.Option(False, "--cross-matrix", help="Train on every corpus in turn ([data] and "
                                      "each cross entry) and report the train x test corpus matrix."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the model (plugin name, hub id, folder); "
                                        "the preset's lr, epochs, batch size... are for its own model."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report path (default from the config)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where the study's runs go."),
    executor: Optional[str] = typer.Option(None, "--executor", help=_EXECUTION["executor"].help[0].upper()
                                           + _EXECUTION["executor"].help[1:] + "."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help=_EXECUTION["jobs"].help[0].upper()
                                       + _EXECUTION["jobs"].help[1:] + "."),
    runs_per_gpu: Optional[int] = typer.Option(None, "--runs-per-gpu", help=_EXECUTION["runs_per_gpu"].help[0].upper()
                                               + _EXECUTION["runs_per_gpu"].help[1:] + "."),
    oom_retry: Optional[bool] = typer.Option(None, "--oom-retry/--no-oom-retry", help=_EXECUTION["oom_retry"].help[0]
                                             .upper() + _EXECUTION["oom_retry"].help[1:] + "."),
    save_config: Optional[Path] = typer.Option(None, "--save-config", help="Write the resolved config and stop."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the report path."),
    **settings_given: object,
) -> None:
    """Run the whole augmentation study, resumably, and write its report.

    Every value comes from the preset < the --config file < the options below. The
    training options are the study's [training] settings (declared once in
    ser_toolkit/settings.py, like those of 'sertk train'); a preset's model-dependent
    values (lr, epochs, batch size...) are dropped when another model is chosen.

    Progress: the phase, model k of N, the epochs, elapsed and estimated time
    left, then a table of every model (live bars on a terminal, one line per
    event otherwise).
    """
    from rich.markup import escape

    from ser_toolkit.progress import for_console
    from ser_toolkit.registry import get_registry
    from ser_toolkit.study import load_config, run_study, with_cross_matrix

    if preset is None and config_file is None:
        preset = "demo"
    given = _given(ctx)
    _check_study_options({"seeds": seeds, "jobs": jobs, "runs_per_gpu": runs_per_gpu, "executor": executor},
                         {n: v for n, v in settings_given.items() if n in given})
    overrides: dict = {}
    if seeds is not None:
        overrides.setdefault("study", {})["seeds"] = seeds
    if split_spec is not None:
        overrides["data"] = {"split": split_spec}
    if folds is not None:
        overrides.setdefault("data", {})["folds"] = folds
    if model is not None:
        _check_model_name(model, get_registry())
        if model in get_registry().names("model"):
            overrides["model"] = {"name": model, "options": {}}
        else:
            overrides["model"] = {"name": "hubert", "options": {"checkpoint": model}}
    training = {n: str(v) if isinstance(v, Path) else v for n, v in settings_given.items() if n in given}
    if training:
        overrides["training"] = training
    if output is not None:
        overrides.setdefault("study", {})["report"] = str(output)
    if runs_dir is not None:
        overrides.setdefault("study", {})["runs_dir"] = str(runs_dir)
    for key, value in (("executor", executor), ("jobs", jobs), ("runs_per_gpu", runs_per_gpu),
                       ("oom_retry", oom_retry)):
        if value is not None:
            overrides.setdefault("study", {})[key] = value
    cfg = load_config(preset, config_file, overrides)
    if cross_matrix:
        cfg = with_cross_matrix(cfg)
    if save_config is not None:
        from ser_toolkit import atomic

        atomic.write_text(save_config, _toml(cfg))
        _console().print(f"wrote {save_config}")
        return
    con = _console()
    report_path = run_study(cfg, log=for_console(con, quiet=quiet))
    con.print(f"[bold]{escape(str(report_path))}[/bold] written", soft_wrap=True)


def _check_study_options(study_values: dict, training: dict) -> None:
    """Values given as ``sertk study`` options, checked against their declarations and named by their option
    (a config file's errors name its keys instead)."""
    from ser_toolkit.settings import SETTINGS, study_schema

    declared = {e.name: e for s in study_schema() if s.name == "study" for e in s.entries}
    hint = "see 'sertk study --help'"
    for name, value in study_values.items():
        if value is not None:
            declared[name].check(value, f"--{name.replace('_', '-')}", hint=hint)
    for name, value in training.items():
        SETTINGS[name].check(str(value) if isinstance(value, Path) else value, SETTINGS[name].option, hint=hint)


def _toml(cfg: dict) -> str:
    """A checked study config as TOML (see :func:`ser_toolkit.study.dump_config`)."""
    from ser_toolkit.study import dump_config

    return dump_config(cfg)


@app.command()
def report(
    inputs: List[Path] = typer.Argument(..., metavar="STUDY_OR_RUNS...", help="Study folders or run folders."),
    output: Path = typer.Option(Path("reports/report.md"), "--output", "-o", help="Markdown report path."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data",
                                            help="Report even if runs were evaluated on changed data."),
    allow_unfinished: bool = typer.Option(False, "--allow-unfinished", help="Include runs that did not finish."),
) -> None:
    """Write a markdown report (with figures, CSV and JSON) comparing models across test sets."""
    from ser_toolkit.report import files_of, write_report

    path = write_report(inputs, output, allow_changed=allow_changed_data, allow_unfinished=allow_unfinished)
    _console().print(f"[bold]{path}[/bold] written (figures and numbers in {files_of(path)}/)")


_WRITE_ELSEWHERE = {
    "cache": "write elsewhere (--cache-dir)",
    "features": "copy the cache to a disk with room and pass that copy as CACHE (feature files are written beside it)",
    "materialize": "copy the cache to a disk with room and pass that copy as CACHE (the sets are written beside it)",
    "study": "write elsewhere (--runs-dir, and cache_dir in the config's [data])",
    "evaluate": "move the run folder to a disk with room and evaluate it there",
    "report": "write elsewhere (--output)", "split": "write elsewhere (--output)",
    "augment": "write OUT elsewhere"}
"""How each command can write elsewhere when a disk is full (the others: --cache-dir, --out)."""


def _write_elsewhere(args: List[str]) -> str:
    command = next((a for a in args if not a.startswith("-")), None)
    return _WRITE_ELSEWHERE.get(command or "", WRITE_ELSEWHERE)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2."""
    cx = _click_exceptions()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("SERTK_DEBUG") == "1"
    command = typer.main.get_command(app)
    from ser_toolkit.training.checkpoints import RECEIVED

    RECEIVED.clear()
    _stop_on_sigterm()
    try:
        rc = command.main(args=args, prog_name="sertk", standalone_mode=False)
    except SertkError as exc:
        if debug:
            raise
        print(f"Error: {exc.elsewhere(_write_elsewhere(args)) if isinstance(exc, DiskFull) else exc}",
              file=sys.stderr)
        sys.exit(exc.exit_code)
    except cx.Exit as exc:
        sys.exit(exc.exit_code)
    except cx.NoArgsIsHelpError as exc:
        print(exc.format_message())
        sys.exit(0)
    except cx.ClickException as exc:
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "sertk"
        print(f"Error: {exc.format_message().rstrip('.')}; see '{where} --help'", file=sys.stderr)
        sys.exit(2)
    except (cx.Abort, KeyboardInterrupt):
        rc = 130
    except OSError as exc:
        if debug:
            raise
        print(f"Error: {os_error_line(exc, _write_elsewhere(args))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # a library's own error type for a full disk (safetensors, libsndfile...)
        if debug or not any(s in str(exc) for s in ("No space left on device", "os error 28", "errno = 28")):
            raise
        import errno

        print(f"Error: {os_error_line(OSError(errno.ENOSPC, str(exc)), _write_elsewhere(args))}", file=sys.stderr)
        sys.exit(2)
    if rc == 130:  # Ctrl-C or SIGTERM (typer turns KeyboardInterrupt into exit code 130)
        import signal

        signum = RECEIVED[-1] if RECEIVED else signal.SIGINT
        name = "Interrupted" if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}"
        print(f"{name}; nothing half-written was left behind, rerun the command to resume.", file=sys.stderr)
        rc = 128 + signum
    sys.exit(rc if isinstance(rc, int) else 0)


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, Slurm's ``scancel``, a job's time limit) stops a command like Ctrl-C does: cleanly,
    with its message, exit 143 (training installs its own handler that first writes its checkpoint)."""
    import signal
    import threading

    from ser_toolkit.training.checkpoints import RECEIVED

    def stop(signum: int, frame: object) -> None:
        RECEIVED.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


OWN_THREADS = "sertk-"
"""The name prefix of the threads sertk starts (e.g. ``sertk-checkpoint``): the ones :func:`entry` waits for."""


def _stop_library_pools() -> None:
    """Stop the worker pools libraries keep for reuse: joblib/loky's workers idle for 300 s before they exit,
    and multiprocessing's exit handler would wait for them."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is not None:
        try:
            executor.shutdown(wait=True, kill_workers=True)
        except Exception:  # noqa: BLE001 - leaving: nothing of sertk's depends on it
            pass


def entry() -> None:
    """The ``sertk`` console script: :func:`main`, then leave without tearing the interpreter down.

    Finalising torch, scikit-learn, librosa and skops modules takes about 1.5 s after the work is done.
    Everything sertk writes is complete (fsynced and renamed) before this point, so the process waits for
    its own threads (named ``sertk-*``; library threads such as joblib/loky's executor manager or
    ``torch.compile``'s worker pools wait for an interpreter shutdown that never comes, and hold nothing of
    sertk's), runs the ``atexit`` handlers (multiprocessing joins its children there), flushes its output
    and exits at once.
    """
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and thread.name.startswith(OWN_THREADS):
            thread.join()
    _stop_library_pools()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be shown
            pass
    os._exit(code)
