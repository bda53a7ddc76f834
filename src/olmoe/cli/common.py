"""What several commands share: flag types, the MODEL and load flags, loading a model, and
OpenMP's passive waiting. torch is imported only inside the functions that load a model."""

from __future__ import annotations

import argparse
import os
import sys
import time

from olmoe.errors import UsageError
from olmoe.formats import QUANTIZE_CHOICES

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def number(kind, low, low_inclusive=True, high=None, what=""):
    """An argparse type: `kind(text)` within [low, high] (or (low, high] when not
    `low_inclusive`), else a one-line error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub repo id")
    parser.add_argument(
        "--revision",
        help="hub branch, tag or commit, or a training run's revision (e.g. step10000-tokens41B; "
        "olmoe revisions MODEL lists them)",
    )


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --device and --quantize, as `load_model` reads them."""
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="weights' dtype in memory (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="quantise the weights at load time (int8: about 0.6x the memory traffic of bf16; "
        "int4: about 0.3x)",
    )


def load_model(args):
    """The model (made fast by `olmoe.engine.apply`) and tokenizer of MODEL, with --revision and
    `add_load_arguments`' flags, and the seconds loading took."""
    import torch

    import olmoe.engine
    from olmoe import OlmoeForCausalLM
    from olmoe.tokenizer import Tokenizer

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device!r} is not a torch device ({exc})") from None
    started = time.perf_counter()
    model = OlmoeForCausalLM.from_pretrained(
        args.model,
        revision=args.revision,
        dtype=DTYPES[args.dtype],
        device=device,
        quantize=args.quantize,
    )
    model = olmoe.engine.apply(model)
    tokenizer = Tokenizer.from_pretrained(args.model, revision=args.revision)
    # The engine multiplies bf16 in float32 itself where PyTorch would emulate bf16 products.
    slow_bf16 = (
        args.dtype == "bf16"
        and device.type == "cpu"
        and not cpu_has_bf16_matmul()
        and not olmoe.engine.applied(model)
    )
    if slow_bf16 and sys.stderr.isatty():  # a note for a person, not for scripts' stderr
        print(
            "olmoe: this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX) and olmoe's "
            "CPU engine does not run this model, so bf16 matrix products run far slower than "
            "float32 here: pass --dtype fp32 if the model fits in memory twice over",
            file=sys.stderr,
        )
    return model, tokenizer, time.perf_counter() - started


def cpu_has_bf16_matmul() -> bool:
    """Whether PyTorch's CPU matrix products run bf16 natively (oneDNN on AVX-512 BF16 or AMX);
    without it they fall back to a scalar path, orders of magnitude slower than float32
    (docs/inference.md)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def wait_passively(command: str) -> None:
    """Re-execute `olmoe COMMAND ...` with OpenMP's passive wait policy, unless the user chose a
    policy or this process is not that command. Workers that spin while they wait fight whatever
    else runs on the machine for its cores (the server's HTTP thread, another job); libgomp reads
    the policy once, when torch loads it, hence a new process rather than a setting."""
    if WAIT_POLICY_ENV not in os.environ and sys.argv[1:2] == [command]:
        environment = {**os.environ, WAIT_POLICY_ENV: "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "olmoe", *sys.argv[1:]], environment)
