"""A tiny control channel of a running daemon: a unix socket STORE/control.sock.

Protocol: the client sends one line, the daemon answers one line.
    sync\n   -> "ok\n" once every closed file is sealed and LMDB is flushed; "staged N\n"
                 when N closed files could not be sealed (a full disk; their staging
                 files are fsync'd: durable, sealed once there is room)
    ping\n   -> "pong <pid>\n"
    mend <chunk id, hex>\n -> "ok <streams mended, comma-separated, or ->\n" (online scrub:
                 a protected chunk's damaged streams rebuilt from their parity, written back)
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from .errors import DaemonGoneError

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

SOCKET = "control.sock"


async def serve_control(root: str, ops) -> None:
    """Accept control connections until cancelled."""
    import trio  # the daemon's side only: `elvesfs sync` (request) starts without it

    path = os.path.join(root, SOCKET)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    listener = trio.SocketListener(sock)
    try:
        await trio.serve_listeners(lambda s: _handle(s, ops), [listener])
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _handle(stream: "trio.SocketStream", ops) -> None:
    async with stream:
        data = b""
        while not data.endswith(b"\n") and len(data) < 256:
            chunk = await stream.receive_some(256)
            if not chunk:
                return
            data += chunk
        cmd = data.strip().decode(errors="replace")
        if cmd == "sync":
            unsealed = await ops.life.wait_idle()
            await stream.send_all(f"staged {len(unsealed)}\n".encode() if unsealed else b"ok\n")
        elif cmd.startswith("mend "):
            try:
                cid = bytes.fromhex(cmd[5:])
            except ValueError:
                cid = b""
            if len(cid) != 16:
                await stream.send_all(b"error mend takes a 32-digit hex chunk id\n")
                return
            names = await ops.mend(cid)
            await stream.send_all(f"ok {','.join(names) or '-'}\n".encode())
        elif cmd == "ping":
            await stream.send_all(f"pong {os.getpid()}\n".encode())
        else:
            await stream.send_all(f"error unknown command {cmd!r}\n".encode())


def request(root: str, cmd: str, timeout: float | None = None) -> str:
    """Send one command to the daemon of `root` and return its answer (blocking client)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.path.join(root, SOCKET))
        except (ConnectionRefusedError, FileNotFoundError):
            raise DaemonGoneError(
                f"the elvesfs daemon of store {root} is not running (killed or crashed: "
                f"see {os.path.join(root, 'elvesfs.log')})") from None
        s.sendall(cmd.encode() + b"\n")
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
        return out.decode().strip()
    finally:
        s.close()
