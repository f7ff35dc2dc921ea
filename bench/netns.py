"""Two hosts on one machine: Linux network namespaces joined by a veth pair.

Each namespace has its own network stack and loopback, so two processes in different namespaces reach each other
only over the link, through the kernel's real TCP/IP, and the link's counters (/sys/class/net/DEV/statistics)
count every byte that crosses it. Used by tests/test_distributed.py (torchrun across two hosts) and
bench/wire_bytes.py (bytes on the wire per MeZO step). Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


class HostsUnavailable(RuntimeError):
    """The namespaces could not be made here (not root, no iproute2, or the kernel refused); says why."""


@dataclass(frozen=True)
class Host:
    namespace: str
    device: str  # this host's end of the veth pair
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def counters(self) -> dict[str, int]:
        """tx/rx bytes and packets of this host's end of the link, since it was made."""
        out = {}
        for name in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
            done = subprocess.run(self.command(["cat", f"/sys/class/net/{self.device}/statistics/{name}"]),
                                  capture_output=True, text=True, check=True)
            out[name] = int(done.stdout)
        return out


@contextlib.contextmanager
def two_hosts(subnet: str = "10.77.0") -> Iterator[tuple[Host, Host]]:
    """Hosts SUBNET.1 and SUBNET.2, removed again on exit. Raises HostsUnavailable where they cannot be made."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise HostsUnavailable("network namespaces need root and iproute2")
    tag = f"ez{os.getpid() % 100000}"
    hosts = (Host(f"{tag}a", f"{tag}va", f"{subnet}.1"), Host(f"{tag}b", f"{tag}vb", f"{subnet}.2"))
    setup = [["ip", "netns", "add", hosts[0].namespace], ["ip", "netns", "add", hosts[1].namespace],
             ["ip", "link", "add", hosts[0].device, "type", "veth", "peer", "name", hosts[1].device]]
    for h in hosts:
        setup += [["ip", "link", "set", h.device, "netns", h.namespace],
                  ["ip", "-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", h.device],
                  ["ip", "-n", h.namespace, "link", "set", h.device, "up"],
                  ["ip", "-n", h.namespace, "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise HostsUnavailable(f"{' '.join(cmd)}: {done.stderr.strip()}")
        yield hosts
    finally:
        for h in hosts:  # deleting a namespace removes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", h.namespace], capture_output=True)
