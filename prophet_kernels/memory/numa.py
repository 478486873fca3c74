"""NUMA placement of the host store: on a machine with several NUMA nodes (two-socket servers), each
rank's experts are placed on the node its GPU hangs off, so that every copy to the GPU reads local
memory instead of crossing the link between the sockets.

The store's pinned memory is allocated, then ``mbind``-ed (MPOL_PREFERRED: the kernel falls back to
another node rather than fail when the node is full) before ``cudaHostRegister`` touches and locks
its pages (``store.pinned_empty``). A GPU's node is its PCI device's ``numa_node`` in sysfs (as
``torch.numa`` reads it). On a single-node machine nothing is done. ``prophet info`` prints the
nodes and each GPU's node. With ``miss: cpu`` the CPU pool's threads run on the store node's cores
(``compute_cpus``): the copies and the CPU both read local memory (the other socket's cores stay
idle for Prophet; a store split over the nodes is not built).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import torch

SYSFS = Path("/sys")
MPOL_PREFERRED = 1
MPOL_MF_MOVE = 2  # move pages already placed elsewhere (none yet, in the store's case)
_MBIND_SYSCALL = {"x86_64": 237, "aarch64": 235, "ppc64le": 259}


def parse_list(text: str) -> list[int]:
    """A sysfs list such as ``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11]."""
    out = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    return out


def online_nodes(sysfs: Path = SYSFS) -> list[int]:
    """The online NUMA nodes ([0] where the kernel has no NUMA support or sysfs says nothing)."""
    try:
        return parse_list((Path(sysfs) / "devices/system/node/online").read_text()) or [0]
    except OSError:
        return [0]


def node_cpus(node: int, sysfs: Path = SYSFS) -> list[int]:
    try:
        return parse_list((Path(sysfs) / f"devices/system/node/node{node}/cpulist").read_text())
    except OSError:
        return []


def pci_node(pci_address: str, sysfs: Path = SYSFS) -> int | None:
    """The NUMA node of a PCI device (``0000:1b:00.0``), None where sysfs does not say (-1)."""
    try:
        node = int((Path(sysfs) / "bus/pci/devices" / pci_address.lower() / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def device_node(index: int, sysfs: Path = SYSFS) -> int | None:
    """The NUMA node CUDA device ``index`` is attached to, None if unknown."""
    p = torch.cuda.get_device_properties(index)
    try:
        address = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except AttributeError:  # an older torch without the PCI ids
        return None
    return pci_node(address, sysfs)


@functools.cache
def store_node() -> int | None:
    """The node this process's host store goes on: its current GPU's, where the machine has several
    nodes; None (no placement) on one node, without CUDA, or where the GPU's node is unknown."""
    if not torch.cuda.is_available() or len(online_nodes()) < 2:
        return None
    return device_node(torch.cuda.current_device())


def compute_cpus() -> list[int] | None:
    """The CPUs that compute experts on the host (``miss: cpu``): the store node's that this process
    may use, so that the CPU reads the experts where they live; None (any) on one node or where the
    node is unknown or has none of this process's CPUs."""
    node = store_node()
    if node is None:
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cpus = [c for c in node_cpus(node) if c in mine]
    return cpus or None


def prefer_node(t: torch.Tensor, node: int) -> bool:
    """Asks the kernel to place the pages of host tensor ``t`` on ``node`` (``mbind`` with
    MPOL_PREFERRED over the pages it spans); call it before the memory is first touched. True if the
    kernel took it; False where this platform's mbind is unknown to Prophet or the call failed (the
    memory then stays where the kernel puts it: a slower copy, never an error)."""
    number = _MBIND_SYSCALL.get(platform.machine())
    if number is None or not 0 <= node < 63 or t.device.type != "cpu" or t.nbytes == 0:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.nbytes) // page) * page
    mask = ctypes.c_ulong(1 << node)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(ctypes.c_long(number), ctypes.c_void_p(start), ctypes.c_ulong(end - start),
                      ctypes.c_int(MPOL_PREFERRED), ctypes.byref(mask), ctypes.c_ulong(64), ctypes.c_uint(MPOL_MF_MOVE))
    return rc == 0


def describe(sysfs: Path = SYSFS) -> list[str]:
    """Lines for ``prophet info``: the nodes with their CPUs, and each GPU's node."""
    nodes = online_nodes(sysfs)
    lines = [f"NUMA: {len(nodes)} node{'s' if len(nodes) > 1 else ''} ("
             + ", ".join(f"node {n}: CPUs {_ranges(node_cpus(n, sysfs))}" for n in nodes) + ")"
             + ("; the host store is placed on its GPU's node" if len(nodes) > 1
                else "; one node: the host store needs no placement")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            node = device_node(i, sysfs)
            lines.append(f"  cuda:{i} ({torch.cuda.get_device_name(i)}): NUMA node "
                         f"{'unknown' if node is None else node}")
    return lines


def _ranges(cpus: list[int]) -> str:
    if not cpus:
        return "unknown"
    out, start = [], cpus[0]
    for prev, cur in zip(cpus, cpus[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)
