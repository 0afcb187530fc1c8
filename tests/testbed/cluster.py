"""A Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok (fake nodes), each a process in its own process group, configured the way a production cluster is
(TLS, RBAC, bound service-account tokens, admission webhooks) so tests exercise the same code paths.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .pki import CertificateAuthority, CertPair, write_service_account_keys

KWOK_STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"
# Only allocated from, never routed: there is no pod or service network on a kwok cluster.
SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
START_TIMEOUT_S = 90.0
# Who the API server is when it calls admission webhooks (its AdmissionConfiguration gives it a token, as
# a platform team does so that webhooks can tell the API server from a pod posting forged reviews).
WEBHOOK_CALLER = "testbed:kube-apiserver-webhook"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


T = TypeVar("T")


class TestbedError(RuntimeError):
    pass


def wait_for(probe: Callable[[], T | None], *, timeout_s: float = 30.0, what: str) -> T:
    """Polls `probe` until it returns something truthy, and returns that; for tests awaiting controllers."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.25)


class CommandError(TestbedError):
    """kubectl or helm failed; carries the completed process so tests can inspect stderr."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(map(str, result.args))} exited {result.returncode}: {result.stderr.strip()}"
        )
        self.result = result


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_ports(6))


def free_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range.

    A port from bind(("127.0.0.1", 0)) lies inside that range, where it may be taken as the local end
    of some outgoing connection (the API server's to etcd, say) before its component gets to bind it.
    """
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(10000, first_ephemeral), 16 * count)
    sockets: list[socket.socket] = []
    try:
        # Holding each socket until all are chosen keeps two picks from agreeing.
        for port in candidates:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                # The wildcard address: a port free there is free on loopback and the node IP alike.
                s.bind(("0.0.0.0", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise TestbedError(f"found no {count} free ports")
    finally:
        for s in sockets:
            s.close()


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    user: str,
    cert: CertPair | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    """kubectl and client-go read JSON kubeconfigs too, which spares a YAML dependency."""
    credentials: dict[str, str] = (
        {"client-certificate": str(cert.cert), "client-key": str(cert.key)}
        if cert
        else {"token": token or ""}
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "testbed", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _process_matches(pid: int, binary: str) -> bool:
    """Guards `down` against a recorded PID that has since been reused by an unrelated process."""
    try:
        return binary in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether a process that is not our child still runs; a zombie awaiting its reaper does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # Reaps it if it is our child; otherwise (after `up` exited) just probes whether it still exists.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if not _alive(pid):
                return True
        time.sleep(0.05)
    return False


def stop_process_groups(
    pids: Mapping[str, int], binaries: Mapping[str, str], timeout_s: float = 10.0
) -> None:
    """Stops components newest first, each by SIGTERM to its process group, SIGKILL after `timeout_s`.

    One at a time because the API server's graceful shutdown stalls when etcd goes away beneath it.
    """
    for name, pid in reversed(list(pids.items())):
        if not _process_matches(pid, binaries[name]):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_exit(pid, timeout_s)


def stop_process_group(process: subprocess.Popen[Any], timeout_s: float = 15) -> None:
    """SIGTERM to ``process``'s group, SIGKILL after ``timeout_s``; reaps it either way."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()  # already gone: reap it so no zombie is left


@dataclass
class Testbed:
    """A running (or startable) control plane whose state lives in `workdir`."""

    __test__ = False  # not a pytest test class despite the name
    workdir: Path
    binaries: Mapping[str, Path]
    node_count: int = 3
    ports: Ports = field(default_factory=Ports.pick)
    pids: dict[str, int] = field(default_factory=dict)
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # ---- paths and addresses -------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def ca_bundle(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        return self.binaries["kubectl"]

    @property
    def helm_path(self) -> Path:
        return self.binaries["helm"]

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(self.pki_dir)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def _authenticate_to_webhooks(self) -> Path:
        """An AdmissionConfiguration under which the API server sends every webhook the bearer token of
        ``WEBHOOK_CALLER`` (a static token, so that it exists before the API server starts)."""
        token_path = self.pki_dir / "webhook-caller.token"
        if not token_path.exists():
            token_path.write_text(secrets.token_hex(24))
            token_path.chmod(0o600)
        token = token_path.read_text()
        (self.pki_dir / "tokens.csv").write_text(f'{token},{WEBHOOK_CALLER},{WEBHOOK_CALLER},""\n')
        kubeconfig = self.pki_dir / "webhook-caller.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {"apiVersion": "v1", "kind": "Config", "users": [{"name": "*", "user": {"token": token}}]}
            )
        )
        webhook = {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": str(kubeconfig),
        }
        config = self.workdir / "admission.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "apiserver.config.k8s.io/v1",
                    "kind": "AdmissionConfiguration",
                    "plugins": [
                        {"name": name, "configuration": webhook}
                        for name in ("ValidatingAdmissionWebhook", "MutatingAdmissionWebhook")
                    ],
                }
            )
        )
        return config

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts every component and returns once all are healthy and the kwok nodes are schedulable."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        ca = CertificateAuthority(self.pki_dir)
        serving = ca.issue(
            "kube-apiserver",
            "kube-apiserver",
            hosts=(
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.96.0.1",
            ),
            server=True,
        )
        sa = write_service_account_keys(self.pki_dir)
        # The aggregation layer's own CA, as on a real control plane; the controller manager and scheduler
        # look it up at startup and log errors every second without it.
        front_proxy_ca = CertificateAuthority(self.pki_dir / "front-proxy")
        front_proxy = front_proxy_ca.issue("front-proxy-client", "front-proxy-client", client=True)
        admin = ca.issue("admin", "testbed-admin", organizations=("system:masters",), client=True)
        # For `kubectl logs` and `exec` on the real node (see node.py).
        kubelet_client = ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organizations=("system:masters",),
            client=True,
        )
        write_kubeconfig(self.kubeconfig, self.server, ca.cert_path, user="testbed-admin", cert=admin)
        kubeconfigs = {
            # These identities are what the bootstrap RBAC policy grants the controller manager and scheduler.
            name: write_kubeconfig(
                self.workdir / f"{name}.kubeconfig",
                self.server,
                ca.cert_path,
                user=user,
                cert=ca.issue(name, user, organizations=orgs, client=True),
            )
            for name, user, orgs in (
                ("kube-controller-manager", "system:kube-controller-manager", ()),
                ("kube-scheduler", "system:kube-scheduler", ()),
                # kwok acts as the kubelet of many nodes at once, which the Node authorizer cannot express.
                ("kwok", "kwok-controller", ("system:masters",)),
            )
        }
        p = self.ports
        admission_config = self._authenticate_to_webhooks()

        self.spawn(
            "etcd",
            [
                "--name=testbed",
                f"--data-dir={self.workdir / 'etcd'}",
                # Plain HTTP is acceptable: etcd listens on loopback only and only the API server uses it.
                f"--listen-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{p.etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-cluster=testbed=http://127.0.0.1:{p.etcd_peer}",
                # A throwaway cluster needs no durability; fsync is most of etcd's latency on slow disks.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.wait("etcd", lambda: self._http_ok(f"http://127.0.0.1:{p.etcd_client}/health"), deadline)

        self.spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # Endpoints may not hold loopback addresses, and nothing on a kwok cluster dials the
                # kubernetes Service, so the API server does not publish itself there.
                "--endpoint-reconciler-type=none",
                f"--secure-port={p.apiserver}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert_path}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--api-audiences={self.server}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--requestheader-client-ca-file={front_proxy_ca.cert_path}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                "--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                f"--admission-control-config-file={admission_config}",
                f"--token-auth-file={self.pki_dir / 'tokens.csv'}",
                "--allow-privileged=true",
                # Webhooks behind a Service are called at its endpoints (there is no kube-proxy for
                # ClusterIPs); on the real node those are hostNetwork pods at the node's address.
                "--enable-aggregator-routing=true",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                # The node's name does not resolve here; its address does.
                "--kubelet-preferred-address-types=InternalIP",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.wait("kube-apiserver", lambda: self._http_ok(f"{self.server}/readyz"), deadline)

        secure = [
            f"--cert-dir={self.workdir}/{{name}}-certs",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ]
        for name, port, extra in (
            (
                "kube-controller-manager",
                p.controller_manager,
                [
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={sa.key}",
                    f"--root-ca-file={ca.cert_path}",
                    f"--cluster-signing-cert-file={ca.cert_path}",
                    f"--cluster-signing-key-file={ca.key_path}",
                    "--cluster-name=sluicegate-testbed",
                ],
            ),
            ("kube-scheduler", p.scheduler, []),
        ):
            self.spawn(
                name,
                [
                    *(arg.format(name=name) for arg in secure),
                    f"--secure-port={port}",
                    f"--kubeconfig={kubeconfigs[name]}",
                    f"--authentication-kubeconfig={kubeconfigs[name]}",
                    f"--authorization-kubeconfig={kubeconfigs[name]}",
                    "--v=1",
                    *extra,
                ],
            )
        self.spawn(
            "kwok",
            [
                f"--kubeconfig={kubeconfigs['kwok']}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p.kwok}",
            ],
        )
        self._create_nodes()

        for name, port in (
            ("kube-controller-manager", p.controller_manager),
            ("kube-scheduler", p.scheduler),
        ):
            self.wait(name, functools.partial(self._http_ok, f"https://127.0.0.1:{port}/healthz"), deadline)
        self.wait("kwok", lambda: self._http_ok(f"http://127.0.0.1:{p.kwok}/healthz"), deadline)
        self.wait("kwok nodes Ready and untainted", self._nodes_schedulable, deadline)
        # Pods are rejected until the service-account controller has created the namespace's default SA.
        self.wait(
            "default ServiceAccount",
            lambda: self._http_ok(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
        )

    def stop(self) -> None:
        stop_process_groups(self.pids, {n: str(self.binaries[n]) for n in self.pids})
        self.pids.clear()
        self._processes.clear()

    def stop_component(self, name: str) -> None:
        """Stops one component started with `spawn` (the real node's, before the rest of the testbed)."""
        if name in self.pids:
            stop_process_groups({name: self.pids.pop(name)}, {name: str(self.binaries[name])})
            self._processes.pop(name, None)

    def spawn(self, name: str, args: list[str], *, env: Mapping[str, str] | None = None) -> None:
        """Starts `binaries[name]`, logging to logs/<name>.log; stopped with the testbed."""
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [str(self.binaries[name]), *args],
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Own process group: teardown can signal the component and anything it forks, and a Ctrl-C in
                # the terminal running `make testbed` does not reach it.
                start_new_session=True,
            )
        self._processes[name] = process
        self.pids[name] = process.pid

    def wait(self, what: str, check: Callable[[], bool], deadline: float) -> None:
        """Polls `check` until true; fails early, with its log, when a spawned component exits."""
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise TestbedError(
                        f"{name} exited with {process.returncode} while waiting for {what}:\n"
                        + _tail(self.log_dir / f"{name}.log", 30)
                    )
            if check():
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"timed out waiting for {what}\n{self.log_tails(20)}")
            time.sleep(0.2)

    # ---- API access ----------------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        context.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return context

    def _http_ok(self, url: str) -> bool:
        context: ssl.SSLContext | None = None
        if url.startswith(self.server):
            context = self._ssl_context()
        elif url.startswith("https://"):
            # The controller manager and scheduler serve health on self-signed certs they generate themselves.
            context = ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                status: int = response.status
                return status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """A raw admin request to the API server; returns the decoded JSON response."""
        request = urllib.request.Request(
            self.server + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._ssl_context()) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise TestbedError(
                f"{method} {path}: {error.code} {error.read().decode(errors='replace')}"
            ) from error

    def _create_nodes(self) -> None:
        for i in range(self.node_count):
            name = f"kwok-node-{i}"
            self.api(
                "POST",
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                        },
                    },
                    "status": {
                        "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                        "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    },
                },
            )

    def _nodes_schedulable(self) -> bool:
        nodes = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
        return len(nodes) == self.node_count and all(
            not node["spec"].get("taints")
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
            )
            for node in nodes
        )

    # ---- helpers for tests ---------------------------------------------------------------------------------

    def _run(
        self,
        argv: list[str],
        *,
        input: str | None,
        check: bool,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise CommandError(result)
        return result

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout_s: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the pinned kubectl as cluster admin (or with `kubeconfig`); raises CommandError on failure."""
        argv = [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return self._run(argv, input=input, check=check, timeout_s=timeout_s)

    def helm(
        self, *args: str, check: bool = True, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs the pinned helm as cluster admin, with its config and cache kept in the testbed's workdir."""
        home = self.workdir / "helm"
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        return self._run([str(self.helm_path), *args], input=None, check=check, timeout_s=timeout_s, env=env)

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)}),
        )

    def service_account_token(
        self, namespace: str, name: str, *, audiences: Iterable[str] = (), duration_s: int = 3600
    ) -> str:
        """A bound token from the TokenRequest API; no audiences means the API server's own."""
        args = ["create", "token", name, "-n", namespace, f"--duration={duration_s}s"]
        args += [f"--audience={audience}" for audience in audiences]
        return self.kubectl(*args).stdout.strip()

    def service_account_kubeconfig(self, namespace: str, name: str, *, duration_s: int = 3600) -> Path:
        token = self.service_account_token(namespace, name, duration_s=duration_s)
        return write_kubeconfig(
            self.workdir / f"sa-{namespace}-{name}.kubeconfig",
            self.server,
            self.ca_bundle,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
            namespace=namespace,
        )

    def issue_serving_cert(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CertPair:
        """A server certificate signed by the testbed CA, e.g. for a webhook the API server must trust."""
        return self.ca.issue(name, name, hosts=hosts, server=True)

    def webhook_client_config(self, port: int, path: str = "/") -> dict[str, str]:
        """`clientConfig` for a webhook served on this machine with a cert from issue_serving_cert."""
        return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(self.ca.pem).decode()}

    def log_tails(self, lines: int = 40) -> str:
        logs = [self.log_dir / f"{name}.log" for name in self.pids or COMPONENTS]
        return "\n".join(f"----- {log} -----\n{_tail(log, lines)}" for log in logs)
