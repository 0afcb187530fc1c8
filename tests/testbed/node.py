"""A real node for the testbed: a kubelet on containerd and runc, registered with the testbed's API server.

kwok nodes fake the pod lifecycle for scale tests; pods that must really run (the project's image, the
injected sidecar, the chart's operator) go to this node. It is tainted, so only pods that tolerate
`REAL_NODE_TAINT` land on it. Images are imported into its containerd, never pulled: nothing here reaches
a registry. Pods use the host's network (`hostNetwork: true`), because the control plane and the S3
server listen on loopback; the CNI bridge config exists so that containerd reports its network ready,
and a pod without hostNetwork gets its own network namespace on that bridge.

Everything the node writes lives under `<testbed workdir>/node/`, and `stop()` removes its containers,
shims and mounts, so the machine is left as it was found.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import BuildFailed, apt_install, cache_root
from .cluster import Testbed, TestbedError, free_ports, wait_for, write_kubeconfig

NODE_NAME = "sluicegate-node"
# Pods for the real node tolerate this taint and select this label.
REAL_NODE_LABEL = "testbed.sluicegate.io/node"
REAL_NODE_TAINT = "testbed.sluicegate.io/real"
PAUSE_IMAGE = "localhost/testbed/pause:3.10"
PAUSE_SOURCE = "k8s.io/kubernetes/build/pause/linux/pause.c"
CRI_NAMESPACE = "k8s.io"
BRIDGE = "sgtestbed0"
RUNC_CANDIDATES = ("/usr/sbin/runc", "/usr/bin/runc")
START_TIMEOUT_S = 120.0
# The kubelet's log lines that say why pods on the node stopped (see RealNode.health).
TELLING = re.compile(r"(?i)evict|pressure|reject|SyncLoop (DELETE|REMOVE)")
# Every signal the kubelet evicts on by default or derives thresholds for.
EVICTION_SIGNALS = (
    "memory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
    "pid.available",
)
# The kubelet's tolerations/selector a pod needs to run here; merged into pod specs by tests.
REAL_NODE_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {REAL_NODE_LABEL: "real"},
    "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
}


def _log(message: str) -> None:
    print(f"[testbed] {message}", flush=True, file=sys.stderr)


def runc_path() -> Path:
    for candidate in RUNC_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    try:
        apt_install("runc")  # Debian's: building runc needs cgo and libseccomp
    except BuildFailed as exc:
        raise TestbedError(str(exc)) from exc
    return runc_path()


def host_ip() -> str:
    """The address of the interface with the default route: the kubelet refuses a loopback node IP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        # connect() on UDP sends nothing; it only picks the source address the kernel would use.
        probe.connect(("192.0.2.254", 9))
        address: str = probe.getsockname()[0]
    if address.startswith("127."):
        raise TestbedError("no network interface besides loopback: the kubelet needs a node IP")
    return address


# ---- the sandbox (pause) image ---------------------------------------------------------------------------


def _oci_archive(path: Path, ref: str, files: dict[str, bytes], config: dict[str, Any]) -> None:
    """Writes a one-layer OCI image archive that `ctr images import` loads under the name `ref`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    diff = layer.getvalue()
    compressed = gzip.compress(diff, mtime=0)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(diff).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(image_config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(compressed, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    descriptor = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    descriptor["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref}
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    with tarfile.open(path, mode="w") as tar:
        entries = {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps(index).encode(),
            **{f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()},
        }
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def pause_image(kubelet: Path) -> Path:
    """The sandbox image, from Kubernetes' own pause.c (in the module cache of the kubelet's build), built
    with the machine's C compiler into a static binary; cached by the source's digest."""
    gomodcache = subprocess.run(
        ["go", "env", "GOMODCACHE"], check=True, capture_output=True, text=True
    ).stdout.strip()
    version = kubelet.parent.name.split("-")[1]
    source = Path(gomodcache) / f"k8s.io/kubernetes@{version}" / "build/pause/linux/pause.c"
    if not source.is_file():
        raise TestbedError(f"{source} is missing; run `python -m tests.testbed build` to fetch {version}")
    digest = hashlib.sha256(source.read_bytes() + PAUSE_IMAGE.encode()).hexdigest()[:10]
    archive = cache_root() / f"pause-{digest}.tar"
    if archive.is_file():
        return archive
    binary = archive.with_suffix(".bin")
    result = subprocess.run(
        ["cc", "-Os", "-static", "-DVERSION=v3.10-testbed", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise TestbedError(f"compiling {source} failed:\n{result.stderr}")
    staging = archive.with_name(f".{archive.name}.{os.getpid()}")
    _oci_archive(
        staging,
        PAUSE_IMAGE,
        {"pause": binary.read_bytes()},
        {"Entrypoint": ["/pause"], "User": "65535:65535"},
    )
    binary.unlink()
    staging.rename(archive)
    return archive


# ---- the node ------------------------------------------------------------------------------------------


@dataclass
class Ports:
    kubelet: int
    healthz: int


@dataclass
class RealNode:
    """containerd + kubelet for `testbed`, under `testbed.workdir / "node"`."""

    testbed: Testbed
    name: str = NODE_NAME
    node_ip: str = field(default_factory=host_ip)
    # Untainted (make dev-cluster), any pod may land here, as on a one-node cluster.
    tainted: bool = True
    _ports: Ports | None = None

    @property
    def directory(self) -> Path:
        return self.testbed.workdir / "node"

    @property
    def containerd_socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self, images: tuple[Path, ...] = (), timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts containerd, imports `images` (and the pause image), starts the kubelet and returns once
        the node is Ready."""
        if os.geteuid() != 0:
            raise TestbedError("a real node needs root (containerd mounts overlays and creates cgroups)")
        binaries = self.testbed.binaries
        runc = runc_path()
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_containerd_config(runc)
        shim_dir = self.directory / "bin"
        shim_dir.mkdir(exist_ok=True)
        # containerd finds its shim on PATH.
        shim = shim_dir / "containerd-shim-runc-v2"
        shim.unlink(missing_ok=True)
        shim.symlink_to(binaries[shim.name])
        self.testbed.spawn(
            "containerd",
            [f"--config={self.directory / 'containerd.toml'}", "--log-level=warn"],
            env={"PATH": f"{shim_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
        )
        self.testbed.wait("containerd", self.containerd_socket.exists, time.monotonic() + 30)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, timeout_s=30, what="containerd")
        for archive in (pause_image(binaries["kubelet"]), *images):
            self.load_image(archive)
        self._start_kubelet()
        wait_for(self._ready, timeout_s=timeout_s, what=f"node {self.name} Ready")
        _log(f"real node {self.name} ({self.node_ip}) Ready in {time.monotonic() - started:.1f}s")

    def stop(self) -> None:
        """Kubelet first (so it restarts nothing), then every container and shim, then containerd, then
        the mounts the kubelet and containerd made."""
        self.testbed.stop_component("kubelet")
        if self.containerd_socket.exists():
            ids = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in ids:
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
            for task in ids:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.ctr("tasks", "delete", "--force", task, check=False, timeout_s=15)
        self.testbed.stop_component("containerd")
        self._kill_strays()
        self._unmount_all()
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)

    def _kill_strays(self) -> None:
        """Shims (and containers) outlive containerd by design; these are ours by the address they serve."""
        marker = str(self.directory).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)

    def _unmount_all(self) -> None:
        prefix = str(self.directory) + "/"
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)
        ]
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    # ---- configuration -------------------------------------------------------------------------------------

    def _write_containerd_config(self, runc: Path) -> None:
        base = self.directory / "containerd"
        cni_conf = self.directory / "cni"
        cni_conf.mkdir(exist_ok=True)
        cni_bin = self.testbed.binaries["bridge"].parent
        (cni_conf / "10-testbed.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "testbed",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": "10.244.77.0/24"}]],
                                "dataDir": str(self.directory / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        cri = "io.containerd.cri.v1"
        # containerd 2.x configuration (version 3); the cgroupfs driver, as the kubelet is told too.
        (self.directory / "containerd.toml").write_text(
            f"""version = 3
root = "{base / "root"}"
state = "{base / "state"}"

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"

[plugins."{cri}.images"]
  snapshotter = "overlayfs"
  [plugins."{cri}.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."{cri}.runtime"]
  # This machine refuses a negative oom_score_adj even to root, and the kubelet gives pod sandboxes -998;
  # restricted, containerd clamps each container's score to its own.
  restrict_oom_score_adj = true
  [plugins."{cri}.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."{cri}.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."{cri}.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{base / "runc"}"
        SystemdCgroup = false
  [plugins."{cri}.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
"""
        )

    def _start_kubelet(self) -> None:
        ca = self.testbed.ca
        identity = ca.issue(
            f"kubelet-{self.name}",
            f"system:node:{self.name}",
            organizations=("system:nodes",),
            client=True,
        )
        serving = ca.issue(
            f"kubelet-{self.name}-serving",
            f"system:node:{self.name}",
            hosts=(self.node_ip, self.name, "127.0.0.1"),
            server=True,
        )
        kubeconfig = write_kubeconfig(
            self.directory / "kubelet.kubeconfig",
            self.testbed.server,
            ca.cert_path,
            user=f"system:node:{self.name}",
            cert=identity,
        )
        kubelet_port, healthz_port = free_ports(2)
        self._ports = Ports(kubelet_port, healthz_port)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca.cert_path)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(serving.cert),
            "tlsPrivateKeyFile": str(serving.key),
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            # This machine mounts cgroup v1 controllers (a hybrid hierarchy), which the kubelet refuses
            # unless told; cgroupfs because no systemd manages these cgroups.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(self.directory / "pod-logs"),
            # A shared test machine whose disk others fill: evict nothing ("0%" switches a signal off; one
            # left out would get its default) and collect no image.
            "evictionHard": dict.fromkeys(EVICTION_SIGNALS, "0%"),
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 30,
            "shutdownGracePeriod": "0s",
            "serializeImagePulls": False,
        }
        config_path = self.directory / "kubelet.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.testbed.spawn(
            "kubelet",
            [
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.directory / 'kubelet'}",
                f"--cert-dir={self.directory / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}",
                f"--node-labels={REAL_NODE_LABEL}=real",
                *([f"--register-with-taints={REAL_NODE_TAINT}=true:NoSchedule"] if self.tainted else []),
                "--v=1",
            ],
        )

    def _ready(self) -> bool:
        try:
            node = self.testbed.api("GET", f"/api/v1/nodes/{self.name}")
        except TestbedError:
            return False
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
        )

    def health(self) -> str:
        """What the node says of itself, for a failure's message: its conditions and taints, and the
        kubelet's last lines about evicting, rejecting or losing pods."""
        try:
            node = self.testbed.api("GET", f"/api/v1/nodes/{self.name}")
        except TestbedError as exc:
            return f"node {self.name}: {exc}"
        conditions = [
            f"{c['type']}={c['status']} ({c.get('reason', '')}: {c.get('message', '')})"
            for c in node["status"].get("conditions", [])
        ]
        log = self.testbed.log_dir / "kubelet.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        telling = [line for line in lines if TELLING.search(line)]
        return "\n".join(
            [
                f"node {self.name}: {'; '.join(conditions)}; taints {node['spec'].get('taints', [])}",
                *telling[-20:],
            ]
        )

    # ---- operations for tests ------------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [
            str(self.testbed.binaries["ctr"]),
            f"--address={self.containerd_socket}",
            f"--namespace={CRI_NAMESPACE}",
            *args,
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def load_image(self, archive: Path) -> None:
        """Imports an image archive (docker-archive or OCI) into the CRI's namespace, so pods find it with
        imagePullPolicy IfNotPresent or Never."""
        self.ctr("images", "import", str(archive))

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def kill_container(self, container_id: str, signal_name: str = "SIGKILL") -> None:
        """Kills a container's processes through the runtime, as a crash or the OOM killer would; `id` as
        in a pod's containerStatuses (`containerd://...` or bare)."""
        self.ctr("tasks", "kill", "--all", "--signal", signal_name, container_id.rpartition("://")[2])
