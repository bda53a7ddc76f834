"""The training loop: OLMoE's objective, gradient accumulation, bf16 autocast, checkpoints, logs.

One optimizer step consumes `train.global_batch_tokens` tokens: every rank runs
`accumulation` micro-batches of `train.micro_batch_size` instances, each rank's gradients are
summed over its micro-batches (each loss divided by their number) and averaged over the ranks.
The auxiliary losses are computed per micro-batch (T is the local micro-batch, as in megablocks),
so one process with twice the micro-batches sees the very same sums as two processes.

The fine-tuning objectives (sft, dpo, kto; olmoe.train.adaptation) run the same loop on chat or
preference data: a step is `train.global_batch_examples` examples, and the objective computes
each micro-batch's loss.

RUN/log.jsonl gets one JSON line per step (loss, ce, lb, z, grad_norm, lr, tokens, tokens_per_s,
and per MoE layer: load_max = max/mean tokens per expert, router_entropy = mean entropy of the
router's softmax in nats, expert_counts, and with token dropping `dropped`, the share of routing
slots dropped; DPO and KTO add TRL's rewards/* and logps/*) and one
per evaluation (val_loss, or the objective's val_* values).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from olmoe import engine
from olmoe.errors import ConfigError
from olmoe.fileio import write_atomic
from olmoe.hardware import training_precision
from olmoe.train import distributed, state
from olmoe.train.budget import CALIBRATION_STEPS, steps_that_fit, typical_step_seconds
from olmoe.train.config import TrainConfig
from olmoe.train.lock import RunLock
from olmoe.train.losses import (
    DROPPED,
    ENTROPY,
    TOKENS,
    megablocks_lb_loss,
    router_z_loss,
    routing_statistics,
)
from olmoe.train.optim import build_optimizer
from olmoe.train.schedule import learning_rate

LOG_NAME = "log.jsonl"
RUN_CONFIG_NAME = "config.yaml"  # the training config a run was started with
UNIGRAM_MAX_TOKENS = 100_000_000  # the baseline's counts come from at most this many tokens


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    unigram_loss: float | None
    sample: str | None


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | Path | None = None, progress=None):
        """`progress`: None shows a bar on a terminal, False never."""
        self.config = config
        self.progress = progress
        self.env = distributed.setup(config.train.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.run_dir = Path(config.run_dir)
        self.lock = RunLock(self.run_dir).acquire() if self.env.is_main else None
        try:
            if self.env.is_main:  # the lock is ours: what killed writes left is garbage
                state.remove_leftovers(self.run_dir)
            self.resume_from = state.find_checkpoint(resume) if resume else None
            self._load_data()
            self._build_model_and_optimizer()
            self.log_path = self.run_dir / LOG_NAME
            if self.env.is_main:
                write_atomic(self.run_dir / RUN_CONFIG_NAME, config.to_yaml())
                self._trim_log()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> None:
        self.objective = self.valid_objective = None
        if self.config.objective == "pretrain":
            self._load_tokens()
        else:
            self._load_chat()

    def _load_chat(self) -> None:
        """Chat or preference examples for a fine-tuning objective (prepared into the run
        directory from a data file, or read from a prepared directory), and the objective."""
        from olmoe.train.adaptation import build_objective

        data, train, env = self.config.data, self.config.train, self.env
        self.metadata = None
        tokenizer = self._tokenizer()
        micro, world = train.micro_batch_size, env.world_size
        if train.global_batch_examples % (micro * world):
            raise ConfigError(
                f"train.global_batch_examples ({train.global_batch_examples}) must be a multiple "
                f"of micro_batch_size x ranks = {micro} x {world}"
            )
        self.accumulation = train.global_batch_examples // (micro * world)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        examples = self._chat_examples(data.path, "train", tokenizer)
        self.objective = build_objective(
            self.config, examples, env, pad_id, micro, micro * world * self.accumulation
        )
        self.loader = self.objective.order
        self.eval_batches = 0
        if data.valid_path:
            valid = self._chat_examples(data.valid_path, "valid", tokenizer)
            self.valid_objective = build_objective(self.config, valid, env, pad_id, micro,
                                                   micro * world, seed=0)  # fmt: skip
            self.eval_batches = len(valid) // (micro * world)
            if self.eval_batches == 0:
                raise ConfigError(
                    f"data.valid_path holds {len(valid)} examples, fewer than one batch of "
                    f"{micro * world}: give more, or lower train.micro_batch_size"
                )

    def _chat_examples(self, path: str, split: str, tokenizer):
        from olmoe.data.chat import METADATA_FILE, ChatExamples, prepare_chat

        source = Path(path)
        if (source / METADATA_FILE).is_file():
            return ChatExamples(source)
        prepared = self.run_dir / f"data-{split}"
        # A resumed run reads the data its checkpoints were trained on; a fresh run prepares the
        # file again, as it may have changed since a run in the same directory read it.
        if self.resume_from is not None and (prepared / METADATA_FILE).is_file():
            meta = ChatExamples(prepared).metadata
            if (meta["source"], meta["max_length"]) != (str(source), self.config.data.seq_len):
                raise ConfigError(
                    f"{prepared} was prepared from {meta['source']} cut to {meta['max_length']} "
                    f"tokens, not {source} cut to {self.config.data.seq_len}: use another "
                    "run_dir, or delete it to prepare the new data"
                )
        elif self.env.is_main:
            from tqdm.auto import tqdm

            show = self.progress is not False
            with tqdm(desc=f"Preparing {source.name}", unit=" records", disable=None if show
                      else True) as bar:  # fmt: skip
                summary = prepare_chat(
                    source, tokenizer, prepared, self.config.data.seq_len, True, bar.update
                )
            meta = summary.metadata
            if show:
                bar.write(
                    f"{split}: {meta['examples']:,} {meta['kind']} examples, "
                    f"{meta['trained_tokens']:,} trained tokens; {meta['truncated']:,} sequences "
                    f"cut to {meta['max_length']} tokens, {meta['dropped_no_assistant_tokens']:,} "
                    "examples dropped with no assistant token left",
                    file=sys.stderr,
                )
        distributed.barrier(self.env)
        return ChatExamples(prepared)

    def _load_tokens(self) -> None:
        from olmoe.data import InstanceLoader, load_tokens, read_metadata

        data, train = self.config.data, self.config.train
        path = Path(data.path)
        self.metadata = read_metadata(path) if (path / "metadata.json").is_file() else None
        self.train_tokens = load_tokens(path, "train")
        valid_path = data.valid_path or (str(path) if self.metadata else None)
        self.valid_tokens = load_tokens(valid_path, "valid") if valid_path else None
        micro, world = train.micro_batch_size, self.env.world_size
        per_micro = micro * data.seq_len * world
        if train.global_batch_tokens % per_micro:
            raise ConfigError(
                f"train.global_batch_tokens ({train.global_batch_tokens:,}) must be a multiple of "
                f"micro_batch_size x seq_len x ranks = {micro} x {data.seq_len} x {world} = "
                f"{per_micro:,}"
            )
        self.accumulation = train.global_batch_tokens // per_micro
        # Epochs end on optimizer-step boundaries, so any split of a step into ranks and
        # micro-batches sees the same instances across epochs too.
        self.loader = InstanceLoader(
            self.train_tokens,
            data.seq_len,
            micro,
            data.seed,
            self.env.rank,
            world,
            instances_per_step=micro * world * self.accumulation,
        )
        self.eval_batches = 0
        if self.valid_tokens is not None:
            # eval.batches counts micro-batches over all ranks, so any number of processes
            # evaluates the same instances
            instances = len(self.valid_tokens) // data.seq_len
            wanted = max(1, self.config.eval.batches // world)
            self.eval_batches = min(wanted, instances // (micro * world))
            if self.eval_batches == 0:
                raise ConfigError(
                    f"the validation split ({len(self.valid_tokens):,} tokens) holds fewer than "
                    f"one batch of {micro * world} instances of {data.seq_len} tokens: prepare "
                    "with a larger valid fraction, or lower data.seq_len"
                )

    def _build_model_and_optimizer(self) -> None:
        from olmoe.model import OlmoeForCausalLM

        cfg, env = self.config, self.env
        self.step, self.tokens_seen = 0, 0
        self.max_steps = cfg.train.max_steps  # lowered once to fit train.max_minutes
        self.budget_fitted = False
        self.train_seconds = 0.0  # in training steps, over the whole run (resumes included)
        # With a time budget: this process's step times, until the budget is fitted
        self.step_seconds: list[float] = []
        init_checkpoint = None
        if self.resume_from is not None:
            model = OlmoeForCausalLM.from_pretrained(
                self.resume_from, dtype=torch.float32, device=env.device
            )
        elif cfg.model.init_from is not None:
            source = cfg.model.init_from
            if cfg.model.init_optimizer:
                init_checkpoint = state.find_checkpoint(source)
                source = init_checkpoint
            model = OlmoeForCausalLM.from_pretrained(source, dtype=torch.float32, device=env.device)
        else:
            torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
            with torch.device(env.device):
                model = OlmoeForCausalLM(cfg.model.build())  # OLMoE's truncated-normal init
        if self.metadata and self.metadata.get("vocab_size", 0) > model.config.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {self.metadata['vocab_size']} ids but the model's "
                f"vocab_size is {model.config.vocab_size}: raise model.config.vocab_size"
            )
        model.train()
        self.model_config = model.config
        if self.config.objective in ("dpo", "kto"):
            self._reference_logps(model)
        engine.apply(model)  # before sharding: FSDP wraps the engine's module classes
        self.model = distributed.wrap(model, cfg.distributed.strategy, env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if self.resume_from is not None:
            saved = state.read_state(self.resume_from)
            state.load_optimizer(self.resume_from, self.model, self.optimizer)
            self.loader.load_state_dict(saved["data"])
            state.restore_rng(self.resume_from, env)
            self.step, self.tokens_seen = saved["step"], saved["tokens"]
            self.train_seconds = saved.get("train_seconds", 0.0)
            if saved.get("budget_max_steps") is not None:
                self.max_steps, self.budget_fitted = saved["budget_max_steps"], True
        elif init_checkpoint is not None:
            state.load_optimizer(init_checkpoint, self.model, self.optimizer)

    def _reference_logps(self, model) -> None:
        """DPO's and KTO's reference log-probabilities: computed once, before the first step,
        by the model training starts from (or `preference.reference`), and kept in the run
        directory for every later step and a resumed run."""
        from olmoe.model import OlmoeForCausalLM
        from olmoe.train.adaptation import REFERENCE_NAME

        pairs = [(self.objective, self.run_dir / REFERENCE_NAME)]
        if self.valid_objective is not None:
            pairs.append((self.valid_objective, self.run_dir / f"valid-{REFERENCE_NAME}"))
        if self.resume_from is not None and not all(path.is_file() for _, path in pairs):
            raise state.CheckpointError(
                f"{self.run_dir} lacks the reference log-probabilities ({REFERENCE_NAME}) its "
                "checkpoints were trained against: resume in the run directory that made them"
            )
        reference = model
        if self.config.preference.reference is not None and self.resume_from is None:
            reference = OlmoeForCausalLM.from_pretrained(
                self.config.preference.reference, dtype=torch.float32, device=self.env.device
            )
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        micro = self.config.train.micro_batch_size
        for objective, path in pairs:
            objective.compute_reference(
                reference, path, self._autocast, micro, reuse=self.resume_from is not None
            )

    def _trim_log(self) -> None:
        """A resumed run rewrites the log up to its checkpoint's step (a run killed after it
        logged later steps would otherwise list them twice)."""
        if not self.log_path.exists():
            return
        if self.step == 0:
            self.log_path.unlink()
            return
        kept = [
            line
            for line in self.log_path.read_text().splitlines()
            if _parses(line) and json.loads(line)["step"] <= self.step
        ]
        write_atomic(self.log_path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        if training_precision(self.config.train.precision, self.env.device) == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _losses(self, batch: torch.Tensor):
        cfg = self.config.loss
        with self._autocast():
            out = self.model(
                input_ids=batch,
                labels=batch,
                skip_logits=True,
                output_routing=True,
                use_cache=False,
            )
        ce = out.loss
        lb = megablocks_lb_loss(out.routing)
        z = router_z_loss(out.routing, per_slot=cfg.z_loss_per_slot)
        total = ce + cfg.lb_coef * lb + cfg.z_coef * z
        return total, ce, lb, z, routing_statistics(out.routing, self.model_config.num_experts)

    def _micro_batch(self):
        """The next micro-batch's total loss, its named values to sum, and routing statistics."""
        if self.objective is not None:
            indices = self.objective.next_batch()
            return self.objective.losses(self.model, indices, self._autocast)
        batch = self.loader.next_batch().to(self.env.device)
        total, ce, lb, z, stats = self._losses(batch)
        return total, {"loss": total, "ce": ce, "lb": lb, "z": z}, stats

    def train_step(self) -> dict:
        cfg, env = self.config, self.env
        self.step += 1
        lr = learning_rate(self.step, cfg.optim.lr, cfg.schedule, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        sums = routing = names = None  # the micro-batches' values, summed
        for micro in range(self.accumulation):
            with distributed.gradient_sync(self.model, micro == self.accumulation - 1):
                total, values, stats = self._micro_batch()
                (total / self.accumulation).backward()
            names, sums = list(values), _add_values(sums, values)
            routing = stats.cpu() if routing is None else routing + stats.cpu()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        if cfg.train.max_minutes is not None and not self.budget_fitted:
            self.step_seconds.append(seconds)

        reduced = torch.cat([sums, routing.reshape(-1)]).to(env.device)
        reduced = distributed.all_reduce_sum(reduced, env).cpu()
        micro_batches = self.accumulation * env.world_size
        summed = dict(zip(names, reduced[: len(names)].tolist()))
        if self.objective is None:
            step_tokens = cfg.train.global_batch_tokens
            values = {k: v / micro_batches for k, v in summed.items()}
        else:
            step_tokens = int(summed["tokens"])
            values = self.objective.summarize(summed, micro_batches)
        self.tokens_seen += step_tokens
        routing = reduced[len(names) :].reshape(routing.shape)
        counts = routing[:, :ENTROPY]
        mean_load = counts.sum(dim=1) / counts.shape[1]
        record = {
            "step": self.step,
            **values,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens": self.tokens_seen,
            "tokens_per_s": step_tokens / seconds,
            "load_max": (counts.max(dim=1).values / mean_load).tolist() if len(counts) else [],
            "router_entropy": (routing[:, ENTROPY] / routing[:, TOKENS]).tolist(),
            "expert_counts": counts.long().tolist(),
        }
        if not self.model_config.moe_dropless:  # share of the routing slots dropped, per layer
            record["dropped"] = (routing[:, DROPPED] / counts.sum(dim=1)).tolist()
        return record

    def validation(self) -> dict[str, float]:
        """The validation values to log: val_loss (and unigram_loss when pretraining, or the
        objective's values, prefixed val_, when fine-tuning)."""
        if self.objective is None:
            val, unigram = self.evaluate()
            return {"val_loss": val, "unigram_loss": unigram}
        return self._evaluate_objective()

    @torch.no_grad()
    def _evaluate_objective(self) -> dict[str, float]:
        """The objective on the held-out examples, each once, in a fixed order."""
        objective, env = self.valid_objective, self.env
        objective.order.load_state_dict({"seed": 0, "epoch": 0, "position": 0})
        self.model.eval()
        sums = names = None
        for _ in range(self.eval_batches):
            _, values, _ = objective.losses(self.model, objective.next_batch(), self._autocast)
            names, sums = list(values), _add_values(sums, values)
        self.model.train()
        reduced = distributed.all_reduce_sum(sums.to(env.device), env).cpu()
        values = objective.summarize(
            dict(zip(names, reduced.tolist())), self.eval_batches * env.world_size
        )
        record = {f"val_{name}": value for name, value in values.items()}
        record["val_loss"] = values["ce"] if "ce" in values else values["loss"]
        return record

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """Mean next-token loss on the first `eval.batches` micro-batches of the validation
        split (the same instances every time), and a unigram model's loss on the same targets."""
        from olmoe.data import InstanceLoader

        env, data, micro = self.env, self.config.data, self.config.train.micro_batch_size
        loader = InstanceLoader(self.valid_tokens, data.seq_len, micro, 0, env.rank, env.world_size)
        unigram = self._unigram_logprobs()
        sums = torch.zeros(3, dtype=torch.float64)  # model nll, unigram nll, targets
        for _ in range(self.eval_batches):
            batch = loader.next_batch().to(env.device)
            with self._autocast():
                loss = self.model(
                    input_ids=batch, labels=batch, skip_logits=True, use_cache=False
                ).loss
            targets = batch[:, 1:].numel()
            sums[0] += loss.double().cpu() * targets
            if unigram is not None:
                sums[1] -= unigram[batch[:, 1:].cpu()].sum()
            sums[2] += targets
        sums = distributed.all_reduce_sum(sums.to(env.device), env).cpu()
        val = float(sums[0] / sums[2])
        return val, (float(sums[1] / sums[2]) if unigram is not None else None)

    def _unigram_logprobs(self) -> torch.Tensor | None:
        """log p(token) of an add-one-smoothed unigram model of the training tokens."""
        if not self.config.eval.unigram_baseline:
            return None
        if not hasattr(self, "_unigram"):
            counts = np.bincount(
                np.asarray(self.train_tokens[:UNIGRAM_MAX_TOKENS]),
                minlength=self.model_config.vocab_size,
            ).astype(np.float64)
            counts += 1.0
            self._unigram = torch.from_numpy(np.log(counts / counts.sum()))
        return self._unigram

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, env = self.config, self.env
        show = self.progress is not False and env.is_main
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="Training",
            unit="step",
            disable=None if show else True,
            dynamic_ncols=True,
        )
        tokenizer = self._tokenizer()
        val = unigram = None
        with bar:
            while self.step < self.max_steps:
                record = self.train_step()
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                fitted = self._fit_to_budget()
                if fitted is not None:
                    self._log(fitted)
                    bar.total = self.max_steps
                    bar.write(
                        f"step {self.step}: at {fitted['step_seconds']:.2f} s a step, "
                        f"{cfg.train.max_minutes:g} minutes of training end at step {self.max_steps}"
                    )
                last = self.step == self.max_steps
                if self.eval_batches and (
                    last or (cfg.eval.every and self.step % cfg.eval.every == 0)
                ):
                    values = self.validation()
                    val, unigram = values["val_loss"], values.get("unigram_loss")
                    self._log({"step": self.step, **values})
                    bar.write(f"step {self.step}: validation loss {val:.4f}")
                # The revision before the checkpoint: a run killed between the two resumes from
                # the step before and writes both again; the other way round it would resume
                # from this step's checkpoint and never write this step's revision.
                revisions = cfg.checkpoint.revisions_every
                if revisions and self.step % revisions == 0:
                    state.save_revision(
                        self.model, self.run_dir, self.step, self.tokens_seen, env, tokenizer
                    )
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save(tokenizer)
        if self.eval_batches and val is None:  # resumed at the end: still report the model
            values = self.validation()
            val, unigram = values["val_loss"], values.get("unigram_loss")
        # The final model is the run's revision `main` (olmoe.revisions).
        exported = state.export_model(self.model, self.run_dir, env, tokenizer)
        sample = None
        # An expert-choice model cannot generate (each expert reads the whole sequence).
        generates = self.model_config.moe_routing != "expert_choice"
        if exported is not None and tokenizer is not None and cfg.eval.sample_prompt and generates:
            sample = _sample(exported, tokenizer, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
        return TrainResult(self.run_dir, self.step, self.tokens_seen, val, unigram, sample)

    def _fit_to_budget(self) -> dict | None:
        """Once enough steps are timed, lower max_steps to what fits in train.max_minutes
        (every rank the same: the ranks' mean step time); returns the decision to log."""
        minutes = self.config.train.max_minutes
        if minutes is None or self.budget_fitted or len(self.step_seconds) < CALIBRATION_STEPS:
            return None
        timing = torch.tensor(
            [typical_step_seconds(self.step_seconds)], dtype=torch.float64, device=self.env.device
        )
        per_step = float(distributed.all_reduce_sum(timing, self.env)) / self.env.world_size
        steps = steps_that_fit(minutes * 60, self.train_seconds, per_step)
        self.max_steps = max(self.step, min(self.max_steps, self.step + steps))
        self.budget_fitted = True
        return {"step": self.step, "max_steps": self.max_steps, "step_seconds": per_step}

    def save(self, tokenizer=None) -> Path:
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "data": self.loader.state_dict(),
            "train_seconds": self.train_seconds,
            "budget_max_steps": self.max_steps if self.budget_fitted else None,
        }
        return state.save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizer,
            record,
            self.env,
            tokenizer,
            keep=self.config.checkpoint.keep,
        )

    def _log(self, record: dict) -> None:
        if self.env.is_main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _tokenizer(self):
        """The tokenizer the data was prepared with (saved beside the model, used for the
        sample), or None for token files without metadata. Fine-tuning: the tokenizer of the
        model it starts from (its chat template included), else the OLMo one."""
        from olmoe.data.prepare import OLMO_TOKENIZER_NAME
        from olmoe.tokenizer import Tokenizer

        if self.config.objective != "pretrain":
            return Tokenizer.from_pretrained(self.config.model.init_from)
        if self.metadata is None:
            return None
        name = self.metadata.get("tokenizer")
        return Tokenizer.from_pretrained(None if name == OLMO_TOKENIZER_NAME else name)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        distributed.shutdown(self.env)


def _parses(line: str) -> bool:
    """Whether a log line is whole: a write cut short (a full disk) leaves the last one torn."""
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _add_values(sums: torch.Tensor | None, values: dict) -> torch.Tensor:
    """`sums` plus a micro-batch's named values, as one float64 vector in their order."""
    vector = torch.stack([torch.as_tensor(v).detach().double().cpu() for v in values.values()])
    return vector if sums is None else sums + vector


def _sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def train(config: TrainConfig, resume: str | Path | None = None, progress=None) -> TrainResult:
    """Train as `config` says (continuing the run checkpointed in `resume`, if given)."""
    trainer = Trainer(config, resume=resume, progress=progress)
    try:
        return trainer.train()
    finally:
        trainer.close()
