"""The instruct quickstart (`make demo-chat`): instruction and preference data built offline from
the Python standard library's own functions, and a report of what SFT and DPO learned on
held-out ones.

    .venv/bin/python bench/demo_chat.py build     # data/stdlib-chat/{sft,dpo}-{train,valid}.jsonl
    .venv/bin/python bench/demo_chat.py report    # held-out loss and preferences, before and after
    .venv/bin/python bench/demo_chat.py request   # one held-out request, on one line, for
                                                  # `olmoe chat` to answer

Every public top-level function of the standard library that has a docstring (found with `ast`)
becomes one request: "Write a Python function `name(args)` that does this: <the docstring's
first paragraph>". The SFT answer is the function's source as written, without its docstring
(the request already holds it, and the quickstart model's context is 256 tokens). A preference
pair's chosen answer is that source; the rejected one is broken, in one of three ways picked by
a hash of the function's name: another function's body under this header (`swap`), the body cut
off half-way (`truncate`), or its lines shuffled (`shuffle`). About 5% of the functions, chosen
by a hash of their qualified name (module.function), are held out for validation, the same on
every machine; conversations that would not fit the context are skipped.

`report` reads configs/quickstart-sft.yaml and configs/quickstart-dpo.yaml for the models and the
held-out files, and computes on every held-out example: the mean loss per assistant token of the
base model and of the SFT model; how often a model gives the chosen answer a higher
log-probability than the rejected one; and DPO's reward accuracy and margin against its
reference (the SFT model), which are 0 before DPO by construction.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "data" / "stdlib-chat"
BASE_MODEL = ROOT / "runs" / "quickstart"
BASE_CONFIG = ROOT / "configs" / "quickstart.yaml"
SFT_CONFIG = ROOT / "configs" / "quickstart-sft.yaml"
DPO_CONFIG = ROOT / "configs" / "quickstart-dpo.yaml"
VALID_PERCENT = 5
VARIANTS = ("swap", "truncate", "shuffle")
# A preference pair costs two sequences in every DPO step and in DPO's reference pass over the
# whole training set, so the demo trains on a subset of the pairs to stay within its minutes.
MAX_TRAIN_PAIRS = 480
DONOR_TRIES = 20  # other functions tried for a `swap` whose conversation fits
CHAT_REPLY_TOKENS = 64  # `olmoe chat` keeps min(256, window // 4) tokens free for the reply


# ---------------------------------------------------------------------------- functions
@dataclass(frozen=True)
class Function:
    """A documented top-level function: its header (decorators and `def` lines) and its body
    after the docstring, as source lines with their line ends."""

    qualname: str  # module.name
    signature: str  # name(args) -> annotation
    summary: str  # the docstring's first paragraph, on one line
    header: tuple[str, ...]
    body: tuple[str, ...]

    @property
    def source(self) -> str:
        return _join(self.header, self.body)

    @property
    def request(self) -> str:
        return f"Write a Python function `{self.signature}` that does this: {self.summary}"


def _join(header, body) -> str:
    return "".join(header + tuple(body)).rstrip() + "\n"


def digest(text: str) -> int:
    """A stable hash (Python's own `hash` of a str changes from process to process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_held_out(qualname: str) -> bool:
    return digest(qualname) % 100 < VALID_PERCENT


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def extract_functions(text: str, module: str) -> list[Function]:
    """The public top-level functions of a module's source that have a docstring on lines of
    its own and code after it; none when the source does not parse."""
    # One line-end convention, so that the parser's line numbers index `lines`.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    functions = []
    for node in tree.body:
        function = _function(node, lines, module)
        if function is not None:
            functions.append(function)
    return functions


def _function(node: ast.AST, lines: list[str], module: str) -> Function | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
        return None
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or len(node.body) < 2:
        return None
    doc, after = node.body[0], node.body[1]
    # A docstring sharing a line with the header or the code cannot be cut out by lines.
    if doc.lineno <= node.lineno or after.lineno <= doc.end_lineno:
        return None
    summary = " ".join(docstring.split("\n\n")[0].split())
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    header = tuple(line + "\n" for line in lines[start - 1 : doc.lineno - 1])
    body = [line + "\n" for line in lines[doc.end_lineno : node.end_lineno]]
    while body and not body[0].strip():
        body.pop(0)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    signature = f"{node.name}({ast.unparse(node.args)}){returns}"
    return Function(f"{module}.{node.name}", signature, summary, header, tuple(body))


def stdlib_functions() -> list[Function]:
    """The functions of the files the `stdlib` data source reads, in their sorted order."""
    from olmoe.data.sources import stdlib_dir, stdlib_files

    root, functions = stdlib_dir(), []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        functions += extract_functions(text, module_name(path, root))
    return functions


# ---------------------------------------------------------------------------- broken answers
def truncated(function: Function) -> str | None:
    """The source cut off half-way through the body (at a line end)."""
    code = [i for i, line in enumerate(function.body) if line.strip()]
    if len(code) < 2:
        return None
    return _join(function.header, function.body[: code[len(code) // 2]])


def shuffled(function: Function) -> str | None:
    """The body's lines in a (seeded) shuffled order."""
    body = [line for line in function.body if line.strip()]
    if len(set(body)) < 2:
        return None
    order = list(body)
    random.Random(digest("shuffle:" + function.qualname)).shuffle(order)
    if order == body:  # the shuffle may give the order back: rotate instead
        order = body[1:] + body[:1]
    return _join(function.header, order)


def swapped(function: Function, donor: Function) -> str | None:
    """Another function's body under this function's header."""
    if donor.body == function.body or not donor.body:
        return None
    return _join(function.header, donor.body)


def rejected_answer(function: Function, donors: list[Function], fits) -> tuple[str, str] | None:
    """(variant, broken source) that differs from the real one and `fits(answer)`: the variant
    a hash of the name picks, else the next one that works. `donors` lend `swap` their bodies."""
    first = digest("variant:" + function.qualname) % len(VARIANTS)
    for variant in VARIANTS[first:] + VARIANTS[:first]:
        for answer in _candidates(variant, function, donors):
            if answer is not None and answer != function.source and fits(answer):
                return variant, answer
    return None


def _candidates(variant: str, function: Function, donors: list[Function]):
    if variant == "truncate":
        yield truncated(function)
    elif variant == "shuffle":
        yield shuffled(function)
    elif donors:
        start = digest("donor:" + function.qualname)
        for step in range(min(DONOR_TRIES, len(donors))):
            yield swapped(function, donors[(start + step) % len(donors)])


# ---------------------------------------------------------------------------- records
def conversation(request: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def build_records(functions: list[Function], count_tokens, max_tokens: int) -> dict[str, list]:
    """{"sft-train", "sft-valid", "dpo-train", "dpo-valid"} -> records. `count_tokens(messages)`
    is the rendered conversation's length in tokens; a function whose conversation (chosen or
    rejected) is longer than `max_tokens` is left out. Donors for `swap` come from the same
    split, so no held-out code reaches training through a rejected answer."""

    def fits(request, answer):
        return count_tokens(conversation(request, answer)) <= max_tokens

    splits = {"train": [], "valid": []}
    for function in functions:
        if fits(function.request, function.source):
            splits["valid" if is_held_out(function.qualname) else "train"].append(function)
    records = {}
    for split, kept in splits.items():
        records[f"sft-{split}"] = [
            {"name": f.qualname, "messages": conversation(f.request, f.source)} for f in kept
        ]
        records[f"dpo-{split}"] = pairs = []
        for function in kept:
            rejected = rejected_answer(function, kept, lambda a, f=function: fits(f.request, a))
            if rejected is not None:
                pairs.append({"name": function.qualname, "variant": rejected[0],
                              "prompt": function.request, "chosen": function.source,
                              "rejected": rejected[1]})  # fmt: skip
    return records


def subsample(records: list[dict], count: int) -> list[dict]:
    """At most `count` records, picked by a hash of their name (so the same on every machine)
    and kept in their order."""
    if len(records) <= count:
        return records
    keep = set(sorted(range(len(records)), key=lambda i: digest(records[i]["name"]))[:count])
    return [r for i, r in enumerate(records) if i in keep]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def context_length(config: Path = BASE_CONFIG) -> int:
    """The quickstart model's context: its training length, at most its position count."""
    import yaml

    data = yaml.safe_load(config.read_text())
    return min(data["data"]["seq_len"], data["model"]["config"]["max_position_embeddings"])


def load_tokenizer(model_dir: Path):
    """The tokenizer (chat template included) fine-tuning will use: the base model's."""
    from olmoe import Tokenizer

    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(model_dir)
    return Tokenizer.olmo()


def build(args) -> int:
    tokenizer = load_tokenizer(Path(args.base))
    max_tokens = context_length()
    functions = stdlib_functions()
    records = build_records(
        functions, lambda messages: len(tokenizer.apply_chat_template(messages)), max_tokens
    )
    records["dpo-train"] = subsample(records["dpo-train"], args.max_pairs)
    out = Path(args.out)
    for name, rows in records.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    variants = Counter(r["variant"] for r in records["dpo-train"] + records["dpo-valid"])
    print(
        f"{len(functions)} documented public functions in the standard library; "
        f"{len(records['sft-train']) + len(records['sft-valid'])} fit {max_tokens} tokens"
    )
    print(", ".join(f"{name} {len(rows)}" for name, rows in records.items()) + f" -> {out}")
    print("rejected answers: " + ", ".join(f"{v} {variants[v]}" for v in VARIANTS))
    return 0


# ---------------------------------------------------------------------------- report
def sequence_logps(model, examples, pad_id: int, batch_size: int = 8):
    """(summed log-probability of the assistant tokens, their count) of every sequence of a
    prepared chat directory, as float64 numpy arrays: olmoe.train.preference.token_logps, with
    the vocabulary's logits computed only where a token is scored (most of a report's time went
    to the others: prompts and padding)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from olmoe.train.adaptation import pad_batch

    sequences = [examples.sequence(i) for i in range(len(examples.offsets) - 1)]
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            input_ids, labels = pad_batch(sequences[start : start + batch_size], pad_id)
            hidden = model.forward_hidden(input_ids=input_ids, use_cache=False).last_hidden_state
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts t + 1
            rows, columns = (targets != -100).nonzero(as_tuple=True)
            logits = model.logits_from_hidden(hidden[rows, columns]).float()
            picked = torch.log_softmax(logits, -1).gather(-1, targets[rows, columns, None])
            total = torch.zeros(len(input_ids), dtype=torch.float64)
            sums.append(total.index_add_(0, rows, picked[:, 0].double()).numpy())
            counts.append(torch.bincount(rows, minlength=len(input_ids)).double().numpy())
    return np.concatenate(sums), np.concatenate(counts)


def prepared(path: str, tokenizer, max_length: int, scratch: Path):
    from olmoe.data.chat import ChatExamples, prepare_chat

    out = scratch / Path(path).stem
    prepare_chat(path, tokenizer, out, max_length, force=True)
    return ChatExamples(out)


def load_model(path: str):
    """A model in float32, as it was trained, on the engine `olmoe chat` and the trainer use."""
    import torch

    from olmoe import OlmoeForCausalLM, engine

    return engine.apply(OlmoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval())


def last_validation(run_dir: str) -> dict:
    """The trainer's last validation record in RUN/log.jsonl (empty when there is none)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((r for r in reversed(records) if "val_loss" in r), {})


def preference_stats(chosen, rejected, variants: list[str]) -> str:
    """How often chosen beats rejected, overall and per variant."""
    wins = chosen > rejected
    parts = [f"{wins.mean():.1%}"]
    for variant in VARIANTS:
        picked = [i for i, v in enumerate(variants) if v == variant]
        if picked:
            parts.append(f"{variant} {wins[picked].mean():.0%}")
    return parts[0] + " (" + ", ".join(parts[1:]) + ")"


def report_sft(sft, tokenizer, scratch: Path) -> None:
    examples = prepared(sft.data.valid_path, tokenizer, sft.data.seq_len, scratch)
    pad_id = tokenizer.pad_token_id or 0
    print(f"held-out SFT examples: {len(examples)} ({sft.data.valid_path})")
    for name, path in (("before: base", sft.model.init_from), ("after:  SFT ", sft.run_dir)):
        sums, counts = sequence_logps(load_model(path), examples, pad_id)
        print(f"  {name} {path:<22} loss per assistant token {-sums.sum() / counts.sum():.3f} nats")
    logged = last_validation(sft.run_dir).get("val_ce")
    if logged is not None:
        print(f"  (the trainer's last val_ce, on whole micro-batches only: {logged:.3f})")


def report_dpo(dpo, tokenizer, scratch: Path) -> None:
    examples = prepared(dpo.data.valid_path, tokenizer, dpo.data.seq_len, scratch)
    variants = [r["variant"] for r in read_jsonl(Path(dpo.data.valid_path))]
    if len(variants) != len(examples):  # prepare_chat dropped a pair: the variants misalign
        raise SystemExit(f"{dpo.data.valid_path}: {len(variants)} pairs, {len(examples)} prepared")
    pad_id, beta = tokenizer.pad_token_id or 0, dpo.preference.beta
    reference, _ = sequence_logps(load_model(dpo.model.init_from), examples, pad_id)
    policy, _ = sequence_logps(load_model(dpo.run_dir), examples, pad_id)
    # Sequences alternate chosen, rejected (olmoe.data.chat).
    ref_c, ref_r, pol_c, pol_r = reference[0::2], reference[1::2], policy[0::2], policy[1::2]
    margins = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    print(f"held-out preference pairs: {len(examples)} ({dpo.data.valid_path})")
    print("  log p(chosen) > log p(rejected):")
    print(f"    before: SFT {dpo.model.init_from:<20} {preference_stats(ref_c, ref_r, variants)}")
    print(f"    after:  DPO {dpo.run_dir:<20} {preference_stats(pol_c, pol_r, variants)}")
    # A pair counts when the chosen answer's reward (beta * log-ratio to the reference) beats the
    # rejected one's, as the trainer's rewards/accuracies counts it.
    accuracy = preference_stats(pol_c - ref_c, pol_r - ref_r, variants)
    print("  DPO reward accuracy against the SFT reference: before 0.0% (the rewards are 0)")
    print(f"                                                 after  {accuracy}")
    print(f"  DPO reward margin (beta {beta}): before 0.000, after {margins.mean():.3f}")
    logged = last_validation(dpo.run_dir)
    if "val_rewards/accuracies" in logged:
        print(
            f"  (the trainer's last val_rewards/accuracies {logged['val_rewards/accuracies']:.3f},"
            f" val_rewards/margins {logged['val_rewards/margins']:.3f})"
        )


def report(args) -> int:
    import torch

    from olmoe.train.config import load_config

    torch.manual_seed(0)
    sft, dpo = load_config(args.sft_config), load_config(args.dpo_config)
    tokenizer = load_tokenizer(Path(sft.model.init_from))
    with tempfile.TemporaryDirectory() as scratch:
        report_sft(sft, tokenizer, Path(scratch))
        report_dpo(dpo, tokenizer, Path(scratch))
    chosen = chat_request(Path(args.out), tokenizer)
    print(f"held-out request for `olmoe chat`: {chosen['messages'][0]['content']}")
    print("its answer in the standard library:\n" + chosen["messages"][1]["content"])
    return 0


# ---------------------------------------------------------------------------- the chat
def chat_request(out: Path, tokenizer, max_answer_tokens: int = 60) -> dict:
    """The held-out SFT record `olmoe chat` answers: the first, in hash order, whose request
    leaves the chat its reply room and whose answer is at most `max_answer_tokens` long."""
    window = context_length()
    records = sorted(read_jsonl(out / "sft-valid.jsonl"), key=lambda r: digest(r["name"]))
    for record in records:
        answer = record["messages"][1]["content"]
        prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
        short = len(tokenizer.encode(answer, add_special_tokens=False)) <= max_answer_tokens
        if len(prompt) + CHAT_REPLY_TOKENS <= window and short:
            return record
    raise SystemExit(f"no held-out request in {out} fits `olmoe chat`'s context")


def request(args) -> int:
    tokenizer = load_tokenizer(Path(args.base))
    print(chat_request(Path(args.out), tokenizer)["messages"][0]["content"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in (
        ("build", build, "write the instruction and preference sets"),
        ("report", report, "held-out loss and preferences of the base, SFT and DPO models"),
        ("request", request, "print one held-out request for `olmoe chat`"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--out", default=str(OUT_DIR), help="the data folder")
        base_help = "the model to fine-tune (its tokenizer renders the data)"
        command.add_argument("--base", default=str(BASE_MODEL), help=base_help)
        command.set_defaults(run=run)
    pairs_help = "most preference pairs to train on"
    commands.choices["build"].add_argument(
        "--max-pairs", type=int, default=MAX_TRAIN_PAIRS, help=pairs_help
    )
    commands.choices["report"].add_argument("--sft-config", default=str(SFT_CONFIG))
    commands.choices["report"].add_argument("--dpo-config", default=str(DPO_CONFIG))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
