"""The base with pluggable LoRA factors: a frozen copy of the base model whose LoRA targets take
one client's factors per call (``torch.func.functional_call``).

The batched engine maps it over a cohort's stacked factors; the server evaluates the global
adapter with it (``evaluate_state``), and ``autorank.serving`` rebuilds the logged model with it
(``bind_state``), so all three compute ``base(x) + scale * (x A^T) B^T`` the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.targets import expand_ranks, head_parameter_names, layer_dims, matches
from autorank.models.evaluation import EvalResult
from autorank.models.objectives import objective_of

Params = dict[str, torch.Tensor]


class _LoraSlot(nn.Module):
    """A base layer plus LoRA placeholders that ``functional_call`` fills per client.

    ``lora_A: [r, d_in]``, ``lora_B: [d_out, r]`` and ``scale`` are buffers (never trained
    here): each call brings one client's tensors.
    """

    lora_A: torch.Tensor  # noqa: N815  (peft's names)
    lora_B: torch.Tensor  # noqa: N815
    scale: torch.Tensor

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        d_out, d_in = layer_dims(base, path)
        w = cast(torch.Tensor, base.weight)
        self.register_buffer("lora_A", w.new_zeros(1, d_in), persistent=False)
        self.register_buffer("lora_B", w.new_zeros(d_out, 1), persistent=False)
        self.register_buffer("scale", w.new_zeros(()), persistent=False)


class _LoraLinear(_LoraSlot):
    """``base(x) + scale * (x A^T) B^T``, peft's order of operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return cast(torch.Tensor, self.base(x)) + lora * self.scale


class _LoraConv2d(_LoraSlot):
    """A conv's LoRA as peft builds it: ``A`` a conv of the base's kernel, ``B`` a 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = cast(nn.Conv2d, self.base)
        A = self.lora_A.reshape(self.lora_A.shape[0], c.in_channels, *c.kernel_size)
        B = self.lora_B.reshape(c.out_channels, -1, 1, 1)
        h = F.conv2d(x, A, None, c.stride, c.padding)
        return c(x) + F.conv2d(h, B) * self.scale


def _wrap(module: nn.Module, path: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        return _LoraLinear(module, path)
    if isinstance(module, nn.Conv2d):
        return _LoraConv2d(module, path)
    raise TypeError(f"cannot batch LoRA on a {type(module).__name__}")


class LoraTemplate:
    """A frozen copy of the base whose LoRA targets take their factors per call.

    Args:
        base: the frozen base model.
        targets: target keys (``fc1``, ``q_proj``), expanded to module paths as peft does.
        head: modules trained in full next to LoRA (their parameters are per-client too).
        device: where the template lives.
    """

    def __init__(
        self, base: nn.Module, targets: Sequence[str], head: Sequence[str], device: torch.device
    ) -> None:
        self.paths = sorted(expand_ranks(base, dict.fromkeys(targets, 1)))
        self.dims = {p: layer_dims(base.get_submodule(p), p) for p in self.paths}
        self.head_names = head_parameter_names(base, head)
        shared = device.type == "cpu" and all(t.device.type == "cpu" for t in base.parameters())
        # On CPU the template shares the base's tensors: no copy, and FLoRA's in-place merge
        # into the base is seen at once. Elsewhere it holds its own copy (``sync_base``).
        memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if shared else {}
        model = copy.deepcopy(base, memo)
        for path in self.paths:
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, _wrap(owner.get_submodule(leaf), path))
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self.device = device
        own = dict(self.model.state_dict(keep_vars=True))
        self._base_tensors = {name: own[self._template_name(name)] for name in base.state_dict()}
        self.head_init = {n: own[n].detach() for n in self.head_names}
        self._expanded: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}

    def _template_name(self, name: str) -> str:
        module, _, leaf = name.rpartition(".")
        return f"{module}.base.{leaf}" if module in self.paths else name

    def sync_base(self, base: nn.Module) -> None:
        """Copy the base's weights in (after FLoRA merged into it); shared tensors are skipped."""
        with torch.no_grad():
            for name, t in base.state_dict().items():
                own = self._base_tensors[name]
                if own.data_ptr() != t.data_ptr():
                    own.copy_(t)

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One client's logits: ``params`` holds ``<path>.lora_A/lora_B/scale`` and the head."""
        return cast(torch.Tensor, functional_call(self.model, params, (x,)))

    def expand(self, ranks: Mapping[str, int]) -> dict[str, int]:
        """A job's target ranks as module path -> rank (``expand_ranks``), cached per pattern."""
        key = tuple(sorted(ranks.items()))
        if key not in self._expanded:
            out: dict[str, int] = {}
            for path in self.paths:
                hit = [k for k in ranks if matches(path, k)]
                if not hit:
                    raise ValueError(f"job ranks {dict(ranks)} do not cover LoRA target '{path}'")
                out[path] = int(ranks[hit[0]])
            self._expanded[key] = out
        return self._expanded[key]


def check_state(state: AdapterState, ranks: Mapping[str, int]) -> None:
    if sorted(state.lora) != sorted(ranks):
        raise ValueError(
            f"adapter state does not fit the model: LoRA layers {sorted(state.lora)}, "
            f"expected {sorted(ranks)}"
        )
    for path, f in state.lora.items():
        if f.rank != ranks[path]:
            raise ValueError(
                f"adapter state of '{path}' has rank {f.rank}, the client has {ranks[path]}"
            )


def bind_state(template: LoraTemplate, state: AdapterState) -> nn.Module:
    """``base + state`` as a plain ``x -> logits`` module over the template's frozen base.

    A state with no LoRA factors (FLoRA after merging them into the base) gives the base with
    the state's head; a state with no head keeps the base's.
    """
    params: Params = {}
    dev = template.device
    for path in template.paths:
        f = state.lora.get(path)
        d_out, d_in = template.dims[path]
        if f is None:
            f = LoraFactors(torch.zeros(1, d_in), torch.zeros(d_out, 1), 0.0)
        params[f"{path}.lora_A"] = f.A.to(dev)
        params[f"{path}.lora_B"] = f.B.to(dev)
        params[f"{path}.scale"] = torch.tensor(f.scale, device=dev)
    extra = state.extra or template.head_init
    params |= {n: extra[n].to(dev) for n in template.head_names}
    return _Bound(template, params)


def evaluate_state(
    template: LoraTemplate,
    state: AdapterState,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> EvalResult:
    """Accuracy and mean cross-entropy of ``base + state`` (``bind_state``) on ``x``, ``y``."""
    from autorank.models.evaluation import evaluate

    model = bind_state(template, state)
    return evaluate(model, x, y, batch_size=batch_size, device=template.device)


class _Bound(nn.Module):
    """The template with one state bound to it, as a plain ``x -> logits`` module."""

    def __init__(self, template: LoraTemplate, params: Params) -> None:
        super().__init__()
        self.template = template
        self.bound = params
        self.objective = objective_of(template.model)  # the template is not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.template.forward(self.bound, x)
