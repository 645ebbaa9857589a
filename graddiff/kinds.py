"""The vocabulary of what graddiff records: kinds of tensors and their causal order.

Every other module (hooks, recorder, writer, reader, differ) speaks in these names; the enum
values are what goes into the HDF5 file and the JSON report.
"""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """A family of recorded tensors. The value is the on-disk and JSON spelling."""

    PARAM = "param"  # parameter value at the start of the step
    BUFFER_START = "buffer_start"  # module buffers at the start of the step (with params)
    INPUT = "input"  # the model's forward inputs
    ACTIVATION = "activation"  # a module's output, per call
    LOSS = "loss"  # the tensor backward()/autograd.grad() was called on
    GRAD_OUTPUT = "grad_output"  # gradient w.r.t. a module output
    GRAD = "grad"  # parameter .grad as the update consumes it
    AUTOGRAD_GRAD = "autograd_grad"  # outputs of torch.autograd.grad
    BUFFER = "buffer"  # module buffers (BatchNorm running stats, ...) at the step's end

    def __str__(self) -> str:  # click and f-strings print the plain value
        return self.value


#: Within one step, the order in which a difference can cause the next one.
CAUSAL_ORDER: tuple[Kind, ...] = (
    Kind.PARAM,
    Kind.BUFFER_START,
    Kind.INPUT,
    Kind.ACTIVATION,
    Kind.LOSS,
    Kind.GRAD_OUTPUT,
    Kind.GRAD,
    Kind.AUTOGRAD_GRAD,
    Kind.BUFFER,
)

CAUSAL_RANK: dict[str, int] = {k.value: i for i, k in enumerate(CAUSAL_ORDER)}

ALL_KINDS: tuple[str, ...] = tuple(k.value for k in CAUSAL_ORDER)

#: Kinds that hold a parameter's gradient, from either source.
GRADIENT_KINDS: frozenset[str] = frozenset({Kind.GRAD.value, Kind.AUTOGRAD_GRAD.value})


def parse_kinds(kinds: object) -> tuple[str, ...]:
    """Normalise a user's ``kinds=`` option (None, "all", a string or an iterable) to values."""
    if kinds is None or kinds == "all":
        return ALL_KINDS
    items = [kinds] if isinstance(kinds, str) else list(kinds)  # type: ignore[call-overload]
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in CAUSAL_RANK:
                raise ValueError(f"unknown kind {part!r}; choose from {', '.join(ALL_KINDS)}")
            out.append(part)
    return tuple(k for k in ALL_KINDS if k in out)


def with_buffer_start(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Recording "buffer" also records "buffer_start" (the same buffers where params are)."""
    if Kind.BUFFER.value in kinds and Kind.BUFFER_START.value not in kinds:
        kinds = (*kinds, Kind.BUFFER_START.value)
    return tuple(k for k in ALL_KINDS if k in kinds)
