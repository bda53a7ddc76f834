"""Log-probabilities of chosen tokens at chosen positions, without a vocabulary's logits at
every position: the one place multiple-choice scoring and perplexity run the LM head."""

from __future__ import annotations

import bisect

import torch


def target_logprobs(
    model, hidden: torch.Tensor, slots: list[int], targets: torch.Tensor, greedy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 log p(targets[n] | hidden[slots[n]]): hidden (P, H) final hidden states,
    `slots` (N,) ascending row indices into it (a row may be scored for several targets, as the
    multiple-choice letters all follow one position), targets (N,) token ids.

    The LM head runs on a chunk of rows at a time: enough rows that reading its (vocab, hidden)
    weights costs no more than writing the (rows, vocab) logits, and at most 1,024, so that the
    float32 log-probabilities of a long text over a 50k vocabulary never take gigabytes.

    With `greedy`, also (N,) bools: whether each target is the most likely token there (what
    lm-evaluation-harness's `is_greedy` is made of), from the same chunks of logits.
    """
    chunk = min(1024, max(64, hidden.shape[-1]))
    out = torch.empty(len(slots), dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(len(slots), dtype=torch.bool, device=hidden.device)
    index = torch.tensor(slots, dtype=torch.long, device=hidden.device)
    start = 0
    for lo in range(0, hidden.shape[0], chunk):
        end = bisect.bisect_left(slots, lo + chunk, lo=start)  # the targets of rows [lo, lo+chunk)
        if end == start:
            continue
        logprobs = model.logits_from_hidden(hidden[lo : lo + chunk]).float().log_softmax(-1)
        rows = index[start:end] - lo
        out[start:end] = logprobs[rows, targets[start:end]]
        if greedy:
            argmax[start:end] = logprobs.argmax(-1)[rows] == targets[start:end]
        start = end
    return (out, argmax) if greedy else out
