"""Two "nodes" on one machine through DeepSpeed's per-node launcher give the latents of one process.

`deepspeed --hostfile` ssh-es into every host and runs `python -m deepspeed.launcher.launch` there with
the same `--world_info` and that host's `--node_rank`; here both per-node launchers run locally, one
rank each, so the 2 ranks are the 2 stages of one pipeline talking over loopback (gloo on CPU).
"""

import base64
import json
import subprocess
import sys

import torch
from conftest import GENERATE, ROOT, TINY_CONFIG, free_port, subprocess_env
from deepspeed.launcher.runner import fetch_hostfile
from safetensors.torch import load_file

TIMEOUT_S = 300


def world_info(nodes: dict[str, list[int]]) -> str:
    """What `deepspeed.launcher.runner` passes to every node: urlsafe base64 of {host: [device ids]}."""
    return base64.urlsafe_b64encode(json.dumps(nodes).encode()).decode()


def start_node(node_rank: int, info: str, port: int, cwd, log):
    command = [
        sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={info}", f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(GENERATE),
        "--config", str(TINY_CONFIG), "--output", "video.mp4", "--save-latents", "latents.safetensors",
    ]
    return subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def test_two_nodes_give_the_latents_of_one_process(tmp_path, tiny_single_run):
    info = world_info({"node0": [0], "node1": [0]})
    port = free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    # Each node writes into its own folder, as on machines without a shared disk: only rank 0 (node 0,
    # the first stage) writes the video and the latents.
    folders = [tmp_path / f"node{n}" for n in range(2)]
    nodes, files = [], []
    try:
        for n in range(2):
            folders[n].mkdir()
            files.append(logs[n].open("w"))
            nodes.append(start_node(n, info, port, folders[n], files[-1]))
        codes = [node.wait(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.terminate()  # the launcher passes it on to its rank
                node.wait(timeout=30)
        for f in files:
            f.close()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- node {n}\n{t[-3000:]}" for n, t in enumerate(text))
    assert "stage 0/2 of replica 0/1" in text[0] and "stage 1/2 of replica 0/1" in text[1]
    assert "nnodes=2" in text[1] and "node_rank=1" in text[1]

    reference = load_file(tiny_single_run[0] / "tiny.safetensors")["latents"]
    assert torch.equal(load_file(folders[0] / "latents.safetensors")["latents"], reference)
    assert (folders[0] / "video.mp4").is_file()
    assert list(folders[1].iterdir()) == []


def test_hostfile_example_parses_as_two_nodes_of_eight():
    assert fetch_hostfile(str(ROOT / "launch" / "hostfile.example")) == {"node-a": 8, "node-b": 8}
