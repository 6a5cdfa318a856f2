"""Static and dry-run checks of docker/ and launch/slurm/ (no Docker engine or Slurm needed).

The Dockerfile is parsed with ``dockerfile-parse`` (a test dependency: if it is missing this module
fails to import, it is never skipped). The entrypoint and the sbatch script are syntax-checked with
``bash -n`` and then run with stub ``torchrun`` / ``srun`` / ``scontrol`` commands on ``PATH`` that
print their arguments, so the composed launch lines are checked too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import REPO

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
BASH = shutil.which("bash")


def _instructions() -> list[tuple[str, str]]:
    parser = DockerfileParser(path=str(DOCKER / "Dockerfile"))
    return [(s["instruction"], s["value"]) for s in parser.structure if s["instruction"] != "COMMENT"]


def test_dockerfile_structure():
    parser = DockerfileParser(path=str(DOCKER / "Dockerfile"))
    base = parser.baseimage
    assert base.startswith("pytorch/pytorch:") and "cuda" in base, base
    torch_version = base.split(":")[1].split("-")[0]
    assert tuple(int(x) for x in torch_version.split(".")[:2]) >= (2, 9), "pyproject needs torch>=2.9"

    ins = _instructions()
    names = [i for i, _ in ins]
    assert names.count("FROM") == 1
    users = [(k, v.strip()) for k, (i, v) in enumerate(ins) if i == "USER"]
    assert users, "the image must switch to a non-root user"
    last_user_at, user = users[-1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:")), user
    assert last_user_at > max(k for k, (i, _) in enumerate(ins) if i == "RUN"), "installs run as root, then USER"
    runs = " ".join(v for i, v in ins if i == "RUN")
    assert "useradd" in runs and user in runs

    installs = [v for i, v in ins if i == "RUN" and "pip install" in v]
    assert len(installs) == 1 and "/opt/lctrain[triton,ray]" in installs[0], installs

    entry = [json.loads(v) for i, v in ins if i == "ENTRYPOINT"]
    assert len(entry) == 1 and isinstance(entry[0], list), "ENTRYPOINT in exec (JSON) form"
    copies = [v.split() for i, v in ins if i == "COPY"]
    assert ["docker/entrypoint.sh", entry[0][0]] in copies
    # Every COPY source exists in the build context (the repository root).
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"COPY source {src} missing"
    assert any(s[0] == "lctrain" for s in copies)  # recipes travel inside it (package data)


def _stub_bin(tmp_path: Path, names: list[str], scontrol_hosts: str = "") -> Path:
    """Stub commands that print ``NAME ARG1 ARG2 ...`` one argument per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        if name == "scontrol":
            body = f"printf '{scontrol_hosts}'\n"
        else:
            body = f'echo {name}; for a in "$@"; do echo "$a"; done\n'
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], check=False, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("script", [ENTRYPOINT, SBATCH], ids=["entrypoint", "sbatch"])
def test_shell_scripts_parse(script):
    proc = subprocess.run([BASH, "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_entrypoint_builds_torchrun_and_ray_lines(tmp_path):
    bin_dir = _stub_bin(tmp_path, ["torchrun", "python"])
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LCTRAIN_HOME": str(REPO)}
    single = _run(ENTRYPOINT, ["train", "recipe=hybrid_gdn_3to1", "train.max_steps=5"], base)
    assert single.returncode == 0, single.stderr
    assert single.stdout.split("\n")[:7] == [
        "torchrun", "--nnodes=1", "--nproc_per_node=gpu", "--standalone", "--max_restarts=0",
        f"{REPO}/launch/train.py", "recipe=hybrid_gdn_3to1",
    ]
    multi = _run(ENTRYPOINT, ["train", "recipe=gdn"], {**base, "NNODES": "4", "MASTER_ADDR": "10.0.0.1", "NPROC_PER_NODE": "8"})
    lines = multi.stdout.split()
    assert multi.returncode == 0 and "--rdzv_backend=c10d" in lines and "--standalone" not in lines
    assert "--rdzv_endpoint=10.0.0.1:29500" in lines and "--nnodes=4" in lines and "--nproc_per_node=8" in lines
    missing = _run(ENTRYPOINT, ["train", "recipe=gdn"], {**base, "NNODES": "2"})
    assert missing.returncode != 0 and "MASTER_ADDR" in missing.stderr
    ray_job = _run(ENTRYPOINT, ["ray-job", "recipe=gdn", "--num-workers", "4"], base)
    assert ray_job.returncode == 0, ray_job.stderr
    assert ray_job.stdout.split("\n")[:5] == ["python", f"{REPO}/launch/ray_job.py", "recipe=gdn", "--num-workers", "4"]
    assert (REPO / "launch" / "ray_job.py").exists() and (REPO / "launch" / "train.py").exists()
    passthrough = _run(ENTRYPOINT, ["echo", "hello"], base)
    assert passthrough.stdout.strip() == "hello"


def test_sbatch_directives_and_srun_torchrun_line(tmp_path):
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!")
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command, "Slurm ignores #SBATCH lines after the first command"
    assert any("--ntasks-per-node=1" in lines[i] for i in directives)

    bin_dir = _stub_bin(tmp_path, ["srun", "scontrol"], scontrol_hosts="gpu-a17\\ngpu-a18\\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO),
    }
    proc = _run(SBATCH, ["recipe=hybrid_gdn_3to1", "train.out_dir=/shared/runs/x"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    call = out[out.index("srun"):]
    assert "--kill-on-bad-exit=1" in call and "-m" in call and "torch.distributed.run" in call
    for arg in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:29500",
                "--rdzv_id=4242"):
        assert arg in call, (arg, call)
    assert call[-3:] == [f"{REPO}/launch/train.py", "recipe=hybrid_gdn_3to1", "train.out_dir=/shared/runs/x"]


def test_entrypoint_help_prints_usage_not_script_lines():
    proc = subprocess.run(["bash", str(ENTRYPOINT), "--help"], capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == "lctrain container entrypoint."
    assert any(line.startswith("  train ARGS") for line in lines)
    assert not any(line.startswith("#") or "set -euo" in line for line in lines), lines


def _default_signals() -> None:
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def test_sbatch_relays_time_limit_signal_and_requeues(tmp_path):
    """USR1 before the time limit: the script sends TERM to srun (the ranks save and stop) and requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\ntrap 'echo srun-got-TERM; exit 4' TERM\necho srun-started\n"
        "for i in $(seq 600); do sleep 0.1; done\n"
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\nif [[ $1 == show ]]; then printf 'gpu-a17\\n'; else echo scontrol \"$@\"; fi\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a17", "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(REPO),
    }
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        # default dispositions: a signal ignored in this process would be inherited (and untrappable)
        proc = subprocess.Popen([BASH, str(SBATCH), "recipe=gdn"], stdout=f, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_default_signals)
    deadline = time.monotonic() + 30
    while "srun-started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    rc = proc.wait(timeout=30)
    out = log.read_text()
    assert rc == 4, out  # srun's (the ranks') exit status is the script's
    assert "srun-got-TERM" in out and "scontrol requeue 4242" in out, out
