"""Engine throughput: client-samples per second of the sequential and batched engines.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/engine_throughput.py [--clients 10 100 1000] [--models mlp cnn]
        [--device cpu|cuda] [--threads 1] [--samples 60] [--epochs 1] [--batch-clients 1000]

Each of K clients holds a Fashion-MNIST-shaped share (784 inputs, 10 classes, sizes log-normal
around ``--samples``) and a rank drawn from [2, 32]; every client starts from the global
adapter's download, as in a training round. One engine call trains all K clients for
``--epochs`` local epochs (batch 64, SGD). Both engines are run once untimed (building the
sequential engine's peft models and warming the allocator) and then timed over ``--repeat``
calls; the better time counts. ``ratio`` is batched over sequential throughput, in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from autorank.engine.batched import BatchedBackend
from autorank.engine.jobs import ClientBackend, ClientJob, pick_device
from autorank.engine.local import TrainSettings, client_seed
from autorank.engine.sequential import SequentialBackend
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import expand_ranks
from autorank.models.zoo import build_model, default_targets
from autorank.rounds.steps import initial_state, start_state

LORA = LoraSettings("proportional", 16.0, 2.0, 0.0, ("head",))
TRAIN = TrainSettings("sgd", 0.05, 0.0, 0.0, 64, None)


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_jobs(
    model: str, k: int, samples: int, epochs: int, seed: int = 0
) -> tuple[torch.nn.Module, list[str], list[ClientJob]]:
    """K clients' jobs of one round on a freshly built base."""
    shape = (1, 28, 28)
    base = build_model(model, input_shape=shape, n_classes=10, hidden=(200, 200), seed=seed)
    base.requires_grad_(False)
    targets = list(default_targets(model))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    sizes = np.maximum(2, rng.lognormal(np.log(samples), 0.5, size=k).astype(int))
    ranks = [dict.fromkeys(targets, int(r)) for r in rng.integers(2, 33, size=k)]
    global_state = initial_state(base, ranks, LORA, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for i, (n, r) in enumerate(zip(sizes, ranks, strict=True)):
        x = torch.rand(int(n), 784, generator=gen)
        y = torch.randint(0, 10, (int(n),), generator=gen)
        state = start_state(global_state, expand_ranks(base, r), LORA, fresh=False)
        jobs.append(ClientJob(i, r, state, x, y, epochs, client_seed(seed, 1, i)))
    return base, targets, jobs


def best_time(engine: ClientBackend, jobs: list[ClientJob], repeat: int, sync: bool) -> float:
    """The fastest of ``repeat`` timed calls, after one untimed call."""
    engine.train_clients(jobs)
    times = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_clients(jobs)
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--samples", type=int, default=60, help="mean samples per client")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--batch-clients", type=int, default=None, help="batched: clients per step (default K)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    sync = device.type == "cuda"
    print(
        f"device: {device_name(device)} ({device}), torch {torch.__version__}, "
        f"{args.threads} CPU thread(s)"
    )
    print(
        "model  clients  samples/round  sequential s  batched s  seq samples/s  "
        "batched samples/s  ratio" + ("  batched peak MiB" if sync else "")
    )
    for model in args.models:
        for k in args.clients:
            base, targets, jobs = make_jobs(model, k, args.samples, args.epochs)
            work = sum(int(j.x.shape[0]) for j in jobs) * args.epochs
            seq = SequentialBackend(base, LORA, TRAIN, device)
            bat = BatchedBackend(
                base, targets, LORA, TRAIN, device, max_clients=args.batch_clients or k
            )
            t_seq = best_time(seq, jobs, args.repeat, sync)
            if sync:
                del seq  # its peft models leave the device before the batched engine's peak
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t_bat = best_time(bat, jobs, args.repeat, sync)
            peak = f"  {torch.cuda.max_memory_allocated(device) / 2**20:17.0f}" if sync else ""
            print(
                f"{model:5s}  {k:7d}  {work:13d}  {t_seq:12.3f}  {t_bat:9.3f}  "
                f"{work / t_seq:13.0f}  {work / t_bat:17.0f}  {t_seq / t_bat:5.2f}x{peak}",
                flush=True,
            )


if __name__ == "__main__":
    main()
