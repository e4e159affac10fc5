"""The plugin system: built-ins, entry points, duplicates, unknown names, SERTK_LOAD_PLUGINS."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, run_sertk
from ser_toolkit import hookspecs
from ser_toolkit.errors import PluginError
from ser_toolkit.registry import build_registry, get_registry

BUILTIN_DATASETS = {"ravdess", "savee", "manifest", "synthetic", "synthetic-shifted"}


def make_dist(site: Path, dist: str, module: str, body: str, version: str = "1.0") -> None:
    """A real installed distribution (dist-info with an entry point) under ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[sertk]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(body))


FAKE = """
    from ser_toolkit import hookimpl
    from ser_toolkit.datasets import Dataset, Scan
    from ser_toolkit.params import Param

    class Tones(Dataset):
        name = "{name}"
        description = "test corpus"
        label_map = {{"x": "happy"}}
        params = (Param("level", 0.5, "loudness", type="float", min=0, max=1),)
        def scan(self, root):
            return Scan([])

    @hookimpl
    def register_datasets(registry):
        registry.register(Tones)
"""


def plugins_json(site: Path, **env: str):
    return run_sertk("plugins", "--json", env={"PYTHONPATH": str(site), **env})


def test_builtins_register_through_hooks():
    reg = get_registry()
    assert BUILTIN_DATASETS <= set(reg.names("dataset"))
    for e in reg.entries("dataset"):
        if e.name in BUILTIN_DATASETS:
            assert e.provider.distribution == "sertk"


def test_unknown_name_lists_available():
    with pytest.raises(PluginError) as info:
        get_registry().get("dataset", "iemocap")
    msg = str(info.value)
    assert "unknown dataset 'iemocap'" in msg and all(n in msg for n in BUILTIN_DATASETS)


def test_entry_point_plugin_is_discovered(tmp_path):
    make_dist(tmp_path, "sertk-tones", "sertk_tones", FAKE.format(name="tones"), version="2.5")
    r = plugins_json(tmp_path)
    assert r.code == 0, r.err
    entry = next(e for e in json.loads(r.out) if e["name"] == "tones")
    assert entry["kind"] == "dataset" and entry["distribution"] == "sertk-tones" and entry["version"] == "2.5"
    assert entry["params"] == [{"name": "level", "type": "float", "default": 0.5, "help": "loudness",
                                "range": [0, 1]}]
    assert entry["label_map"] == {"x": "happy"}


def test_duplicate_name_names_both_providers(tmp_path):
    make_dist(tmp_path, "sertk-dup", "sertk_dup", FAKE.format(name="ravdess"))
    r = plugins_json(tmp_path)
    assert r.code == 2
    assert "dataset 'ravdess' is registered twice" in r.err
    assert "sertk 0.1.0" in r.err and "sertk-dup 1.0" in r.err and len(r.err.strip().splitlines()) == 1


def test_load_plugins_env_var(tmp_path):
    make_dist(tmp_path, "sertk-tones", "sertk_tones", FAKE.format(name="tones"))
    make_dist(tmp_path, "sertk-other", "sertk_other", FAKE.format(name="other"))
    names = lambda r: {e["name"] for e in json.loads(r.out)}  # noqa: E731
    assert "tones" not in names(plugins_json(tmp_path, SERTK_LOAD_PLUGINS=""))
    assert "tones" in names(plugins_json(tmp_path, SERTK_LOAD_PLUGINS="sertk-tones"))
    assert "tones" in names(plugins_json(tmp_path, SERTK_LOAD_PLUGINS="sertk-other, sertk_tones"))
    assert "tones" not in names(plugins_json(tmp_path, SERTK_LOAD_PLUGINS="sertk-other"))
    # built-ins always load
    assert BUILTIN_DATASETS <= names(plugins_json(tmp_path, SERTK_LOAD_PLUGINS=""))


def test_broken_plugin_is_one_line_and_can_be_switched_off(tmp_path):
    make_dist(tmp_path, "sertk-broken", "sertk_broken", "raise ImportError('needs libfoo')\n")
    r = plugins_json(tmp_path)
    assert r.code == 2 and "Traceback" not in r.err
    assert "sertk_broken" in r.err and "needs libfoo" in r.err and "SERTK_LOAD_PLUGINS" in r.err
    assert plugins_json(tmp_path, SERTK_LOAD_PLUGINS="").code == 0


def test_plugin_without_name_is_rejected(monkeypatch):
    from ser_toolkit import hookimpl, registry as reg_mod

    class Nameless:
        pass

    class Plugin:
        @hookimpl
        def register_datasets(self, registry):
            registry.register(Nameless)

    real = reg_mod.build_plugin_manager

    def with_plugin():
        pm, providers = real()
        pm.register(Plugin(), name="nameless")
        return pm, providers

    monkeypatch.setattr(reg_mod, "build_plugin_manager", with_plugin)
    with pytest.raises(PluginError, match="without a 'name'"):
        build_registry()


def test_every_hook_is_documented():
    """docs/plugins.md carries each hook's heading and its docstring (the plugin reference)."""
    doc = (REPO / "docs" / "plugins.md").read_text()
    names = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sertk_spec")]
    assert set(names) == {"register_datasets", "register_augmentations", "register_featurizers", "register_models"}
    for name in names:
        func = getattr(hookspecs, name)
        assert f"### `{name}(registry)`" in doc, name
        assert inspect.getdoc(func) in doc, f"{name}: docstring out of date in docs/plugins.md"


def test_tutorial_plugin_works(tmp_path):
    """The tutorial's code, installed as a real entry-point distribution, caches a corpus."""
    import re

    from helpers import write_audio

    doc = (REPO / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n   # src/sertk_mycorpus/__init__.py\n(.*?)   ```", doc, re.S).group(1)
    site = tmp_path / "site"
    make_dist(site, "sertk-mycorpus", "sertk_mycorpus", textwrap.dedent(code))
    corpus = tmp_path / "corpus"
    for n in ("s01-anger-1", "s01-joy-2", "s02-boredom-1", "s02-sadness-3", "notes"):
        write_audio(corpus / f"{n}.wav", 0.1)
    env = {"PYTHONPATH": str(site)}
    r = run_sertk("cache", "mycorpus", "--root", corpus, "--cache-dir", tmp_path / "c", "--json", env=env)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["utterances"] == 3 and summary["ignored"] == {"boredom (dropped)": 1,
                                                                 "not a mycorpus file name": 1}
    bad = run_sertk("cache", "mycorpus", "--root", corpus, "--set", "min_take=0", env=env)
    assert bad.code == 2 and "parameter 'min_take' must be an int >= 1 (got 0)" in bad.err



def test_augmentation_tutorial_passes_conformance(tmp_path):
    """The augmentation tutorial's code, as a real entry-point plugin, passes the shipped conformance suite."""
    import re

    doc = (REPO / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n# src/sertk_phone/__init__.py\n(.*?)```", doc, re.S).group(1)
    site = tmp_path / "site"
    make_dist(site, "sertk-phone", "sertk_phone", code)
    check = ("from ser_toolkit.registry import get\nfrom ser_toolkit.testing import check_augmentation\n"
             "e = get('augmentation', 'telephone')\ncheck_augmentation(e.obj)\nprint(e.provider.distribution)")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sertk-phone"