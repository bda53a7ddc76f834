"""Streaming text: pieces never split a character, join to the full decode, honour stop strings."""

from __future__ import annotations

import pytest
import torch

from olmoe import IncrementalDecoder, OlmoeConfig, OlmoeForCausalLM, TextStream, TextStreamer
from olmoe.generation import SamplingParams
from olmoe.tokenizer import Tokenizer
from tests.conftest import randomize

TEXT = "Llamas 🦙 and emoji 😀 → 中文 and café. Done!"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.olmo()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=128)
    return randomize(OlmoeForCausalLM(config), seed=11).eval()


def pieces_of(tokenizer, ids, **kwargs):
    decoder = IncrementalDecoder(tokenizer, **kwargs)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p], decoder


def test_a_character_split_across_tokens_is_emitted_whole(tokenizer):
    llama = tokenizer.encode("🦙")
    assert len(llama) == 3 and tokenizer.decode(llama[:1]) == "\ufffd"  # really split
    ids = tokenizer.encode(TEXT)
    pieces, _ = pieces_of(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # streamed, not one block at the end


def test_pieces_skip_special_tokens_or_keep_them(tokenizer):
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    skipped, _ = pieces_of(tokenizer, ids)
    kept, _ = pieces_of(tokenizer, ids, skip_special_tokens=False)
    assert "".join(skipped) == "Hello world"
    assert "".join(kept) == "Hello<|endoftext|> world"


def test_stop_string_cuts_the_text_and_partial_matches_are_held_back(tokenizer):
    ids = tokenizer.encode("The answer is 42.\nQuestion: next one")
    pieces, decoder = pieces_of(tokenizer, ids, stop_strings=["\nQuestion:"])
    assert "".join(pieces) == "The answer is 42."
    assert decoder.stopped
    # a held-back prefix of a stop string that never completes comes out at the end
    ids = tokenizer.encode("Say \nQuest")
    pieces, decoder = pieces_of(tokenizer, ids, stop_strings=["\nQuestion:"])
    assert "".join(pieces) == "Say \nQuest" and not decoder.stopped


def test_text_stream_joins_to_the_decoded_generation(model, tokenizer):
    prompt = tokenizer.encode("Bitcoin is")
    stream = TextStream(model, tokenizer, prompt, max_new_tokens=40)
    text = "".join(stream)
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=40)[0, len(prompt) :]
    assert text == tokenizer.decode(generated, skip_special_tokens=True)
    assert stream.new_tokens == len(generated)
    assert stream.finish_reason == ("stop" if generated[-1] == 50279 else "length")


def test_text_stream_stops_at_a_stop_string(model, tokenizer):
    prompt = tokenizer.encode("Bitcoin is")
    full = "".join(TextStream(model, tokenizer, prompt, max_new_tokens=30))
    stop = full[10:14]  # a piece of what the model is going to say
    assert stop.strip()
    stream = TextStream(model, tokenizer, prompt, max_new_tokens=30, stop_strings=[stop])
    text = "".join(stream)
    assert text == full[: full.index(stop)]
    assert stream.finish_reason == "stop"
    assert stream.new_tokens < 30


def test_text_stream_sampling_with_a_seed_is_reproducible(model, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    params = SamplingParams(do_sample=True, temperature=1.2, top_p=0.9)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return "".join(TextStream(model, tokenizer, prompt, 20, params, generator=gen))

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_text_streamer_follows_transformers_protocol(model, tokenizer):
    prompt = tokenizer.encode("Bitcoin is")
    received = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, callback=received.append)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=15, streamer=streamer)
    assert "".join(received) == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    with_prompt = []
    model.generate(
        torch.tensor([prompt]),
        max_new_tokens=15,
        streamer=TextStreamer(tokenizer, callback=with_prompt.append),
    )
    assert "".join(with_prompt) == tokenizer.decode(out[0], skip_special_tokens=True)


def test_generate_stop_strings_end_each_sequence(model, tokenizer):
    prompts = ["Bitcoin is", "The capital of France is"]
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    free = model.generate(**batch, max_new_tokens=20)
    width = batch["input_ids"].shape[1]
    first_text = tokenizer.decode(free[0, width:])
    stop = first_text[5:8]
    out = model.generate(**batch, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    first = out[0, width:].tolist()
    pad = model.config.pad_token_id
    end = len(first) - next((i for i, t in enumerate(reversed(first)) if t != pad), 0)
    assert stop in tokenizer.decode(first[:end])
    assert stop not in tokenizer.decode(first[: end - 1])  # stopped at the first occurrence
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**batch, max_new_tokens=5, stop_strings=["x"])
