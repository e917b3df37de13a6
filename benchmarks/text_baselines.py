"""Text baselines without a transformer: TF-IDF + logistic regression on the clients' pooled
training data, scored on the run's global test split.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/text_baselines.py [--config configs/text_sentiment.yaml]
        [--set key=value ...]

The data, partition and test split are the run's (``autorank.recipe.federation_for``); the
pooled data is every client's training share (its local test share and the server's share
left out), the texts as the model sees them: its tokens, decoded (truncated to
``data.max_length``, lower-cased by MiniLM's tokenizer). Word 1-2-grams, sublinear TF, lbfgs
logistic regression; the majority class is printed beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from autorank.config import load_config
from autorank.data.text import TextEncoder
from autorank.recipe import federation_for, text_options
from autorank.rounds.steps import client_data, test_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/text_sentiment.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    options = text_options(config)
    if options is None:
        raise SystemExit(f"{args.config}: data.name {config.data.name!r} is not text")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    federation = federation_for(config)
    encoder = TextEncoder(options.tokenizer, options.max_length)
    clients = client_data(federation)
    x_train = np.concatenate([c.x.numpy() for c in clients])
    y_train = np.concatenate([c.y.numpy() for c in clients])
    x_test, y_test = (t.numpy() for t in test_data(federation))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    features = vectorizer.fit_transform(encoder.decode(x_train))
    model = LogisticRegression(max_iter=2000).fit(features, y_train)
    predicted = model.predict(vectorizer.transform(encoder.decode(x_test)))
    majority = np.bincount(y_train).argmax()
    print(f"{args.config}, seed {config.seed}: {len(clients)} clients' pooled training data")
    print(f"  {len(y_train)} training tweets, {len(y_test)} test tweets")
    print(f"  TF-IDF + LR test accuracy: {float((predicted == y_test).mean()):.4f}")
    print(f"  majority class test accuracy: {float((y_test == majority).mean()):.4f}")
    print(f"  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
