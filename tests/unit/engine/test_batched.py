"""The batched engine against the sequential (peft) one: same states, losses and accuracies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from autorank.engine.batched import BatchedBackend
from autorank.engine.factory import why_not_batched
from autorank.engine.jobs import ClientJob, ClientOutcome, LocalSplit
from autorank.engine.local import TrainingStoppedError, TrainSettings, client_seed
from autorank.engine.sequential import SequentialBackend, build_client_model
from autorank.lora.adapters import AdapterState
from autorank.lora.functional import LoraTemplate, evaluate_state
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import AlphaPolicy, expand_ranks
from autorank.merge.aggregators import AGGREGATORS
from autorank.models.evaluation import evaluate
from autorank.models.zoo import build_model
from autorank.rounds.steps import (
    ClientData,
    client_parameters,
    initial_state,
    round_jobs,
    server_step,
    start_state,
)

CPU = torch.device("cpu")
# Batched matmuls sum in another order than one client's: a few ulps per step, compounded.
CLOSE = {"rtol": 2e-4, "atol": 2e-5}


def _lora(policy: AlphaPolicy = "fixed") -> LoraSettings:
    return LoraSettings(policy, alpha=8.0, alpha_ratio=2.0, dropout=0.0, head=("head",))


def _train(kind: str = "sgd", clip: float | None = None) -> TrainSettings:
    if kind == "adam":
        return TrainSettings("adam", 0.01, 0.0, 1e-3, 8, clip)
    if kind == "adamw":
        return TrainSettings("adamw", 0.01, 0.0, 1e-2, 8, clip)
    if kind == "momentum":
        return TrainSettings("sgd", 0.1, 0.9, 1e-2, 8, clip)
    return TrainSettings("sgd", 0.1, 0.0, 0.0, 8, clip)


def _mlp() -> nn.Module:
    return build_model("mlp", input_shape=(1, 4, 4), n_classes=3, hidden=(12, 10), seed=0)


def _data(n: int, seed: int, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, d, generator=gen) + y[:, None].float()
    return x, y


# Unequal sizes: clients run out of batches at different steps, last batches are short.
SIZES = (5, 19, 8, 33)
RANKS = ({"fc1": 2, "fc2": 1}, {"fc1": 6, "fc2": 4}, {"fc1": 3, "fc2": 4}, {"fc1": 1, "fc2": 2})


def _jobs(base: nn.Module, lora: LoraSettings, starts: str) -> list[ClientJob]:
    """Jobs from the global init (``download``), fresh adapters (FLoRA) or nothing (warm-up)."""
    global_state = initial_state(base, RANKS, lora, seed=1)
    # Give the global adapter non-zero B so the download's products are not trivially zero.
    gen = torch.Generator().manual_seed(9)
    for f in global_state.lora.values():
        f.B.copy_(0.1 * torch.randn(f.B.shape, generator=gen))
    jobs = []
    for i, (n, ranks) in enumerate(zip(SIZES, RANKS, strict=True)):
        x, y = _data(n, seed=i)
        paths = expand_ranks(base, ranks)
        state: AdapterState | None = None
        if starts != "warm-up":
            state = start_state(global_state, paths, lora, fresh=starts == "fresh")
        jobs.append(ClientJob(i, dict(ranks), state, x, y, 2, client_seed(0, 1, i)))
    return jobs


def _tests() -> list[LocalSplit | None]:
    return [LocalSplit(*_data(7 + i, seed=50 + i)) for i in range(len(SIZES) - 1)] + [None]


def _assert_same(batched: Sequence[ClientOutcome], sequential: Sequence[ClientOutcome]) -> None:
    for b, s in zip(batched, sequential, strict=True):
        assert b.result.client == s.result.client and b.result.steps == s.result.steps
        assert b.result.state.ranks() == s.result.state.ranks()
        assert_close(
            torch.tensor(b.result.epoch_losses), torch.tensor(s.result.epoch_losses), **CLOSE
        )
        for path, f in s.result.state.lora.items():
            g = b.result.state.lora[path]
            assert g.scale == pytest.approx(f.scale, rel=1e-12)
            assert_close(g.A, f.A, **CLOSE)
            assert_close(g.B, f.B, **CLOSE)
        for name, t in s.result.state.extra.items():
            assert_close(b.result.state.extra[name], t, **CLOSE)
        if s.personal is None:
            assert b.personal is None
        else:
            assert b.personal is not None
            assert b.personal.accuracy == pytest.approx(s.personal.accuracy, abs=1e-12)
            assert b.personal.loss == pytest.approx(s.personal.loss, rel=1e-4)


@pytest.mark.parametrize("policy", ["fixed", "proportional", "rslora"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("starts", ["download", "fresh", "warm-up"])
def test_one_round_matches_the_sequential_engine(
    policy: AlphaPolicy, optimizer: str, starts: str
) -> None:
    # Prepare
    base, lora, train = _mlp(), _lora(policy), _train(optimizer)
    jobs = _jobs(base, lora, starts)

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs, _tests())
    batched = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU).train_clients(jobs, _tests())

    # Assert
    _assert_same(batched, sequential)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_per_client_gradient_clipping_matches(optimizer: str) -> None:
    base, lora, train = _mlp(), _lora(), _train(optimizer, clip=0.05)
    jobs = _jobs(base, lora, "download")

    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs)
    batched = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU).train_clients(jobs)

    _assert_same(batched, sequential)


@pytest.mark.parametrize("max_steps", [1, 2, 3])
def test_local_steps_cap_each_epoch_in_both_engines(max_steps: int) -> None:
    # Prepare: sizes 5, 19, 8, 33 at batch 8 are 1, 3, 1 and 5 batches an epoch
    base, lora, train = _mlp(), _lora(), _train("adam")
    jobs = [replace(j, max_steps=max_steps) for j in _jobs(base, lora, "download")]

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs, _tests())
    batched = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU).train_clients(jobs, _tests())

    # Assert: 2 epochs of at most max_steps batches each, the same in both engines
    want = [2 * min(-(-n // 8), max_steps) for n in SIZES]
    assert [o.result.steps for o in sequential] == want
    _assert_same(batched, sequential)


@pytest.mark.parametrize(("accumulation", "max_steps"), [(2, None), (3, 2)])
def test_gradient_accumulation_is_the_same_in_both_engines(
    accumulation: int, max_steps: int | None
) -> None:
    # Prepare: sizes 5, 19, 8, 33 at batch 8 are 1, 3, 1 and 5 mini-batches an epoch
    base, lora = _mlp(), _lora()
    train = replace(_train("adam"), accumulation=accumulation)
    jobs = [replace(j, max_steps=max_steps) for j in _jobs(base, lora, "download")]

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs, _tests())
    batched = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU).train_clients(jobs, _tests())

    # Assert: steps of `accumulation` mini-batches, an epoch's last one shorter, 2 epochs
    cap = 10**9 if max_steps is None else max_steps * accumulation
    used = [min(-(-n // 8), cap) for n in SIZES]
    assert [o.result.steps for o in sequential] == [2 * -(-u // accumulation) for u in used]
    _assert_same(batched, sequential)


def test_chunks_of_clients_give_the_same_outcomes() -> None:
    base, lora, train = _mlp(), _lora(), _train("momentum")
    jobs = _jobs(base, lora, "download")

    whole = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU).train_clients(jobs, _tests())
    chunked = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU, max_clients=3)

    _assert_same(chunked.train_clients(jobs, _tests()), whole)


def _cnn_round() -> tuple[nn.Module, list[str], list[ClientJob], list[LocalSplit | None]]:
    """Two clients of a small CNN with LoRA on both convolutions and the hidden layer."""
    base = build_model("cnn", input_shape=(1, 8, 8), n_classes=3, hidden=(16,), seed=0)
    ranks = [{"conv1": 2, "conv2": 3, "fc1": 4}, {"conv1": 4, "conv2": 1, "fc1": 2}]
    global_state = initial_state(base, ranks, _lora(), seed=2)
    jobs = []
    for i, r in enumerate(ranks):
        x, y = _data(11 + 6 * i, seed=i, d=64)
        state = start_state(global_state, expand_ranks(base, r), _lora(), fresh=False)
        jobs.append(ClientJob(i, r, state, x, y, 2, client_seed(0, 1, i)))
    tests: list[LocalSplit | None] = [
        LocalSplit(*_data(5, seed=9, d=64)),
        LocalSplit(*_data(6, seed=8, d=64)),
    ]
    return base, ["conv1", "conv2", "fc1"], jobs, tests


def test_cnn_with_lora_on_convolutions_matches() -> None:
    # Prepare
    base, targets, jobs, tests = _cnn_round()
    lora, train = _lora(), _train("sgd")

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs, tests)
    batched = BatchedBackend(base, targets, lora, train, CPU).train_clients(jobs, tests)

    # Assert
    _assert_same(batched, sequential)


def test_a_raised_stop_ends_the_cohort_before_its_next_step() -> None:
    # Prepare: the longest client runs 10 steps (33 samples, batch 8, 2 epochs)
    base, lora, train = _mlp(), _lora(), _train("sgd")
    engine = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU)
    forwards = [0]

    def count(*_: object) -> None:
        forwards[0] += 1
        if forwards[0] == 4:
            engine.stop.set()

    engine.template.model.register_forward_hook(count)

    # Execute
    with pytest.raises(TrainingStoppedError):
        engine.train_clients(_jobs(base, lora, "download"), _tests())

    # Assert: one forward of the whole cohort per step; the fifth step never began
    assert forwards == [4]


def test_evaluate_state_matches_the_peft_model() -> None:
    base, lora = _mlp(), _lora("rslora")
    state = initial_state(base, RANKS, lora, seed=3)
    for f in state.lora.values():
        f.B.normal_(generator=torch.Generator().manual_seed(4))
    x, y = _data(40, seed=5)
    template = LoraTemplate(base, ["fc1", "fc2"], ("head",), CPU)

    got = evaluate_state(template, state, x, y)
    peft = build_client_model(base, state.ranks(), state, lora, seed=0)
    want = evaluate(peft, x, y, device=CPU)

    assert got.accuracy == want.accuracy and got.n == want.n
    assert got.loss == pytest.approx(want.loss, rel=1e-6)


def _three_rounds(method: str, engine: str, device: torch.device = CPU) -> list[float]:
    """A library-level run of three rounds (every aggregator's merge), global accuracy each."""
    base, lora, train = _mlp(), _lora(), _train("sgd")
    data = [ClientData(*_data(n, seed=i), *_data(4, seed=70 + i)) for i, n in enumerate(SIZES)]
    ranks = [dict(r) for r in RANKS] if method != "fedavg" else [{"fc1": 4, "fc2": 4}] * 4
    paths = [expand_ranks(base, r) for r in ranks]
    x_test, y_test = _data(60, seed=99)
    backend = (
        BatchedBackend(base, ["fc1", "fc2"], lora, train, device)
        if engine == "batched"
        else SequentialBackend(base, lora, train, device)
    )
    template = LoraTemplate(base, ["fc1", "fc2"], ("head",), device)
    global_state, fresh, version, accuracy = initial_state(base, ranks, lora, seed=0), False, 0, []
    for round_idx in (1, 2, 3):
        clients = [c for c in range(4) if (c + round_idx) % 4 != 0]  # one client sits out
        jobs = round_jobs(
            data, clients, global_state, ranks, paths, lora,
            fresh=fresh, epochs=1, seed=0, round_idx=round_idx,
        )  # fmt: skip
        backend.sync_base(base, version)
        outcomes = backend.train_clients(jobs, [data[c].local_split() for c in clients])
        step = server_step(
            method,  # type: ignore[arg-type]
            outcomes,
            previous=global_state,
            base=base,
            template=template,
            x=x_test,
            y=y_test,
            round_idx=round_idx,
        )
        global_state, fresh = step.global_state, bool(step.aggregation.base_delta)
        version += int(fresh)
        accuracy.append(step.evaluation.accuracy)
    assert client_parameters(global_state, paths)  # every client's count is defined
    return accuracy


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_three_sampled_rounds_give_the_same_accuracy(method: str) -> None:
    assert _three_rounds(method, "batched") == _three_rounds(method, "sequential")


def test_why_not_batched_names_dropout_and_untraceable_models() -> None:
    class Gate(nn.Module):
        """Data-dependent control flow: vmap cannot trace it."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.head(h if float(h.sum()) > 0 else -h)

    x = torch.randn(3, 4)
    dropout = LoraSettings("fixed", 8.0, 2.0, 0.1, ("head",))

    assert why_not_batched(_mlp(), ["fc1"], _lora(), torch.randn(3, 16)) is None
    assert "dropout" in str(why_not_batched(_mlp(), ["fc1"], dropout, torch.randn(3, 16)))
    assert why_not_batched(Gate(), ["fc1"], _lora(), x) is not None


def test_bad_jobs_are_refused_with_the_client_named() -> None:
    base, lora, train = _mlp(), _lora(), _train()
    engine = BatchedBackend(base, ["fc1", "fc2"], lora, train, CPU)
    x, y = _data(4, seed=0)

    with pytest.raises(ValueError, match="client 7"):
        engine.train_clients([ClientJob(7, {"fc1": 2, "fc2": 2}, None, x, y[:3], 1, 0)])
    with pytest.raises(ValueError, match="rank 2, the client has 3"):
        state = _jobs(base, lora, "download")[0].state
        engine.train_clients([ClientJob(0, {"fc1": 3, "fc2": 1}, state, x, y, 1, 0)])
    with pytest.raises(ValueError, match="dropout"):
        BatchedBackend(base, ["fc1"], LoraSettings("fixed", 8.0, 2.0, 0.2, ("head",)), train, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_on_cuda_matches_sequential_on_cpu() -> None:
    # Prepare
    base, lora, train = _mlp(), _lora(), _train("adam")
    jobs = _jobs(base, lora, "download")
    cuda = torch.device("cuda", 0)

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs, _tests())
    engine = BatchedBackend(base, ["fc1", "fc2"], lora, train, cuda)
    batched = engine.train_clients(jobs, _tests())

    # Assert
    _assert_near(batched, sequential)
    assert next(engine.template.model.parameters()).device.type == "cuda"
    assert next(base.parameters()).device.type == "cpu"  # the caller's base stays where it was


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full float32 convolutions on CUDA: cuDNN's TF32 default moved a CNN's factors by 4 %."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _assert_near(on_cuda: Sequence[ClientOutcome], on_cpu: Sequence[ClientOutcome]) -> None:
    """Outcomes back on the CPU and close to the CPU's: CUDA's kernels sum in other orders, so
    a looser tolerance than ``_assert_same``'s."""
    for b, s in zip(on_cuda, on_cpu, strict=True):
        assert b.result.steps == s.result.steps and b.result.state.ranks() == s.result.state.ranks()
        for path, f in s.result.state.lora.items():
            g = b.result.state.lora[path]
            assert g.A.device.type == "cpu" and g.B.device.type == "cpu"
            assert_close(g.A, f.A, rtol=1e-2, atol=1e-3)
            assert_close(g.B, f.B, rtol=1e-2, atol=1e-3)
        assert b.result.epoch_losses[-1] == pytest.approx(s.result.epoch_losses[-1], rel=1e-2)
        assert (b.personal is None) == (s.personal is None)
        if b.personal is not None and s.personal is not None:
            assert b.personal.loss == pytest.approx(s.personal.loss, rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["sequential", "batched"])
@pytest.mark.usefixtures("no_tf32")
def test_cnn_on_cuda_matches_the_cpu(engine: str) -> None:
    # Prepare
    base, targets, jobs, tests = _cnn_round()
    lora, train, cuda = _lora(), _train("momentum"), torch.device("cuda", 0)
    on_cuda = (
        BatchedBackend(base, targets, lora, train, cuda)
        if engine == "batched"
        else SequentialBackend(base, lora, train, cuda)
    )

    # Execute
    on_cpu = SequentialBackend(base, lora, train, CPU).train_clients(jobs, tests)
    got = on_cuda.train_clients(jobs, tests)

    # Assert
    _assert_near(got, on_cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_transformers_vit_trains_batched_on_cuda(tiny_vit_dir: Path) -> None:
    # Prepare
    base, targets, jobs = _vit_round(tiny_vit_dir)
    train, cuda = _train("adam"), torch.device("cuda", 0)

    # Execute
    on_cpu = SequentialBackend(base, VIT_LORA, train, CPU).train_clients(jobs)
    got = BatchedBackend(base, targets, VIT_LORA, train, cuda).train_clients(jobs)

    # Assert
    _assert_near(got, on_cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_three_rounds_on_cuda_reach_the_cpus_accuracy(method: str) -> None:
    # Execute: every merge, the global evaluation and FLoRA's base merge with CUDA engines
    on_cuda = _three_rounds(method, "batched", torch.device("cuda", 0))
    on_cpu = _three_rounds(method, "batched")

    # Assert: 60 test samples; float differences may flip at most one prediction a round
    assert on_cuda == pytest.approx(on_cpu, abs=1 / 60 + 1e-9)


VIT_LORA = LoraSettings("fixed", 8.0, 2.0, 0.0, ("classifier",))


def _vit_round(folder: Path) -> tuple[nn.Module, list[str], list[ClientJob]]:
    """Two clients of a tiny ViT: LoRA on the attention projections, the classifier as head."""
    base = build_model(
        "hf", input_shape=(1, 8, 8), n_classes=3, hf_name_or_path=str(folder), seed=0
    ).eval()
    base.requires_grad_(False)
    ranks = [{"q_proj": 2, "v_proj": 4}, {"q_proj": 4, "v_proj": 1}]
    global_state = initial_state(base, ranks, VIT_LORA, seed=0)
    jobs = [
        ClientJob(i, r, start_state(global_state, expand_ranks(base, r), VIT_LORA, fresh=False),
                  *_data(9 + 4 * i, seed=i, d=64), 2, client_seed(0, 1, i))
        for i, r in enumerate(ranks)
    ]  # fmt: skip
    return base, ["q_proj", "v_proj"], jobs


def test_a_transformers_vit_trains_batched_like_sequential(tiny_vit_dir: Path) -> None:
    # Prepare
    base, targets, jobs = _vit_round(tiny_vit_dir)
    lora, train = VIT_LORA, _train("sgd")

    # Execute
    assert why_not_batched(base, targets, lora, jobs[0].x) is None
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs)
    batched = BatchedBackend(base, targets, lora, train, CPU).train_clients(jobs)

    # Assert
    _assert_same(batched, sequential)
