"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README should show the Python API"
    monkeypatch.chdir(tmp_path)  # examples write their checkpoints into the working directory
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "tiny-olmoe" / "config.json").is_file()


# OLMoE's model card, as published (transformers imports, the hub repo id).
MODEL_CARD = """
from transformers import OlmoeForCausalLM, AutoTokenizer
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Load different ckpts via passing e.g. `revision=step10000-tokens41B`
model = OlmoeForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924").to(DEVICE)
tokenizer = AutoTokenizer.from_pretrained("allenai/OLMoE-1B-7B-0924")
inputs = tokenizer("Bitcoin is", return_tensors="pt")
inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
out = model.generate(**inputs, max_length=64)
print(tokenizer.decode(out[0]))
"""


def test_model_card_snippet_runs_with_olmoe_imports(tmp_path, capsys):
    from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer

    # A random model with OLMoE's vocabulary and context; its tokenizer is the OLMo default.
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=4096)
    OlmoeForCausalLM(config).save_pretrained(tmp_path / "olmoe-tiny")
    snippet = MODEL_CARD.replace("from transformers import", "from olmoe import").replace(
        '"allenai/OLMoE-1B-7B-0924"', repr(str(tmp_path / "olmoe-tiny"))
    )
    assert snippet.count("olmoe-tiny") == 2 and "transformers" not in snippet
    namespace: dict = {}
    exec(compile(snippet, "model card", "exec"), namespace)
    out, tokenizer = namespace["out"], namespace["tokenizer"]
    assert isinstance(tokenizer, Tokenizer)
    assert out.shape[1] == 64 or out[0, -1] == 50279  # unless it ended with end-of-text
    assert out[0, :3].tolist() == tokenizer.encode("Bitcoin is")
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0]) + "\n"
    assert printed.startswith("Bitcoin is")
