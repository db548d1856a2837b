"""``python -m swarm``: join, status, generate, graceful Ctrl-C, and the demo, as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from swarm._cli import main
from swarm._demo_model import byte_tokenizer
from tests.model_shards.tiny import CONFIGS
from tests.swarm.harness import ProcessSwarm

TCP = "/ip4/127.0.0.1/tcp/0"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``python -m swarm ARGS`` run in this process; its stdout."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 0
    return capsys.readouterr().out


def swarm_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def talking_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """A tiny Llama with a byte-level tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("talking-llama")
    tokenizer = byte_tokenizer()
    config = CONFIGS["llama"]()
    config.vocab_size = len(tokenizer)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path, model, tokenizer


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessSwarm]:
    made = ProcessSwarm(tmp_path)
    yield made
    made.close()


@pytest.mark.timeout(300)
def test_join_status_generate_and_graceful_leave(
    talking_llama: tuple[Path, object, object],
    processes: ProcessSwarm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, model, tokenizer = talking_llama
    common = ["--model", str(path), "--blocks", "auto", "--num-blocks", "2", "--listen", TCP]
    common += ["--threads", "1", "--cache-dir", str(tmp_path)]
    first = processes.start("first", ["join", *common])
    addr = first.addr(120)
    assert addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in addr
    assert first.wait_for("joining", 120) == "joining: blocks 0:2"
    second = processes.start("second", ["join", *common, "--bootstrap", addr])
    assert second.wait_for("joining", 120) == "joining: blocks 2:4"
    first.wait_for("online", 120)
    online = second.wait_for("online", 120)
    assert online.startswith(f"online: blocks 2:4 of {path.name}@")

    status = run_cli(capsys, "status", "--bootstrap", addr)
    assert f"model {path.name}@" in status and "(llama, 4 blocks)" in status
    assert "0:2" in status and "2:4" in status
    assert "every block served" in status

    prompt = "Hello swarm"
    ids = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    expected = model.generate(**ids, do_sample=False, max_new_tokens=12)  # type: ignore[attr-defined]
    text = tokenizer.decode(expected[0], skip_special_tokens=True)  # type: ignore[attr-defined]
    generated = run_cli(
        capsys,
        "generate",
        "--model",
        str(path),
        "--bootstrap",
        addr,
        prompt,
        "--max-new-tokens",
        "12",
    )
    assert generated.strip() == text.strip()

    assert second.stop() == 0
    assert second.lines[-1] == "offline"
    status = run_cli(capsys, "status", "--bootstrap", addr, "--json")
    (report,) = json.loads(status.splitlines()[-1])["models"]
    states = {tuple(s["blocks"]): s["state"] for s in report["servers"]}
    assert states == {(0, 2): "online", (2, 4): "offline"}
    assert first.stop() == 0


@pytest.mark.timeout(300)
def test_demo_runs_a_swarm_and_matches_the_local_model(tmp_path: Path) -> None:
    result = swarm_cli(
        "demo", "--json", "--cache-dir", str(tmp_path), "--new-tokens", "8", timeout=280
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"] is True
    assert report["new_tokens"] == 8
    assert sorted(s["blocks"] for s in report["servers"]) == ["0:2", "2:4", "4:6"]
    assert report["swarm_tokens_per_s"] > 0 and report["local_tokens_per_s"] > 0
    assert (tmp_path / "swarm-demo-llama" / "tokenizer.json").is_file()
    leftover = subprocess.run(
        ["pgrep", "-f", f"swarm join --model {tmp_path}"], capture_output=True, check=False
    )
    assert leftover.stdout == b""
