"""Intermediate checkpoints as revisions: a run keeps them under the hub's names beyond checkpoint
rotation, `from_pretrained` and the commands load them by name, and `olmoe revisions` lists a
run's revisions and a hub repo's branches (through a local stand-in of the hub's HTTP API)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer
from olmoe.cli import main
from olmoe.errors import CheckpointError, ConfigError, InputError
from olmoe.revisions import Revision, list_revisions, parse_revision, revision_name
from olmoe.train import load_config, state, train

REVISIONS = ["step2-tokens0B", "step4-tokens0B"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """A 4-step run of the tiny model: a checkpoint every 2 steps with only the newest kept, and
    a revision every 2 steps."""
    folder = tmp_path_factory.mktemp("revisions")
    np.save(folder / "tokens.npy", np.tile(np.arange(2, 100, dtype=np.uint16), 20))
    config = load_config(None, [
        f"--data.path={folder / 'tokens.npy'}", "--data.seq_len=32", "--model.preset=tiny",
        "--train.max_steps=4", "--train.global_batch_tokens=128", "--train.micro_batch_size=4",
        "--train.precision=fp32", "--train.threads=1", "--schedule.warmup_steps=1",
        "--optim.lr=1e-2", f"--run_dir={folder / 'run'}", "--checkpoint.every=2",
        "--checkpoint.keep=1", "--checkpoint.revisions_every=2",
    ])  # fmt: skip
    train(config, progress=False)
    return folder / "run"


def test_revision_names_are_the_hubs():
    # The released model's branches: 4,194,304 tokens a step, whole billions rounded down.
    assert revision_name(10_000, 10_000 * 4_194_304) == "step10000-tokens41B"
    assert revision_name(1_200_000, 1_200_000 * 4_194_304) == "step1200000-tokens5033B"
    assert revision_name(3, 384) == "step3-tokens0B"
    assert parse_revision("step10000-tokens41B") == Revision("step10000-tokens41B", 10_000, 41)
    assert parse_revision("main") == Revision("main", None, None)


def test_a_run_keeps_its_revisions_beyond_checkpoint_rotation(run):
    assert [r.name for r in list_revisions(run)] == ["main", *REVISIONS]
    # keep=1 deleted the step-2 checkpoint; its revision stays
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [state.checkpoint_name(4)]
    assert sorted(p.name for p in (run / "revisions").iterdir()) == REVISIONS  # nothing staged
    files = sorted(p.name for p in (run / "revisions" / REVISIONS[0]).iterdir())
    assert files == ["config.json", "model.safetensors"]  # the model alone, no trainer state
    final = load_file(run / "model.safetensors")
    last, early = (load_file(run / "revisions" / name / "model.safetensors") for name in
                   reversed(REVISIONS))  # fmt: skip
    assert all(torch.equal(final[key], last[key]) for key in final)  # step 4 is the final model
    assert not all(torch.equal(final[key], early[key]) for key in final)


def test_from_pretrained_loads_a_revision_by_name(run):
    ids = torch.arange(2, 14)[None]
    with torch.no_grad():
        early = OlmoeForCausalLM.from_pretrained(run, revision=REVISIONS[0])(ids).logits
        main_ = OlmoeForCausalLM.from_pretrained(run, revision="main")(ids).logits
        final = OlmoeForCausalLM.from_pretrained(run)(ids).logits
    assert torch.equal(main_, final) and not torch.equal(early, final)
    assert OlmoeConfig.from_pretrained(run, revision=REVISIONS[0]).num_hidden_layers == 2
    assert isinstance(Tokenizer.from_pretrained(run, revision=REVISIONS[0]), Tokenizer)


def test_an_unknown_revision_names_the_available_ones(run, tmp_path):
    with pytest.raises(CheckpointError, match="main, step2-tokens0B, step4-tokens0B"):
        OlmoeForCausalLM.from_pretrained(run, revision="step3-tokens0B")
    with pytest.raises(CheckpointError, match="no revision"):  # never a path out of revisions/
        OlmoeConfig.from_pretrained(run, revision="../checkpoints/step-00000004")
    OlmoeForCausalLM(OlmoeConfig.tiny()).save_pretrained(tmp_path)  # no revisions/ folder
    with pytest.raises(InputError, match="checkpoint.revisions_every"):
        OlmoeConfig.from_pretrained(tmp_path, revision="main")


def test_commands_take_a_run_revision(run, capsys):
    assert main(["info", str(run), "--revision", REVISIONS[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["directory"] == str(run / "revisions" / REVISIONS[0])
    assert main(["info", str(run), "--revision", "step9-tokens0B"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("olmoe info: error:") and error.count("\n") == 1
    assert "step2-tokens0B, step4-tokens0B" in error


def test_revisions_command_lists_a_run(run, capsys):
    assert main(["revisions", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["revision", "step", "tokens", "size"]
    assert [line.split()[0] for line in lines[1:]] == ["main", *REVISIONS]
    assert lines[2].split()[1:3] == ["2", "0B"]
    assert main(["revisions", str(run), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    size = (run / "revisions" / REVISIONS[0] / "model.safetensors").stat().st_size
    assert listing[1] == {"name": REVISIONS[0], "step": 2, "tokens_billions": 0, "size": size}
    assert main(["revisions", str(run / "absent")]) == 1
    assert "no run directory" in capsys.readouterr().err


def test_revisions_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="checkpoint.revisions_every"):
        load_config(None, ["--data.path=tokens.npy", "--checkpoint.revisions_every=-1"])


# ---------------------------------------------------------------------------- the hub
REPO = "allenai/OLMoE-1B-7B-0924"
BRANCHES = ["main", "step10000-tokens41B", "fp32", "step5000-tokens20B"]


class HubRefs(BaseHTTPRequestHandler):
    """The hub's `GET /api/models/{repo}/refs` for REPO, answered as huggingface.co answers it;
    any other repo is not found (404 with the hub's error code)."""

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path == f"/api/models/{REPO}/refs":
            status, headers = 200, {}
            refs = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": f"{i:040x}"}
                for i, name in enumerate(BRANCHES)
            ]
            body = {"branches": refs, "converts": [], "tags": []}
        else:
            status, headers = 404, {"X-Error-Code": "RepoNotFound"}
            body = {"error": "Repository not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubRefs)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)  # read at import
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_revisions_command_lists_a_hub_repos_branches(hub, capsys):
    assert main(["revisions", REPO]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["fp32", "main", "step5000-tokens20B", "step10000-tokens41B"]  # names, then steps
    assert [line.split()[0] for line in lines[1:]] == names
    assert lines[-1].split()[1:] == ["10,000", "41B"]  # no size: the hub lists no files here
    assert f"/api/models/{REPO}/refs" in hub.paths  # (huggingface_hub asks for more besides)
    assert main(["revisions", "allenai/no-such-model"]) == 1
    error = capsys.readouterr().err
    assert "could not list the revisions of allenai/no-such-model" in error
    assert error.count("\n") == 1


def test_an_unreachable_hub_is_one_line(monkeypatch, capsys):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    assert main(["revisions", REPO]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"olmoe revisions: error: could not list the revisions of {REPO}")
    assert error.count("\n") == 1
