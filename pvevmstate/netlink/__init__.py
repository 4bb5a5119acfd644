"""ctnetlink: the attribute table of a conntrack entry (:mod:`.schema`) and the
message codec derived from it (:mod:`.codec`); pure, no sockets. The socket
adapter is :mod:`pvevmstate.netlink.conntrack`.
"""

from .codec import (
    DEFAULT_LAYOUTS,
    MAX_LAYOUTS,
    MAX_LAYOUTS_PER_KEY,
    TCP_FLAG_BE_LIBERAL,
    TCP_FLAG_CLOSE_INIT,
    TCP_FLAG_SACK_PERM,
    DumpChunk,
    LayoutCache,
    body_layout,
    create_batch,
    create_body,
    create_request,
    create_request_general,
    create_requests,
    decode_dump,
    decode_entry,
    decode_message,
    decode_stats,
    dump_request,
    get_request,
    iter_acks,
    iter_get_replies,
    stats_request,
    tcp_flags,
)
from .schema import *  # noqa: F403  (the kernel's NETLINK_*, NLM_*, IPCTNL_*, CTA_* numbers)
from .schema import TABLE, Leaf, Nest

__all__ = [
    "DEFAULT_LAYOUTS",
    "MAX_LAYOUTS",
    "MAX_LAYOUTS_PER_KEY",
    "TABLE",
    "TCP_FLAG_BE_LIBERAL",
    "TCP_FLAG_CLOSE_INIT",
    "TCP_FLAG_SACK_PERM",
    "DumpChunk",
    "LayoutCache",
    "Leaf",
    "Nest",
    "body_layout",
    "create_batch",
    "create_body",
    "create_request",
    "create_request_general",
    "create_requests",
    "decode_dump",
    "decode_entry",
    "decode_message",
    "decode_stats",
    "dump_request",
    "get_request",
    "iter_acks",
    "iter_get_replies",
    "stats_request",
    "tcp_flags",
]
