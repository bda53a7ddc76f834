"""Fine-tuning objectives for the trainer: supervised fine-tuning (sft), DPO and KTO, as OLMoE's
SFT and Instruct models were trained.

Each objective serves the trainer one micro-batch at a time from prepared chat data
(olmoe.data.chat), right-padded to its longest sequence (padding comes after a sequence's
tokens, so causal attention never lets it change them, and its labels are -100), and returns the
micro-batch's loss and the sums the trainer logs. DPO's and KTO's reference log-probabilities
are computed once, before the first step, with the starting model (or `preference.reference`),
and stored beside the run, so a resumed run reads them instead of recomputing.

The micro-batch metrics are sums; `summarize` turns the sums over a step's micro-batches and
ranks into the logged means (TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, and KTO's kl).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from olmoe.data.chat import ChatExamples
from olmoe.data.loader import SeededOrder
from olmoe.errors import ConfigError, DataError
from olmoe.fileio import atomic_path
from olmoe.train.losses import megablocks_lb_loss, router_z_loss, routing_statistics
from olmoe.train.preference import (
    AVERAGED_LOSS_TYPES,
    dpo_loss,
    kto_loss,
    sequence_logps,
    sft_loss,
    token_logps,
)

REFERENCE_NAME = "reference_logps.npy"


def pad_batch(sequences: list[tuple[np.ndarray, np.ndarray]], pad_id: int):
    """(input_ids, labels) LongTensors (B, L), right-padded to the longest sequence."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), length), -100, dtype=np.int64)
    for row, (ids, target) in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def pack_batch(sequences: list[tuple[np.ndarray, np.ndarray]], row_length: int, pad_id: int):
    """The sequences packed greedily into rows of at most `row_length` tokens: (input_ids,
    labels, position_ids) LongTensors (R, L), a boolean attention mask (R, 1, L, L) that lets
    each token see only the earlier tokens of its own sequence, and each row's count of real
    tokens (R,). Positions restart at 0 with each sequence, so every sequence is computed as it
    would be alone."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for sequence in sequences:
        if rows and sum(len(ids) for ids, _ in rows[-1]) + len(sequence[0]) <= row_length:
            rows[-1].append(sequence)
        else:
            rows.append([sequence])
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids, labels = pad_batch([_concatenated(row) for row in rows], pad_id)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0
        for ids, _ in row:
            end = start + len(ids)
            positions[r, start:end] = torch.arange(len(ids))
            mask[r, 0, start:end, start:end] = torch.ones(len(ids), len(ids)).tril().bool()
            start = end
        mask[r, 0, start:, start:] = torch.eye(length - start, dtype=torch.bool)  # padding
    lengths = torch.tensor([sum(len(ids) for ids, _ in row) for row in rows])
    return input_ids, labels, positions, mask, lengths


def _concatenated(row):
    return np.concatenate([ids for ids, _ in row]), np.concatenate([lab for _, lab in row])


def split_prompt(ids: np.ndarray, labels: np.ndarray) -> int:
    """Where a prompt/completion sequence's completion starts: its first labelled token."""
    trained = np.flatnonzero(labels != -100)
    return int(trained[0]) if len(trained) else len(ids)


class Adaptation:
    """What sft, dpo and kto share: the examples, their order, padding, the auxiliary losses."""

    name = kind = ""  # the objective, and the kind of prepared data it trains on

    def __init__(
        self, config, examples: ChatExamples, env, pad_id: int, micro: int, steps_of: int,
        seed: int | None = None,
    ):  # fmt: skip
        if examples.kind != self.kind:
            raise DataError(
                f"objective {config.objective} trains on {self.kind} data, but the data given "
                f"holds {examples.kind} data"
            )
        self.config, self.examples, self.env, self.pad_id = config, examples, env, pad_id
        self.order = SeededOrder(
            len(examples), micro, config.data.seed if seed is None else seed, env.rank,
            env.world_size, steps_of, what=f"{len(examples):,} examples",
        )  # fmt: skip
        self.reference: np.ndarray | None = None  # (sequences, 2): summed log-prob, token count

    def next_batch(self) -> list[int]:
        return [int(i) for i in self.order.next_indices()]

    def with_aux_losses(self, loss, routing, sequences) -> tuple[torch.Tensor, dict]:
        """The objective's `loss` plus the weighted auxiliary losses, and the values every
        objective logs: loss, lb, z and the micro-batch's tokens."""
        aux, lb, z = self.aux_losses(routing)
        total = loss + aux
        tokens = torch.tensor(float(sum(len(ids) for ids, _ in sequences)))
        return total, {"loss": total, "lb": lb, "z": z, "tokens": tokens}

    def aux_losses(self, routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = self.config.loss
        lb = megablocks_lb_loss(routing)
        z = router_z_loss(routing, per_slot=loss.z_loss_per_slot)
        return loss.lb_coef * lb + loss.z_coef * z, lb, z

    def forward(self, model, sequences, autocast, loss: bool = False):
        """The model's output on the padded batch, with `routing` cut to the real tokens (the
        padding's routing would count in the auxiliary losses and the routing statistics), and
        the labels. `loss`: the labelled tokens' mean loss in place of the logits
        (olmoe.head_loss)."""
        input_ids, labels = pad_batch(sequences, self.pad_id)
        device = self.env.device
        labels = labels.to(device)
        with autocast():
            out = model(
                input_ids=input_ids.to(device), output_routing=True, use_cache=False,
                labels=labels if loss else None, skip_logits=loss,
            )  # fmt: skip
        lengths = torch.tensor([len(ids) for ids, _ in sequences], device=device)
        real = (torch.arange(input_ids.shape[1], device=device) < lengths[:, None]).reshape(-1)
        out.routing = tuple(layer.select(real) for layer in out.routing)
        return out, labels

    # ------------------------------------------------------------------ reference
    def reference_sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every sequence whose reference log-probability a step needs, in a fixed order."""
        return [self.examples.sequence(i) for i in range(len(self.examples.offsets) - 1)]

    @torch.no_grad()
    def compute_reference(
        self, model, path: Path, autocast, batch_size: int, reuse: bool = False
    ) -> None:
        """The reference model's (summed log-prob, token count) of every sequence, computed
        once and kept at `path`; `reuse` (a resumed run) reads them back from there instead."""
        sequences = self.reference_sequences()
        if reuse and path.is_file():
            reference = np.load(path)
            if reference.shape == (len(sequences), 2):
                self.reference = reference
                return
        model.eval()
        rows = []
        for start in range(0, len(sequences), batch_size):
            input_ids, labels = pad_batch(sequences[start : start + batch_size], self.pad_id)
            labels = labels.to(self.env.device)
            with autocast():
                out = model(
                    input_ids=input_ids.to(self.env.device), labels=labels, skip_logits=True,
                    loss_reduction="none", use_cache=False,
                )  # fmt: skip
            sums, counts = sequence_logps(out.loss, labels)
            rows.append(torch.stack([sums.double(), counts.double()], -1).cpu().numpy())
        model.train()
        self.reference = np.concatenate(rows)
        if self.env.is_main:
            with atomic_path(path) as temporary, open(temporary, "wb") as handle:
                np.save(handle, self.reference)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        from olmoe.train import distributed

        total = distributed.all_reduce_sum(value.detach().clone(), self.env)
        return total / self.env.world_size

    def reference_logps(self, sequence_ids: list[int], averaged: bool) -> torch.Tensor:
        rows = torch.from_numpy(self.reference[sequence_ids])
        logps = rows[:, 0] / rows[:, 1].clamp_min(1) if averaged else rows[:, 0]
        return logps.to(self.env.device, torch.float32)

    def summarize(self, sums: dict[str, float], micro_batches: int) -> dict[str, float]:
        """The logged means of a step's (or an evaluation's) summed values."""
        return {k: v / micro_batches for k, v in sums.items() if k != "tokens"}


class SupervisedFineTuning(Adaptation):
    """Next-token loss on the assistant tokens; logs `ce`, their mean loss per token."""

    name = kind = "sft"

    def losses(self, model, indices, autocast):
        sequences = [s for i in indices for s in self.examples[i]]
        forward = self.forward_packed if self.config.data.packing else self.forward
        out, labels = forward(model, sequences, autocast, loss=True)
        trained = (labels[:, 1:] != -100).sum()
        loss = sft_loss(out.loss, trained, self.config.preference.sft_reduction)
        total, values = self.with_aux_losses(loss, out.routing, sequences)
        nll = loss.detach() * (trained if self.config.preference.sft_reduction == "mean" else 1)
        values |= {"nll": nll, "trained": trained.float()}
        return total, values, routing_statistics(out.routing, model.config.num_experts)

    def forward_packed(self, model, sequences, autocast, loss: bool = False):
        """As `forward`, on the sequences packed into rows (`pack_batch`)."""
        input_ids, labels, positions, mask, lengths = pack_batch(
            sequences, self.config.data.seq_len, self.pad_id
        )
        device = self.env.device
        labels = labels.to(device)
        with autocast():
            out = model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), output_routing=True, use_cache=False,
                labels=labels if loss else None, skip_logits=loss,
            )  # fmt: skip
        real = (torch.arange(input_ids.shape[1]) < lengths[:, None]).reshape(-1).to(device)
        out.routing = tuple(layer.select(real) for layer in out.routing)
        return out, labels

    def summarize(self, sums, micro_batches):
        record = {k: sums[k] / micro_batches for k in ("loss", "lb", "z")}
        record["ce"] = sums["nll"] / max(sums["trained"], 1)
        return record


class DirectPreference(Adaptation):
    name = kind = "dpo"

    def losses(self, model, indices, autocast):
        pref = self.config.preference
        chosen = [self.examples[i][0] for i in indices]
        rejected = [self.examples[i][1] for i in indices]
        # One forward for both, with logits: without them (loss_reduction="none") each chunk's
        # logits are computed again in the backward pass, slower here (docs/training.md#speed).
        out, labels = self.forward(model, chosen + rejected, autocast)
        sums, counts = token_logps(out.logits, labels)
        averaged = pref.loss_type in AVERAGED_LOSS_TYPES
        policy = sums / counts.clamp_min(1) if averaged else sums
        n = len(indices)
        ids = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        reference = self.reference_logps(ids, averaged)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], pref.beta, pref.loss_type,
            pref.label_smoothing,
        )  # fmt: skip
        total, values = self.with_aux_losses(losses.mean(), out.routing, chosen + rejected)
        values |= {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": sums[:n].detach().mean(),
            "logps/rejected": sums[n:].detach().mean(),
        }
        return total, values, routing_statistics(out.routing, model.config.num_experts)


class KahnemanTversky(Adaptation):
    """KTO: each example's completion, and for the KL estimate the same prompt with the
    completion of the example half the data set away (in the data's order, wrapping around):
    far enough that the two answers of one prompt, often on adjacent rows, never pair up."""

    name = kind = "kto"

    def mismatched(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = self.examples.sequence(index)
        other = (index + max(1, len(self.examples) // 2)) % len(self.examples)
        other_ids, other_labels = self.examples.sequence(other)
        cut, other_cut = split_prompt(ids, labels), split_prompt(other_ids, other_labels)
        room = max(0, self.config.data.seq_len - cut)
        return (
            np.concatenate([ids[:cut], other_ids[other_cut:][:room]]),
            np.concatenate([labels[:cut], other_labels[other_cut:][:room]]),
        )

    def reference_sequences(self):
        count = len(self.examples)
        return [self.examples.sequence(i) for i in range(count)] + [
            self.mismatched(i) for i in range(count)
        ]

    def losses(self, model, indices, autocast):
        pref = self.config.preference
        matched = [self.examples.sequence(i) for i in indices]
        mismatched = [self.mismatched(i) for i in indices]
        out, labels = self.forward(model, matched + mismatched, autocast)
        sums, _ = token_logps(out.logits, labels)
        n, count = len(indices), len(self.examples)
        reference = self.reference_logps(list(indices) + [count + i for i in indices], False)
        desirable = torch.from_numpy(self.examples.desirable[indices]).to(sums.device)
        losses, rewards, kl = kto_loss(
            sums[:n], reference[:n], desirable, sums[n:], reference[n:], pref.beta,
            pref.desirable_weight, pref.undesirable_weight, self.mean_over_ranks,
        )  # fmt: skip
        total, values = self.with_aux_losses(losses.mean(), out.routing, matched + mismatched)
        values |= {
            "kl": kl,
            "rewards/chosen_sum": rewards[desirable].sum(),
            "rewards/chosen_count": desirable.sum().float(),
            "rewards/rejected_sum": rewards[~desirable].sum(),
            "rewards/rejected_count": (~desirable).sum().float(),
        }
        return total, values, routing_statistics(out.routing, model.config.num_experts)

    def summarize(self, sums, micro_batches):
        record = {
            k: v / micro_batches for k, v in sums.items() if "rewards/" not in k and k != "tokens"
        }
        for side in ("chosen", "rejected"):
            count = sums[f"rewards/{side}_count"]
            if count:
                record[f"rewards/{side}"] = sums[f"rewards/{side}_sum"] / count
        return record


OBJECTIVES = {cls.name: cls for cls in (SupervisedFineTuning, DirectPreference, KahnemanTversky)}


def build_objective(config, examples, env, pad_id, micro, steps_of, seed=None) -> Adaptation:
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"no adaptation objective {config.objective!r}")
    return OBJECTIVES[config.objective](config, examples, env, pad_id, micro, steps_of, seed)
