"""Every deployment in prefect.yaml: a real entrypoint, valid cron schedules, the declared work
pool, and parameters that the flow accepts and ExperimentConfig validates.

No server here: scripts/deploy_smoke.sh deploys the same file to a throwaway local one.
"""

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate
from pydantic import ValidationError

from autorank.config import ExperimentConfig, config_digest, load_config
from autorank.reporting.grid import GridConfig, load_grid, parse_grid
from flows.run_records import run_name

ROOT = Path(__file__).resolve().parents[2]
POOL = "autorank-pool"  # what scripts/deploy_smoke.sh (and the docs) create
PROJECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS: dict[str, dict[str, Any]] = {d["name"]: d for d in PROJECT["deployments"]}


def _flow_of(entrypoint: str) -> Flow[..., Any]:
    """The flow an entrypoint names, loaded from the file as a worker loads it."""
    path, _, func = entrypoint.partition(":")
    # No placeholder: a flow file that fails to import must fail here, not fall back to AST.
    return load_flow_from_entrypoint(f"{ROOT / path}:{func}", use_placeholder_flow=False)


def check_parameters(
    parameters: dict[str, Any], flow: Flow[..., Any]
) -> ExperimentConfig | GridConfig:
    """Raise ValueError unless the flow takes every parameter and `config`/`grid` validates."""
    accepted = inspect.signature(flow.fn).parameters
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise ValueError(f"parameters {unknown} are not arguments of {flow.name!r}")
    if "grid" in accepted:
        return parse_grid(parameters.get("grid", {}))
    return ExperimentConfig.model_validate(parameters.get("config", {}))


@pytest.fixture(scope="module")
def flows() -> dict[str, Flow[..., Any]]:
    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS.values()}
    return {e: _flow_of(e) for e in entrypoints}


def test_the_expected_deployments_are_declared() -> None:
    assert set(DEPLOYMENTS) == {
        "quickstart",
        "fashion-mnist-autorank",
        "nightly-baseline",
        "nightly-comparison",
    }


def test_every_key_is_one_prefect_deploy_reads() -> None:
    # `prefect deploy` drops keys it does not know without a word: a misspelled `schedules`
    # deploys a deployment that never runs. These are the models it reads the file with.
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel

    top_level = {f.alias or name for name, f in PrefectYamlModel.model_fields.items()}
    assert set(PROJECT) - top_level == {"definitions"}  # our YAML anchors only
    unknown = {
        name: sorted(set(deployment) - set(DeploymentConfig.model_fields))
        for name, deployment in DEPLOYMENTS.items()
    }
    assert unknown == {name: [] for name in DEPLOYMENTS}


def test_code_is_used_in_place_not_built_or_pulled() -> None:
    (step,) = PROJECT["pull"]

    assert PROJECT["build"] is None and PROJECT["push"] is None
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_entrypoint_is_a_flow(name: str, flows: dict[str, Flow[..., Any]]) -> None:
    entrypoint = DEPLOYMENTS[name]["entrypoint"]
    path, _, func = entrypoint.partition(":")

    assert (ROOT / path).is_file()
    assert flows[entrypoint].fn.__name__ == func


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_schedules_are_valid_crons_with_a_timezone(name: str) -> None:
    schedules = DEPLOYMENTS[name].get("schedules")

    assert schedules, f"{name} has no schedule"
    for entry in schedules:
        schedule = CronSchedule(cron=entry["cron"], timezone=entry["timezone"])
        assert schedule.timezone == "UTC"


@pytest.mark.parametrize("cron", ["0 25 * * *", "0 1 * *", "nightly"])
def test_cron_check_rejects_bad_strings(cron: str) -> None:
    with pytest.raises(ValidationError, match="cron"):
        CronSchedule(cron=cron, timezone="UTC")


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_work_pool_is_the_declared_pool(name: str) -> None:
    assert PROJECT["definitions"]["work_pool"]["name"] == POOL
    assert DEPLOYMENTS[name]["work_pool"]["name"] == POOL


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_a_failed_run_leaves_no_pickled_exception(
    name: str, flows: dict[str, Flow[..., Any]]
) -> None:
    from flows.failure_records import drop_failure_record

    # Prefect pickles a failed flow run's exception into the worker's storage; the hook
    # removes it (tests/flows/test_failure_records.py, scripts/deploy_smoke.sh).
    assert drop_failure_record in flows[DEPLOYMENTS[name]["entrypoint"]].on_failure_hooks


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_parameters_validate(name: str, flows: dict[str, Flow[..., Any]]) -> None:
    deployment = DEPLOYMENTS[name]
    flow = flows[deployment["entrypoint"]]

    config = check_parameters(deployment["parameters"], flow)

    assert isinstance(config, ExperimentConfig | GridConfig)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_parameters_pass_the_servers_schema_check(
    name: str, flows: dict[str, Flow[..., Any]]
) -> None:
    # What the API runs on every flow run of a deployment (enforce_parameter_schema).
    deployment = DEPLOYMENTS[name]
    schema = parameter_schema(flows[deployment["entrypoint"]]).model_dump_for_openapi()

    validate(deployment["parameters"], schema, raise_on_error=True)


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        (("config", "training", "round"), 30, "training.round"),  # misspelled setting
        (("config", "ranking", "assigner"), "autorank2", "assigner"),  # unknown choice
        (("config", "lora", "layer_ranges", "fc2", "r_max"), 2, "r_min"),  # r_min > r_max
        (("confg",), {}, "confg"),  # misspelled flow argument
    ],
)
def test_a_misspelled_parameter_fails(
    where: tuple[str, ...], value: Any, match: str, flows: dict[str, Flow[..., Any]]
) -> None:
    deployment = DEPLOYMENTS["fashion-mnist-autorank"]
    bad = copy.deepcopy(deployment["parameters"])
    node = bad
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value

    with pytest.raises(ValueError, match=match):
        check_parameters(bad, flows[deployment["entrypoint"]])


def test_fashion_deployment_is_the_shipped_config() -> None:
    shipped = load_config(ROOT / "configs" / "fashion_mnist_autorank.yaml")

    deployed = ExperimentConfig.model_validate(
        DEPLOYMENTS["fashion-mnist-autorank"]["parameters"]["config"]
    )

    assert deployed == shipped


def test_quickstart_deployment_is_the_quickstart_command() -> None:
    # scripts/quickstart.sh runs `autorank run` with no --config: load_config(None).
    command = load_config(None)

    deployed = ExperimentConfig.model_validate(DEPLOYMENTS["quickstart"]["parameters"]["config"])

    assert deployed == command
    assert config_digest(deployed) == config_digest(command)
    assert run_name(deployed) == run_name(command) == "autorank-rbla-digits-s0"


def test_comparison_deployment_is_the_shipped_digits_grid() -> None:
    shipped = load_grid(ROOT / "configs" / "grids" / "digits.yaml")

    deployed = parse_grid(DEPLOYMENTS["nightly-comparison"]["parameters"]["grid"])

    assert deployed == shipped


def test_baseline_differs_from_autorank_only_in_ranks_and_run_name() -> None:
    autorank, baseline = (
        ExperimentConfig.model_validate(DEPLOYMENTS[name]["parameters"]["config"])
        for name in ("fashion-mnist-autorank", "nightly-baseline")
    )

    assert baseline.ranking.assigner != autorank.ranking.assigner
    assert baseline.tracking.experiment == autorank.tracking.experiment
    assert baseline.tracking.run_name != autorank.tracking.run_name
    same = {"ranking", "tracking"}
    assert baseline.model_dump(exclude=same) == autorank.model_dump(exclude=same)
