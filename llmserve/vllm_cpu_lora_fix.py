"""A fix, loaded by vLLM itself, for mixed base/adapter batches on vLLM-CPU.

vLLM's CPU LoRA kernels (``vllm.lora.ops.torch_ops``) pick each token's adapter
weights with ``weights[indices]``, and a token of a base-model request has
index -1: Python indexing turns that into "the last adapter slot", so in a
batch that mixes base and adapter requests the base requests are computed
with some adapter (upstream vLLM PRs #48421 and #49656). The fix zeroes the
inputs of rows whose index is -1 before the kernels run, so those rows get no
LoRA contribution, exactly as on GPU.

vLLM calls ``register`` in each of its processes (the ``vllm.general_plugins``
entry point in pyproject.toml). It first asks the kernels whether they still
have the bug and patches only then, so a vLLM that fixed it upstream runs
untouched. Like ``vllm_engine``, this module is engine-side: it imports vLLM
and runs only inside the engine's processes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)

# The kernels that index the weight stack by token, and the argument position
# of their inputs and indices.
_KERNELS = {"bgmv_shrink": (0, 3), "bgmv_expand": (0, 3), "bgmv_expand_slice": (0, 3)}


def kernels_have_the_bug() -> bool:
    """True when a base-model row (index -1) gets another adapter's LoRA output."""
    import torch

    from vllm.lora.ops.torch_ops import lora_ops

    inputs = torch.ones(1, 4)
    weights = torch.ones(2, 1, 3, 4)  # two adapter slots, rank 3
    output = torch.zeros(1, 3)
    lora_ops.bgmv_shrink(inputs, weights, output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def _without_base_rows(kernel: Callable[..., Any], inputs_at: int, indices_at: int) -> Callable[..., Any]:
    signature = inspect.signature(kernel)
    inputs_name, indices_name = (list(signature.parameters)[at] for at in (inputs_at, indices_at))

    @functools.wraps(kernel)
    def fixed(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        indices = call.arguments[indices_name]
        base_rows = indices < 0
        if bool(base_rows.any()):
            call.arguments[inputs_name] = call.arguments[inputs_name].masked_fill(base_rows.unsqueeze(-1), 0)
            call.arguments[indices_name] = indices.clamp(min=0)
        return kernel(*call.args, **call.kwargs)

    fixed.llmserve_fixed = True  # type: ignore[attr-defined]
    return fixed


def apply() -> bool:
    """Patch the CPU kernels where they have the bug; True when patched."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "llmserve_fixed", False) or not kernels_have_the_bug():
        return False
    for name, (inputs_at, indices_at) in _KERNELS.items():
        fixed = _without_base_rows(getattr(lora_ops, name), inputs_at, indices_at)
        # The sgmv kernels call these through the module; the CPU wrapper holds its own names.
        setattr(lora_ops, name, fixed)
        setattr(punica_cpu, name, fixed)
    logger.info("llmserve: masked base-model rows in vLLM's CPU LoRA kernels (mixed-batch fix)")
    return True


def register() -> None:
    """vLLM's plugin hook: apply the fix on CPU platforms."""
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            apply()
    except Exception:  # a plugin must never stop the engine from starting
        logger.exception("llmserve: could not check vLLM's CPU LoRA kernels")
