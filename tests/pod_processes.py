"""Run a rendered pod's containers as local processes: a small stand-in for kubelet and KubeRay.

Each container runs in its own PID and mount namespace (`unshare`), as in a pod: `ray stop`
in the preStop hook then sees only that pod's processes (never the session's shared Ray
cluster nor a neighbour's), and the pod's volumes are bind-mounted at their mountPaths
from temporary directories. What kubelet and KubeRay provide is substituted: the pod IP
(127.0.0.N, one loopback address per pod), the downward API, Secret values (from the
rendered Secrets), KubeRay's `ray start` command ($KUBERAY_GEN_RAY_START_CMD) built from
the rendered rayStartParams, and free ports where several Ray nodes share this machine.
The network namespace stays shared: every pod reaches every other over loopback.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKTREE = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free port below the ephemeral range: Ray picks its own random ports in that range,
    so one chosen here is not taken by a Ray process between now and its use."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-30000")


def machine_ip() -> str:
    """The address Ray takes for this machine (as it does in a pod: the pod IP): the head pod's,
    because Ray turns a 127.0.0.1 bootstrap address into it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def expand(text: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion in args and env values: $$ is a literal $, unknown names stay."""
    return re.sub(r"\$\$|\$\((\w+)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def secrets_of(docs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(Secret name, key) → value, from the rendered Secrets."""
    out = {}
    for d in docs:
        if d["kind"] == "Secret":
            for k, v in (d.get("data") or {}).items():
                out[(d["metadata"]["name"], k)] = base64.b64decode(v).decode()
            for k, v in (d.get("stringData") or {}).items():
                out[(d["metadata"]["name"], k)] = v
    return out


def kuberay_start_command(params: dict[str, str], *, head: bool, gcs: str, extra: dict[str, str]) -> str:
    """The `ray start` line KubeRay generates from rayStartParams (plus --block)."""
    words = ["ray", "start", "--head" if head else f"--address={gcs}"]
    for k, v in {**params, **extra}.items():
        words.append(f"--{k}" if v == "true" else f"--{k}={v}")  # KubeRay's form for flags
    words.append("--block")
    return " ".join(words)


@dataclass
class Pod:
    """One pod instance: its IP, volumes (temp dirs) and the env values kubelet supplies."""

    name: str
    spec: dict[str, Any]
    ip: str
    root: Path
    secrets: dict[tuple[str, str], str]
    kuberay_env: dict[str, str] = field(default_factory=dict)
    containers: dict[str, "Container"] = field(default_factory=dict)
    made: list[Path] = field(default_factory=list)  # host directories created as mount points

    def volume_dir(self, name: str) -> Path:
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env_of(self, c: dict[str, Any]) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(WORKTREE), "HOME": str(self.root / "home-dir"),
               "RAY_USAGE_STATS_ENABLED": "0", **self.kuberay_env}
        fields = {"status.podIP": self.ip, "spec.nodeName": f"k8s-{self.name}", "metadata.namespace": "ml",
                  "metadata.name": self.name}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[(ref["name"], ref["key"])]
        return env

    def mounts_of(self, c: dict[str, Any]) -> dict[str, Path]:
        """mountPath → the directory standing for that volume (devices are left alone)."""
        out = {}
        for m in c.get("volumeMounts", []):
            if m["mountPath"].startswith("/dev/"):
                continue
            out[m["mountPath"]] = self.volume_dir(m["name"])
        return out

    def start(self, container_name: str, logs: Path) -> "Container":
        (c,) = [c for c in self.spec["spec"]["containers"] if c["name"] == container_name]
        env = self.env_of(c)
        argv = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
        if argv and Path(argv[0]).name == "tini" and "--" in argv and not Path(argv[0]).exists():
            argv = argv[argv.index("--") + 1:]  # the image's init (`tini [-s] --`); the namespace's PID 1 reaps here
        mounts = self.mounts_of(c)
        # /tmp/ray is private to a container unless a volume shares it (the head pod's ray-tmp)
        mounts.setdefault("/tmp/ray", self.volume_dir(f"tmp-ray-{container_name}"))
        for target in mounts:  # `mkdir -p` below makes them on the host: remember what was not there
            first_missing = next((p for p in reversed([Path(target), *Path(target).parents]) if not p.exists()), None)
            if first_missing is not None and first_missing not in self.made:
                self.made.append(first_missing)
        setup = "".join(f"mkdir -p {shlex.quote(t)} && mount --bind {shlex.quote(str(s))} {shlex.quote(t)} && "
                        for t, s in sorted(mounts.items()))
        log = open(logs / f"{self.name}-{container_name}.log", "ab")
        if self.spec["spec"].get("shareProcessNamespace") and self.containers:
            # one PID namespace for the pod: join the first container's, with a mount namespace of its own
            first = next(iter(self.containers.values()))
            ns = ["nsenter", "--target", str(first.init_pid()), "--pid", "--",
                  "unshare", "--mount", "--propagation", "private"]
            setup = "mount -t proc proc /proc && " + setup
        else:
            ns = ["unshare", "--pid", "--mount", "--mount-proc", "--propagation", "private", "--kill-child"]
        proc = subprocess.Popen(
            [*ns, "/bin/bash", "-c", setup + 'exec "$@"', "pod-init", *argv],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        container = Container(self, c, env, proc, logs / f"{self.name}-{container_name}.log")
        self.containers[container_name] = container
        return container


def remove_made(dirs: list[Path]) -> None:
    """Remove the mount-point directories a test made on the host, if they are empty again
    (their bind mounts lived in the containers' own mount namespaces)."""
    for top in dirs:
        if not top.is_dir():
            continue
        for path in sorted([top, *top.rglob("*")], key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass  # not empty, not a directory, or gone: leave it


@dataclass
class Container:
    pod: Pod
    spec: dict[str, Any]
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path

    def init_pid(self, timeout: float = 10.0) -> int:
        """The host PID of the container's PID 1 (unshare's forked child)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log.name} exited: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.log.name}: no PID 1 after {timeout:.0f} s")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pre_stop(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """kubelet's exec of the preStop hook: in the container's namespaces, with its env."""
        command = self.spec["lifecycle"]["preStop"]["exec"]["command"]
        return subprocess.run(["nsenter", "--target", str(self.init_pid()), "--pid", "--mount", "--", *command],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def sigterm(self) -> None:
        """What kubelet sends the container's PID 1 when the pod stops."""
        os.kill(self.init_pid(), signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the namespace's PID 1 ends every process of the container."""
        if self.proc.poll() is None:
            try:
                os.kill(self.init_pid(timeout=1.0), signal.SIGKILL)
            except (AssertionError, ProcessLookupError):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
