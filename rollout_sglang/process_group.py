"""A standalone torch.distributed process group, created exactly the way SGLang creates its side.

SGLang's ``/init_weights_update_group`` builds its group with a TCPStore rendezvous on
``tcp://master_address:master_port``, wraps the store in ``PrefixStore(group_name, store)`` and calls
``_new_process_group_helper`` — without touching the default (WORLD) group. The trainer's side must
be built the same way (same prefix, same rank numbering) or both sides wait for each other forever.
The trainer is rank 0 (it hosts the TCPStore); server ranks are ``rank_offset + tp_rank``.

The store a process hosts (:func:`create_store`) listens on the loopback interface only when its
address is a loopback one: torch's own TCPStore server binds every interface whatever host it is given,
which would expose the store (an unauthenticated key-value server) on the network for a run that never
leaves the machine.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import PrefixStore
from torch.distributed.distributed_c10d import _new_process_group_helper, _world


def loopback_address(host: str) -> str | None:
    """The loopback IP to bind for ``host`` ("localhost", 127.x.y.z, ::1), or None when ``host`` is not a
    loopback address (then the store must be reachable from other machines)."""
    if host.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:  # a host name other than localhost: not known to be loopback
        return None
    return str(address) if address.is_loopback else None


def create_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore at ``host:port``: the server when ``is_master`` (``port`` 0: a free one, read back from
    ``.port``), else a client. A server for a loopback ``host`` listens on that address only (a socket
    bound here and handed over through ``master_listen_fd``); any other host keeps torch's behaviour."""
    bind = loopback_address(host) if is_master else None
    if bind is None:
        return dist.TCPStore(host, port, world_size, is_master, timeout, multi_tenant=True)  # as tcp:// rendezvous
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the store owns the descriptor from here on (it closes it when destroyed)
    try:
        return dist.TCPStore(bind, port, world_size, True, timeout, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def init_custom_process_group(
    *,
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the group ``group_name``; blocks until all ranks arrive."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl'; got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    timeout = timedelta(seconds=timeout_s)
    # Not torch's tcp:// rendezvous: it binds every interface, and under torchrun (TORCHELASTIC_USE_AGENT_STORE)
    # it makes rank 0 a client of a store nobody hosts. Rank 0 hosts the store here, as SGLang expects.
    store = create_store(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group = _new_process_group_helper(
        world_size, rank, [], backend, store, group_name=group_name, timeout=timeout,
    )
    if isinstance(group, tuple):  # torch >= 2.6 returns (group, store)
        group = group[0]
    # Collectives translate "global" ranks through this table; this group has its own numbering.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Release a group made by :func:`init_custom_process_group`."""
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError, AssertionError):
        # destroy_process_group insists on a default group in some torch versions; drop our entries.
        _world.pg_group_ranks.pop(group, None)
        _world.pg_map.pop(group, None)
        _world.pg_names.pop(group, None)
