"""Worker for the two-node smoke test: one gloo all_reduce of (rank + 1) over every rank, then one JSON line with
this rank, the world size, the hostname, the address the hostname resolves to and the reduced sum."""

from __future__ import annotations

import json
import sys
import os
import socket

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    host = socket.gethostname()
    line = json.dumps({"rank": rank, "world": world, "host": host, "address": socket.gethostbyname(host),
                       "sum": value.item()}) + "\n"
    # one write of the whole line (print may write text and newline separately: the node's ranks share one pipe)
    os.write(sys.stdout.fileno(), line.encode())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
