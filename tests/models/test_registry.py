"""The registry: registration, look-up errors, overrides and entry points."""

import pytest

from models import MODELS, register_model
from models.registry import Registry


def make_registry() -> Registry:
    return Registry("model", entry_point_group=None)


def test_register_and_build_function_and_class():
    registry = make_registry()

    @registry.register("double")
    def double(value):
        return value * 2

    @registry.register("box")
    class Box:
        def __init__(self, value):
            self.value = value

    assert registry.build("double", value=4) == 8
    assert registry.build("box", value=3).value == 3
    assert registry.names() == ["box", "double"]


def test_unknown_name_lists_available():
    registry = make_registry()
    registry.register("mmoe")(lambda: None)
    registry.register("omoe")(lambda: None)
    with pytest.raises(KeyError, match=r"Unknown model 'mmeo'.*Did you mean 'mmoe'.*mmoe, omoe"):
        registry.get("mmeo")


def test_duplicate_raises_unless_override():
    registry = make_registry()
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered.*override=True"):
        registry.register("a")(lambda: 2)
    registry.register("a", override=True)(lambda: 3)
    assert registry.build("a") == 3


def test_builtin_models_registered():
    assert {"shared_bottom", "single_task", "omoe", "mmoe", "snr_trans", "snr_aver"} <= set(
        MODELS.names()
    )


def test_builtin_name_cannot_be_taken_silently():
    with pytest.raises(ValueError, match="'mmoe' is already registered"):
        register_model("mmoe")(lambda **kwargs: None)


def test_entry_point_group_loaded_on_lookup(tmp_path, monkeypatch):
    # An installed distribution, made by hand: a module plus entry-point metadata.
    (tmp_path / "ep_plugin.py").write_text(
        "from models.registry import Registry\n"
        "import tests_entry_registry\n"
        "tests_entry_registry.REGISTRY.register('from_entry_point')(lambda: 'loaded')\n"
    )
    (tmp_path / "tests_entry_registry.py").write_text(
        "from models.registry import Registry\n"
        "REGISTRY = Registry('model', entry_point_group='mtl_bench_test.models')\n"
    )
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mtl_bench_test.models]\nmine = ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    import tests_entry_registry

    assert tests_entry_registry.REGISTRY.build("from_entry_point") == "loaded"


def test_unknown_name_suggestion_ignores_case():
    with pytest.raises(KeyError, match="Unknown model 'MMoE'. Did you mean 'mmoe'?"):
        MODELS.get("MMoE")
