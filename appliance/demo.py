"""The main job end to end, as a new user would run it (README command 1).

Every step runs the public ``appliance`` CLI in a child process, exactly the command the README
shows under "What the demo did, command by command", and prints it with its timing. A step that
fails stops the demo with that step's error. Everything is written under one work directory
(default ``./demo-work``), and every process the demo starts is stopped before it returns.

Usage: python -m appliance.demo [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France? Answer in one word."


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
        return [sys.executable, "-m", "appliance.cli.main", *args]

    def run(self, title: str, argv: Sequence[str], *, capture: bool = False) -> str:
        """Run one step in the foreground; print it, its output and its timing."""
        self.step_no += 1
        shown = " ".join(shlex.quote(a) for a in ["appliance", *argv[3:]])
        print(f"\n[{self.step_no}] {title}\n    $ {shown}", flush=True)
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
        shown = " ".join(shlex.quote(a) for a in ["appliance", *argv[3:]])
        print(f"\n[{self.step_no}] {title}\n    $ {shown} &", flush=True)
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(
            list(argv), cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    def stop_children(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["APPLIANCE_HOME"] = str(workdir / "site-a")
    demo = Demo(workdir=workdir, env=env)
    try:
        yield demo
    finally:
        demo.stop_children()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_demo(workdir: Path, keep: bool = False) -> str:
    """Run every step; return the model's answer. Raises DemoFailed at the failing step."""
    with demo_session(workdir, keep) as d:
        d.run("check this host", d.appliance("doctor"))
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo-work").resolve())
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        answer = run_demo(args.workdir, keep=args.keep)
    except DemoFailed as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        return 1
    print(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
    if answer:
        print(f"The model answered: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
