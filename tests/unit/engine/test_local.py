"""Local training, evaluation and the client backend."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from autorank.config import LoraConfig, TrainingConfig
from autorank.engine.jobs import (
    ClientJob,
    LocalSplit,
    limit_threads,
    pick_device,
    warmup,
    warmup_jobs,
)
from autorank.engine.local import (
    Optimizer,
    StopSignal,
    TrainingStoppedError,
    TrainSettings,
    client_seed,
    train_local,
)
from autorank.engine.sequential import SequentialBackend, run_client_job
from autorank.lora.settings import LoraSettings
from autorank.models.evaluation import evaluate
from autorank.models.zoo import build_model, head_modules

LORA = LoraSettings(policy="proportional", alpha=16.0, alpha_ratio=2.0, dropout=0.0, head=("head",))
SGD = TrainSettings(
    optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=16, grad_clip=None
)


def _blobs(n: int, seed: int, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well separated Gaussian blobs in ``d`` dimensions: ``x [n, d]``, ``y [n]``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen) + 2.0 * (2 * y[:, None] - 1).float()
    return x, y


def _base() -> nn.Module:
    return build_model("mlp", input_shape=(16,), n_classes=2, hidden=(16, 16), seed=0)


def test_client_seed_is_deterministic_and_distinct() -> None:
    # Execute
    seeds = {client_seed(0, r, c) for r in range(3) for c in range(4)}

    # Assert
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2)
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="client must be >= 0"):
        client_seed(0, 0, -1)


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 0.01)])
def test_train_local_reduces_loss(optimizer: Optimizer, lr: float) -> None:
    # Prepare
    x, y = _blobs(128, seed=0)
    model = _base()

    # Execute
    settings = TrainSettings(optimizer, lr, 0.9, 0.0, 16, 1.0)
    losses, steps = train_local(model, x, y, settings, epochs=4, seed=0, device=torch.device("cpu"))

    # Assert
    assert steps == 4 * 8
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate(model, x, y, device=torch.device("cpu")).accuracy > 0.95


@pytest.mark.parametrize(
    ("n_y", "batch_size", "optimizer", "match"),
    [
        (4, 4, "sgd", "same positive number"),
        (8, 0, "sgd", "batch_size"),
        (8, 4, "lbfgs", "optimizer"),
    ],
)
def test_train_local_rejects_bad_input(
    n_y: int, batch_size: int, optimizer: str, match: str
) -> None:
    x, y = _blobs(8, seed=0)
    with pytest.raises(ValueError, match=match):
        settings = TrainSettings(optimizer, 0.1, 0.0, 0.0, batch_size, None)  # type: ignore[arg-type]
        train_local(_base(), x, y[:n_y], settings, epochs=1, seed=0, device=torch.device("cpu"))


def test_evaluate_counts_and_restores_mode() -> None:
    # Prepare
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    model.train()

    # Execute
    result = evaluate(model, x, y, batch_size=2, device=torch.device("cpu"))

    # Assert
    expected_loss = (2 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 3
    assert result.n == 3
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(expected_loss)
    assert model.training


def test_same_seed_gives_identical_state_on_cpu() -> None:
    # Prepare
    x, y = _blobs(64, seed=1)
    job = ClientJob(0, {"fc1": 4, "fc2": 2}, None, x, y, epochs=2, seed=client_seed(0, 1, 0))
    cpu = torch.device("cpu")

    # Execute
    first = run_client_job(_base(), job, LORA, SGD, cpu)
    second = run_client_job(_base(), job, LORA, SGD, cpu)

    # Assert
    assert first.epoch_losses == second.epoch_losses
    for k, f in first.state.lora.items():
        assert torch.equal(f.A, second.state.lora[k].A) and torch.equal(f.B, second.state.lora[k].B)
    assert all(torch.equal(v, second.state.extra[k]) for k, v in first.state.extra.items())


def test_backend_returns_one_result_per_job_at_its_ranks() -> None:
    # Prepare
    base = _base()
    data = [_blobs(n, seed=i) for i, n in enumerate((20, 40, 33))]
    ranks = [{"fc1": 2, "fc2": 2}, {"fc1": 8, "fc2": 4}, {"fc1": 1, "fc2": 6}]
    jobs = [
        ClientJob(i, r, None, x, y, 1, seed=i)
        for i, (r, (x, y)) in enumerate(zip(ranks, data, strict=True))
    ]
    backend = SequentialBackend(base, LORA, SGD, torch.device("cpu"))

    # Execute
    results = [o.result for o in backend.train_clients(jobs)]
    state = results[1].state
    again = backend.train_clients([ClientJob(1, ranks[1], state, *data[1], 1, 5)])

    # Assert
    assert [r.client for r in results] == [0, 1, 2]
    assert [r.state.ranks() for r in results] == ranks
    assert [r.n_samples for r in results] == [20, 40, 33]
    assert [r.steps for r in results] == [2, 3, 3]
    assert all(r.state.lora["fc1"].A.device.type == "cpu" for r in results)
    assert again[0].result.state.ranks() == ranks[1]


def test_reused_models_train_as_freshly_wrapped_ones() -> None:
    # Prepare: one persistent model per rank pattern serves jobs with and without states
    base = _base()
    x, y = _blobs(30, seed=4)
    first = ClientJob(0, {"fc1": 4}, None, x, y, 2, seed=3)
    trained = run_client_job(base, first, LORA, SGD, torch.device("cpu")).state
    fresh_lora = type(trained)({}, dict(trained.extra))
    jobs = [
        first,
        ClientJob(1, {"fc1": 4}, trained, x, y, 2, seed=4),
        ClientJob(2, {"fc1": 4}, fresh_lora, x, y, 2, seed=5),
        ClientJob(3, {"fc1": 4}, None, x, y, 2, seed=6),
    ]
    backend = SequentialBackend(base, LORA, SGD, torch.device("cpu"))

    # Execute
    reused = [o.result for o in backend.train_clients(jobs)]
    fresh = [run_client_job(base, j, LORA, SGD, torch.device("cpu")) for j in jobs]

    # Assert: bit-identical, and the base was left alone
    for a, b in zip(reused, fresh, strict=True):
        assert a.epoch_losses == b.epoch_losses
        assert torch.equal(a.state.lora["fc1"].B, b.state.lora["fc1"].B)
        assert torch.equal(a.state.extra["head.weight"], b.state.extra["head.weight"])
    assert torch.equal(base.head.weight, _base().head.weight)
    assert len(backend._models) == 1


def test_warmup_gives_per_epoch_losses() -> None:
    # Prepare
    data = [_blobs(24, seed=i) for i in range(2)]
    jobs = warmup_jobs(
        [x for x, _ in data], [y for _, y in data], ranks={"fc1": 4}, epochs=3, seed=0
    )

    # Execute
    curves = warmup(SequentialBackend(_base(), LORA, SGD, torch.device("cpu")), jobs)

    # Assert
    assert [len(c) for c in curves] == [3, 3]
    assert jobs[0].seed != jobs[1].seed and jobs[0].state is None
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        warmup_jobs([data[0][0]], [data[0][1]], ranks={"fc1": 4}, epochs=1, seed=0)


def test_a_capped_client_warms_up_at_its_cap() -> None:
    # Prepare: three clients; the second's device holds rank 3, the third's rank 12
    data = [_blobs(24, seed=i) for i in range(3)]
    xs, ys = [x for x, _ in data], [y for _, y in data]

    # Execute
    jobs = warmup_jobs(xs, ys, ranks={"fc1": 8, "fc2": 4}, epochs=2, seed=0, caps=[None, 3, 12])

    # Assert: min(maximum rank, cap) per layer; the seeds do not depend on the caps
    assert [j.ranks for j in jobs] == [
        {"fc1": 8, "fc2": 4},
        {"fc1": 3, "fc2": 3},
        {"fc1": 8, "fc2": 4},
    ]
    uncapped = warmup_jobs(xs, ys, ranks={"fc1": 8, "fc2": 4}, epochs=2, seed=0)
    assert [j.seed for j in jobs] == [j.seed for j in uncapped]
    with pytest.raises(ValueError, match="caps must list every client"):
        warmup_jobs(xs, ys, ranks={"fc1": 8}, epochs=2, seed=0, caps=[3])


def test_personalised_accuracy_is_the_trained_models() -> None:
    # Prepare
    x, y = _blobs(64, seed=2)
    job = ClientJob(0, {"fc1": 4}, None, x, y, 5, seed=0)
    backend = SequentialBackend(_base(), LORA, SGD, torch.device("cpu"))

    # Execute
    outcome = backend.train_clients([job], [LocalSplit(x, y)])[0]
    untrained = backend.train_clients([ClientJob(0, {"fc1": 4}, None, x, y, 1, 0)], [None])[0]

    # Assert
    assert outcome.personal is not None and outcome.personal.accuracy > 0.95
    assert outcome.personal.n == 64
    assert untrained.personal is None


def test_settings_from_config() -> None:
    lora = LoraSettings.from_config(LoraConfig(alpha_policy="rslora"), head_modules("mlp"))
    train = TrainSettings.from_config(TrainingConfig(optimizer="adam", lr=0.001))
    assert lora.policy == "rslora" and lora.head == ("head",)
    assert train.optimizer == "adam" and train.batch_size == 64


def test_pick_device_and_threads() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        pick_device("tpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        assert pick_device("auto", client=3) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="threads"):
        limit_threads(0)
    before = torch.get_num_threads()
    limit_threads(1)
    assert torch.get_num_threads() == 1
    limit_threads(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda() -> None:
    # Prepare
    x, y = _blobs(64, seed=3)
    job = ClientJob(1, {"fc1": 4, "fc2": 4}, None, x, y, 3, seed=0)
    device = pick_device("cuda", client=1)

    # Execute
    result = SequentialBackend(_base(), LORA, SGD, device).train_clients([job])[0].result

    # Assert
    assert result.state.lora["fc1"].A.device.type == "cpu"
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert device.index == 1 % torch.cuda.device_count()


def test_parallel_threads_match_sequential() -> None:
    # Prepare
    base = _base()
    data = [_blobs(40, seed=i) for i in range(3)]
    jobs = [
        ClientJob(i, {"fc1": 2 + i}, None, x, y, 2, client_seed(0, 1, i))
        for i, (x, y) in enumerate(data)
    ]
    cpu = torch.device("cpu")

    # Execute
    sequential = [run_client_job(base, j, LORA, SGD, cpu) for j in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(lambda j: run_client_job(base, j, LORA, SGD, cpu), jobs))

    # Assert
    for s, p in zip(sequential, parallel, strict=True):
        assert s.epoch_losses == p.epoch_losses
        assert all(torch.equal(f.B, p.state.lora[k].B) for k, f in s.state.lora.items())


def _stop_after(model: nn.Module, stop: StopSignal, calls: int) -> list[int]:
    """Raise ``stop`` during the model's ``calls``-th forward; the forwards are counted."""
    count = [0]

    def hook(*_: object) -> None:
        count[0] += 1
        if count[0] == calls:
            stop.set()

    model.register_forward_hook(hook)
    return count


def test_a_raised_stop_ends_training_before_the_next_step() -> None:
    # Prepare: 64 samples, batch 16: 4 steps an epoch, 3 epochs
    x, y = _blobs(64, seed=1)
    model = _base()
    stop = StopSignal()
    forwards = _stop_after(model, stop, calls=3)

    # Execute
    with pytest.raises(TrainingStoppedError, match="the run is ending"):
        train_local(model, x, y, SGD, epochs=3, seed=0, device=torch.device("cpu"), stop=stop)

    # Assert: the step that raised it finished, no fourth began
    assert forwards == [3]


def test_the_sequential_engine_stops_inside_a_client_when_asked() -> None:
    # Prepare: two clients of 20 local steps each
    x, y = _blobs(64, seed=2)
    jobs = [ClientJob(c, {"fc1": 4, "fc2": 4}, None, x, y, 5, seed=c) for c in (0, 1)]
    engine = SequentialBackend(_base(), LORA, SGD, torch.device("cpu"))
    forwards = _stop_after(engine.base, engine.stop, calls=5)

    # Execute
    with pytest.raises(TrainingStoppedError):
        engine.train_clients(jobs)

    # Assert: stopped in the first client's sixth step, the second never started
    assert forwards == [5]


def test_two_accumulated_mini_batches_step_as_one_batch_of_both() -> None:
    # Prepare: 64 samples; batch 16 with 2 mini-batches a step against batch 32, one epoch
    from dataclasses import replace

    from autorank.engine.local import train_local

    x, y = _blobs(64, seed=5)
    halves, whole = _base().requires_grad_(True), _base().requires_grad_(True)
    accumulated = replace(SGD, accumulation=2)

    # Execute
    _, steps = train_local(halves, x, y, accumulated, epochs=1, seed=3, device=torch.device("cpu"))
    _, plain = train_local(
        whole, x, y, replace(SGD, batch_size=32), epochs=1, seed=3, device=torch.device("cpu")
    )

    # Assert: the same samples in each step (the order's first 32, then the rest), the mean of
    # two 16-sample means is the 32-sample mean: the same weights up to round-off
    assert steps == plain == 2
    for a, b in zip(halves.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
