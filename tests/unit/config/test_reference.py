import pytest

from autorank.config import ExperimentConfig, flatten, load_config
from autorank.config.reference import WIDTH, format_reference, settings_of


def test_every_setting_of_the_config_is_listed_once() -> None:
    config = load_config(None, ["lora.layer_ranges={fc1: {r_min: 2, r_max: 4}}"])

    names = [s.name for s in settings_of(ExperimentConfig)]

    assert len(names) == len(set(names))
    assert {k.replace(".fc1.", ".<key>.") for k in flatten(config)} <= set(names)
    assert {"lora.layer_ranges", "runtime.dask_resources"} <= set(names)


@pytest.mark.parametrize(
    ("name", "type_", "default"),
    [
        ("partition.local_test_fraction", "float in [0.0, 0.5]", "0.2"),
        ("training.rounds", "int in [1, 100000]", "20"),
        ("training.clients_per_round", "int | float | null", "null"),
        ("runtime.max_workers", "int in [1, 1024] | null", "null"),
        ("lora.alpha", "float > 0.0", "16.0"),
        ("lora.alpha_policy", "fixed | proportional | rslora", "proportional"),
        ("lora.layer_ranges", "{str: {r_min, r_max}}", "{}"),
        ("lora.layer_ranges.<key>.r_max", "int >= 1", None),
        ("model.hidden", "[int, ...]", "[200, 200]"),
        ("tracking.experiment", "str non-empty", "autorank"),
        ("runtime.checkpoint_dir", "path", "mlruns/checkpoints"),
    ],
)
def test_types_and_defaults_read_as_yaml(name: str, type_: str, default: str | None) -> None:
    (setting,) = [s for s in settings_of(ExperimentConfig) if s.name == name]

    assert (setting.type, setting.default) == (type_, default)


def test_the_reference_fits_its_width_and_opens_every_entry_on_its_own_line() -> None:
    lines = format_reference(ExperimentConfig).splitlines()

    starts = {
        line.split(" (", 1)[0].strip() for line in lines if line.startswith("  ") and line[2] != " "
    }

    assert max(len(line) for line in lines) <= WIDTH
    assert starts == {s.name for s in settings_of(ExperimentConfig)}
    assert "lora: LoRA adapters: target layers, rank bounds, scale" in lines
    assert (
        "  lora.layer_ranges.<key>.r_min (int >= 1, required): smallest rank this layer gets"
        in lines
    )
