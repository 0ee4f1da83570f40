"""The local user behind a loopback TCP connection (Linux ``sock_diag`` netlink).

Anonymous loopback connections all come from 127.0.0.1, so the peer address cannot tell
one local tenant from another. The kernel knows which user owns the client's socket: one
exact ``SOCK_DIAG_BY_FAMILY`` lookup of the client's 4-tuple answers it without a
privilege and without scanning ``/proc/net/tcp``. ``max_connections_per_subject`` then
counts anonymous loopback connections per local user ("anonymous@uid:1000").

Anything unexpected (another OS, no netlink, the socket already gone) returns None and the
caller falls back to the peer address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr
_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 up to its sockid
_SOCKID = struct.Struct(">HH16s16s")  # sport, dport (big-endian), src, dst
_TAIL = struct.Struct("=III")  # sockid's if, cookie[2]
_UID_OFFSET = _NLMSG.size + 4 + 48 + 12  # inet_diag_msg: family..retrans, id, 3 u32, uid


def _packed(ip: str) -> tuple[int, bytes]:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return socket.AF_INET, addr.packed + bytes(12)
    return socket.AF_INET6, addr.packed


def peer_uid(peer: tuple[str, int], local: tuple[str, int], timeout: float = 0.05) -> int | None:
    """The uid owning the TCP socket ``peer`` -> ``local`` on this host, or None."""
    try:
        family, src = _packed(peer[0])
        family2, dst = _packed(local[0])
    except ValueError:
        return None
    if family != family2:
        return None
    req = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        + _SOCKID.pack(peer[1], local[1], src, dst)
        + _TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    msg = _NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
            s.settimeout(timeout)
            s.sendto(msg, (0, 0))
            data = s.recv(8192)
    except (OSError, AttributeError):  # no AF_NETLINK (not Linux), EPERM, timeout
        return None
    if len(data) < _UID_OFFSET + 4:
        return None
    _length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data)
    if mtype != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (it closed meanwhile)
    uid: int = struct.unpack_from("=I", data, _UID_OFFSET)[0]
    return uid
