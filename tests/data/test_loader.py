"""Token files (ours and OLMo's raw memmaps) and InstanceLoader's order, sharding and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olmoe.data import InstanceLoader, as_instances, load_tokens, token_dtype
from olmoe.data.tokens import NpyWriter
from olmoe.errors import CheckpointError, ConfigError, DataError

SEQ = 4


def stream(num_instances: int, seq_len: int = SEQ, tail: int = 3) -> np.ndarray:
    """Tokens whose value tells their position, so an instance's first token names it."""
    return np.arange(num_instances * seq_len + tail, dtype=np.uint16)


def instance_ids(batch: torch.Tensor, seq_len: int = SEQ) -> list[int]:
    assert batch.dtype == torch.int64 and batch.shape[1] == seq_len
    for row in batch:  # each row is one contiguous instance
        assert torch.equal(row, torch.arange(row[0], row[0] + seq_len))
        assert row[0] % seq_len == 0
    return (batch[:, 0] // seq_len).tolist()


# ---------------------------------------------------------------------------- token files
def test_olmo_raw_memmap_read_as_is(tmp_path):
    ids = np.array([5, 50279, 65535, 0, 17], dtype="<u2")
    raw = tmp_path / "part-0-00000.npy"  # OLMo's name, no .npy header
    ids.tofile(raw)
    tokens = load_tokens(raw)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == ids.tolist()
    assert not tokens.flags.writeable
    wide = np.array([70_000, 1, 2], dtype="<u4")
    wide.tofile(tmp_path / "wide.bin")
    assert load_tokens(tmp_path / "wide.bin", dtype="uint32").tolist() == [70_000, 1, 2]
    with pytest.raises(DataError, match="whole number of 4-byte tokens"):
        load_tokens(raw, dtype="uint32")  # 10 bytes
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(load_tokens(tmp_path / "empty.bin")) == 0


def test_npy_files_and_directories(tmp_path):
    for count in (0, 3, 1000):
        writer = NpyWriter(tmp_path / "t.npy", np.uint32)
        for start in range(0, count, 7):
            writer.write(np.arange(start, min(start + 7, count)))
        writer.close()
        loaded = np.load(tmp_path / "t.npy")  # numpy's own reader accepts our header
        assert loaded.dtype == np.uint32 and loaded.tolist() == list(range(count))
        assert load_tokens(tmp_path / "t.npy").tolist() == list(range(count))
    with pytest.raises(DataError, match="holds uint32 tokens, not uint16"):
        load_tokens(tmp_path / "t.npy", dtype="uint16")
    np.save(tmp_path / "floats.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError, match="not a flat array of token ids"):
        load_tokens(tmp_path / "floats.npy")
    directory = tmp_path / "prepared"
    directory.mkdir()
    np.save(directory / "train.npy", np.arange(5, dtype=np.uint16))
    assert load_tokens(directory).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="no 'valid' split.*it has train"):
        load_tokens(directory, split="valid")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(tmp_path / "missing.npy")


def test_token_dtype():
    assert token_dtype(50_304) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


# ---------------------------------------------------------------------------- loader
def test_epochs_are_seeded_permutations():
    tokens = stream(24)
    loader = InstanceLoader(tokens, SEQ, batch_size=4, seed=7)
    assert loader.num_instances == 24 and loader.batches_per_epoch == 6
    epochs = []
    for _ in range(3):
        seen = [i for _ in range(6) for i in instance_ids(loader.next_batch())]
        assert sorted(seen) == list(range(24))  # every instance once per epoch
        epochs.append(seen)
    assert loader.epoch == 2
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    assert epochs[1] == loader.epoch_order(1).tolist()
    again = InstanceLoader(torch.from_numpy(tokens.astype(np.int64)), SEQ, batch_size=4, seed=7)
    assert [i for _ in range(6) for i in instance_ids(again.next_batch())] == epochs[0]
    other = InstanceLoader(tokens, SEQ, batch_size=4, seed=8)
    assert [i for _ in range(6) for i in instance_ids(other.next_batch())] != epochs[0]


def test_remainder_of_an_epoch_is_skipped():
    loader = InstanceLoader(stream(10), SEQ, batch_size=3, seed=0)
    order = loader.epoch_order(0).tolist()
    first = [i for _ in range(3) for i in instance_ids(loader.next_batch())]
    assert first == order[:9]  # the 10th instance waits for a later epoch's order
    assert instance_ids(loader.next_batch()) == loader.epoch_order(1)[:3].tolist()


def test_ranks_are_disjoint_and_make_up_the_global_batch():
    tokens = stream(40)
    single = InstanceLoader(tokens, SEQ, batch_size=6, seed=3)
    # Three calls of 2 in one process: the same instances within an epoch (its end depends on
    # the global batch: 40 instances make 6 batches of 6 but 20 of 2) ...
    small = InstanceLoader(tokens, SEQ, batch_size=2, seed=3)
    # ... and throughout when the loader knows a step's size.
    accumulating = InstanceLoader(tokens, SEQ, batch_size=2, seed=3, instances_per_step=6)
    ranks = [InstanceLoader(tokens, SEQ, 2, seed=3, rank=r, world_size=3) for r in range(3)]
    for step in range(15):  # through several epochs (6 global batches of 6 per epoch)
        parts = [instance_ids(loader.next_batch()) for loader in ranks]
        assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
        assert parts[0] + parts[1] + parts[2] == instance_ids(single.next_batch())
        if step < 6:
            assert parts == [instance_ids(small.next_batch()) for _ in range(3)]
        assert parts == [instance_ids(accumulating.next_batch()) for _ in range(3)]
    assert [r.state_dict() for r in ranks] == [single.state_dict()] * 3


@pytest.mark.parametrize("stop", [1, 5, 6, 13])
def test_resume_continues_exactly(stop):
    tokens = stream(25)
    uninterrupted = InstanceLoader(tokens, SEQ, batch_size=4, seed=11)
    expected = [uninterrupted.next_batch() for _ in range(20)]

    first = InstanceLoader(tokens, SEQ, batch_size=4, seed=11)
    for _ in range(stop):
        first.next_batch()
    state = first.state_dict()
    resumed = InstanceLoader(tokens, SEQ, batch_size=4, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    for step in range(stop, 20):
        assert torch.equal(resumed.next_batch(), expected[step]), step


def test_loader_errors():
    with pytest.raises(DataError, match="3 tokens make 0 instances of 4 tokens, fewer than one"):
        InstanceLoader(np.arange(3, dtype=np.uint16), SEQ, batch_size=1, seed=0)
    with pytest.raises(DataError, match="fewer than one step's 8 .4 per rank x 2 ranks x 1 micro"):
        InstanceLoader(stream(7), SEQ, batch_size=4, seed=0, world_size=2)
    with pytest.raises(DataError, match="step's 12 .2 per rank x 2 ranks x 3 micro-batches"):
        InstanceLoader(stream(11), SEQ, batch_size=2, seed=0, world_size=2, instances_per_step=12)
    with pytest.raises(ConfigError, match="multiple of batch_size x world_size = 4, got 6"):
        InstanceLoader(stream(11), SEQ, batch_size=2, seed=0, world_size=2, instances_per_step=6)
    with pytest.raises(ConfigError, match="rank must be in"):
        InstanceLoader(stream(8), SEQ, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        InstanceLoader(stream(8), SEQ, batch_size=1, seed=-1)
    for bad in ({"seq_len": 0}, {"batch_size": 0}, {"batch_size": 1.5}):
        kwargs = {"seq_len": SEQ, "batch_size": 1, **bad}
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            InstanceLoader(stream(8), seed=0, **kwargs)
    loader = InstanceLoader(stream(8), SEQ, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="num_instances=9, this data gives 8"):
        loader.load_state_dict({**loader.state_dict(), "num_instances": 9})
    with pytest.raises(CheckpointError, match="lacks position"):
        loader.load_state_dict({"seed": 0, "epoch": 0})


def test_as_instances_is_a_view():
    tokens = stream(5, tail=2)
    view = as_instances(tokens, SEQ)
    assert view.shape == (5, SEQ) and np.shares_memory(view, tokens)
    assert view[3].tolist() == [12, 13, 14, 15]
