"""The settings' vocabularies (the names a YAML value may take) and the base of every section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Scheme = Literal["iid", "dirichlet", "shards", "quantity_skew", "double_imbalance", "natural"]
Criterion = Literal["entropy", "gini_simpson", "n_samples", "learning_difficulty"]
AssignerName = Literal["autorank", "uniform", "manual", "random", "heavy_tail", "size"]
AggregatorName = Literal[
    "fedavg",
    "zeropad",
    "hetlora",
    "rbla",
    "rbla_svd",
    "rbla_product",
    "rbla_tiered",
    "flexlora",
    "fedex",
    "flora",
]
# The merges that write into the frozen base each round (FLoRA's update, FedEx-LoRA's residual).
BASE_UPDATING: tuple[str, ...] = ("flora", "fedex")
# Seeds as numpy's legacy generators and every library below take them; a larger one overflowed.
SEED_MAX = 2**32 - 1
RUN_NAME_MAX = 250  # MLflow's limit on a run name


def _run_name(name: str) -> str:
    """A run name MLflow, Prefect and a terminal show as one line, and no path can come from."""
    if len(name) > RUN_NAME_MAX:
        raise ValueError(f"expected at most {RUN_NAME_MAX} characters, got {len(name):,}")
    bad = sorted({c for c in name if c in "/\\" or not c.isprintable()})
    if bad:
        raise ValueError(
            f"expected no control characters or path separators (/ \\), got {''.join(bad)!r}"
        )
    return name


# A seed: an integer (YAML's true is not 1), as numpy and torch take it.
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True)]
RunName = Annotated[str, Field(min_length=1), AfterValidator(_run_name)]

# The data sets that are text (``data.text``'s readers), and the models that read tokens.
TEXT_DATA: tuple[str, ...] = ("tweets", "kjv", "fortunes", "text")
# The text data without labels: a causal LM's only.
UNLABELLED_TEXT: tuple[str, ...] = ("kjv",)
# Text data whose samples name their natural client by themselves (no data.key_column).
KEYED_TEXT: tuple[str, ...] = ("kjv", "fortunes")
TEXT_MODELS: tuple[str, ...] = ("text_classifier", "causal_lm")
# When aggregation.early_method applies: always, or only when every rank tier holds every label.
EarlyWhen = Literal["always", "all_labels"]


class Section(BaseModel):
    """A config section: unknown keys refused, floats finite, values frozen."""

    # An inf learning rate or alpha passed every bound and failed the run in its warm-up.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
