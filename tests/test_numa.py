"""NUMA placement of the host store (issue 29, memory/numa.py): sysfs parsing on a made-up two-node
machine, and a real mbind on this machine's memory, read back from /proc/self/numa_maps."""

from pathlib import Path

import pytest
import torch

from prophet_kernels.memory import numa


def _sysfs(root: Path, nodes: dict[int, str], gpus: dict[str, str]) -> Path:
    (root / "devices/system/node").mkdir(parents=True)
    (root / "devices/system/node/online").write_text(",".join(map(str, nodes)) + "\n")
    for n, cpus in nodes.items():
        (root / f"devices/system/node/node{n}").mkdir()
        (root / f"devices/system/node/node{n}/cpulist").write_text(cpus + "\n")
    for address, node in gpus.items():
        (root / "bus/pci/devices" / address).mkdir(parents=True)
        (root / "bus/pci/devices" / address / "numa_node").write_text(node + "\n")
    return root


def test_sysfs_lists_nodes_and_devices(tmp_path):
    assert numa.parse_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11] and numa.parse_list("") == []
    assert numa._ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11" and numa._ranges([]) == "unknown"
    root = _sysfs(tmp_path, {0: "0-15,32-47", 1: "16-31,48-63"}, {"0000:1b:00.0": "0", "0000:db:00.0": "1",
                                                                 "0000:3a:00.0": "-1"})
    assert numa.online_nodes(root) == [0, 1]
    assert numa.node_cpus(1, root) == list(range(16, 32)) + list(range(48, 64))
    assert numa.pci_node("0000:DB:00.0", root) == 1  # (CUDA writes bus ids in upper case)
    assert numa.pci_node("0000:3a:00.0", root) is None  # -1: the platform does not say
    assert numa.pci_node("0000:00:00.0", root) is None  # no such device
    lines = numa.describe(root)
    assert lines[0] == ("NUMA: 2 nodes (node 0: CPUs 0-15,32-47, node 1: CPUs 16-31,48-63); the host store is "
                        "placed on its GPU's node")
    assert numa.online_nodes(tmp_path / "nothing") == [0]  # no NUMA in sysfs: one node
    if not torch.cuda.is_available():
        assert numa.store_node() is None and len(lines) == 1


def test_prefer_node_places_the_pages(tmp_path):
    """A real mbind on this machine (node 0 exists everywhere): the kernel's own record of the memory's
    policy (/proc/self/numa_maps) says prefer:0 over the tensor's pages; a node the machine does not
    have is refused by the kernel (False, memory untouched), never an error."""
    maps = Path("/proc/self/numa_maps")
    if not maps.exists():
        pytest.skip("this kernel has no NUMA support (/proc/self/numa_maps)")
    t = torch.empty(8 << 20, dtype=torch.uint8)
    assert numa.prefer_node(t, 0)
    page = 4096
    lo, hi = t.data_ptr() // page * page, t.data_ptr() + t.nbytes
    spans = []
    for line in maps.read_text().splitlines():
        start = int(line.split()[0], 16)
        if lo <= start < hi:
            spans.append(line.split()[1])
    assert spans and all(policy == "prefer:0" for policy in spans), spans
    absent = max(numa.online_nodes()) + 1
    assert not numa.prefer_node(torch.empty(1 << 20, dtype=torch.uint8), absent)
    assert not numa.prefer_node(torch.empty(0), 0)
