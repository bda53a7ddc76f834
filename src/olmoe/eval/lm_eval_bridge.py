"""olmoe as an lm-evaluation-harness model, "olmoe": any lm-eval task runs on olmoe's fast paths.

    olmoe lm-eval --model olmoe --model_args pretrained=DIR,dtype=fp32 --tasks hellaswag

lm-eval 0.4.13 finds models only in its own registry (its `lm_eval.models.MODEL_MAPPING`; it
reads no entry points), so a plain `lm_eval --model olmoe` cannot see this class: `olmoe
lm-eval` imports this module, which registers it, and then runs lm-eval's own command line with
the same arguments. From Python, importing this module is enough:
`lm_eval.simple_evaluate(model="olmoe", model_args="pretrained=DIR", tasks=[...])`.

The three request types go through the paths `olmoe eval` uses:

- loglikelihood: `runner.score_requests` (batched, shared contexts computed once), so the numbers
  are `olmoe eval`'s for the same (context, continuation) pairs. Like OLMES, and unlike
  lm-eval's Hugging Face model, the context and the continuation are tokenised apart, and an
  empty context is the end-of-text token (lm-eval's prefix token for models without BOS).
- loglikelihood_rolling: `perplexity.sequence_nll` over the end-of-text token and the text, the
  sliding windows of `olmoe eval --text` (half a window of stride unless `stride` is given), each
  document on its own as lm-eval asks.
- generate_until: the serving engine through `batch_generation.run_jobs`, with the request's
  `until`, `max_gen_toks` (default 256, lm-eval's) and `do_sample`/`temperature`; the prompt
  loses tokens from its start so that it and the answer fit the window.

Needs the optional extra: pip install 'olmoe[lmeval]'.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise ImportError(
        "the lm-evaluation-harness bridge needs lm-eval: pip install 'olmoe[lmeval]'"
    ) from None

from olmoe import OlmoeForCausalLM, engine
from olmoe.errors import ConfigError
from olmoe.eval.batch_generation import Done, Job, job_seed, run_jobs
from olmoe.eval.perplexity import sequence_nll
from olmoe.eval.runner import DEFAULT_MAX_LENGTH, score_requests
from olmoe.eval.tasks import Request
from olmoe.tokenizer import Tokenizer

MODEL_NAME = "olmoe"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
# Generation settings the engine honours; others (top_p, top_k, ...) are reported and ignored.
_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@register_model(MODEL_NAME)
class OlmoeLM(LM):
    """`--model_args`: pretrained (a checkpoint directory or hub repo id), revision, dtype
    (bf16, fp16, fp32 or their torch names; default bf16), quantize (int8 or int4), max_length
    (tokens the model sees at once; default the model's window, at most 2048 as in `olmoe eval`),
    strategy (packed or flat), stride (rolling windows' step), seed (sampling). lm-eval's own
    `--batch_size` and `--device` arrive here too; an `auto` batch size means 8. From Python,
    `model` and `tokenizer` wrap an olmoe model already loaded."""

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        dtype: str = "bf16",
        device: str | None = None,
        quantize: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        strategy: str = "packed",
        stride: int | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,
        model=None,
        tokenizer=None,
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ConfigError("--model_args needs pretrained=DIR (a checkpoint or repo id)")
            model, tokenizer = _load(pretrained, revision, dtype, _device(device), quantize)
        if max_batch_size is not None:
            warnings.warn("olmoe ignores --max_batch_size: pass --batch_size", stacklevel=2)
        # The CPU engine where it applies, as `olmoe eval` runs the model.
        self.model, self.tokenizer = engine.apply(model).eval(), tokenizer
        self.name = str(pretrained or "olmoe")
        self.batch_size = _batch_size(batch_size)
        window = model.config.max_position_embeddings
        # As `olmoe eval`: OLMES's 2,048 tokens, or less on a model with a shorter window.
        self.max_length = min(int(max_length) if max_length else DEFAULT_MAX_LENGTH, window)
        self.strategy = strategy
        self.stride = int(stride) if stride else None
        self.seed = int(seed)
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        eot = self.tokenizer.eos_token
        pairs = [Request(context or eot, continuation) for context, continuation in _args(requests)]
        with _bar(len(pairs), "olmoe loglikelihood", disable_tqdm) as bar:
            scores = score_requests(
                self.model,
                self.tokenizer,
                pairs,
                self.batch_size,
                self.max_length,
                self.strategy,
                bar.update,
                greedy=True,
            )
        return [(logprob, is_greedy) for logprob, _, is_greedy in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        backend = self.tokenizer.backend_tokenizer
        texts = [text for (text,) in _args(requests)]
        encoded = backend.encode_batch(texts, add_special_tokens=False)
        out = []
        with _bar(len(texts), "olmoe loglikelihood_rolling", disable_tqdm) as bar:
            for e in encoded:
                # Conditioned on the end-of-text token, as `olmoe eval --text` scores a document.
                tokens = [self.tokenizer.eos_token_id, *e.ids]
                nll = sequence_nll(
                    self.model, tokens, self.max_length, self.stride, self.batch_size
                )
                out.append(-nll)
                bar.update(1)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        backend = self.tokenizer.backend_tokenizer
        args = _args(requests)
        encoded = backend.encode_batch([context for context, _ in args], add_special_tokens=False)
        jobs = [
            self._job(number, e.ids, kwargs)
            for number, (e, (_, kwargs)) in enumerate(zip(encoded, args))
        ]
        texts: list[str | None] = [None] * len(jobs)
        with _bar(len(jobs), "olmoe generate_until", disable_tqdm) as bar:

            def finished(done: Done) -> None:
                texts[done.job.key] = done.texts[0]
                bar.update(1)

            run_jobs(self.model, self.tokenizer, jobs, self.batch_size, finished)
        return texts

    def _job(self, number: int, prompt: Sequence[int], kwargs: dict[str, Any]):
        ignored = sorted(set(kwargs) - _GENERATION_KEYS)
        if ignored:
            warnings.warn(f"olmoe ignores the generation settings {ignored}", stacklevel=3)
        until = kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        budget = int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
        room = self.model.config.max_position_embeddings - budget
        if room < 1:
            raise ConfigError(
                f"max_gen_toks {budget} leaves no room for the prompt in the model's "
                f"{self.model.config.max_position_embeddings}-token window"
            )
        temperature = float(kwargs.get("temperature") or 0.0)
        # lm-eval's HFLM: without do_sample, a temperature above 0 samples.
        sample = kwargs.get("do_sample")
        sample = temperature > 0 if sample is None else bool(sample)
        return Job(
            key=number,
            prompt=list(prompt)[-room:],
            max_new_tokens=budget,
            stop=tuple(s for s in until if s),
            temperature=(temperature or 1.0) if sample else 0.0,
            seed=job_seed(self.seed, number),
        )

    # ------------------------------------------------------------------ chat templates
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def _load(pretrained: str, revision, dtype: str, device: str, quantize):
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in (*_DTYPES, *_DTYPES.values()):
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model = OlmoeForCausalLM.from_pretrained(
        pretrained,
        revision=revision,
        dtype=_DTYPES.get(dtype, dtype),
        device=torch.device(device),
        quantize=quantize,
    )
    return model, Tokenizer.from_pretrained(pretrained, revision=revision)


def _device(asked: str | None) -> str:
    """lm-eval's --device, whose default is cuda:0 whether or not there is a GPU: without one,
    the CPU (as lm-eval's Hugging Face model does)."""
    if asked is None or (asked.startswith("cuda") and not torch.cuda.is_available()):
        if asked is not None:
            print(f"olmoe: no CUDA for --device {asked}: running on the CPU", file=sys.stderr)
        return "cpu"
    return asked


def _batch_size(value: int | str | None) -> int:
    """lm-eval's --batch_size: a number, or "auto" (olmoe picks 8, `olmoe eval`'s default)."""
    if value is None or str(value).startswith("auto"):
        return 8
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size must be a number or auto, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    return size


def _args(requests) -> list[tuple]:
    # lm-eval passes Instances; the tests and Python callers may pass the bare argument tuples.
    return [getattr(r, "args", r) for r in requests]


def _bar(total: int, desc: str, disable: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", disable=disable)


def main(argv: Sequence[str]) -> int:
    """lm-eval's command line (`lm_eval ARGS`) with the "olmoe" model registered."""
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's parser reads sys.argv itself.
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
