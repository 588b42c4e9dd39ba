"""The NBD protocol, written once: negotiation, requests, replies, errors.

Two data ends use it, as nbdkit's plugins use its server core:

- :mod:`writer.nbd` (``vmafs backup``): write-only exports that feed a packer;
- :mod:`vmafs.serve` (``vmafs serve``, ``vmafs restore --live``): read-only
  exports of an archive's disks, with holes and block status.

A data end subclasses :class:`Export` and overrides what it can do; the
server (:class:`NbdServer`) owns sockets, TLS, the handshake, request
validation and reply framing, so a data end only ever sees well-formed,
in-range, aligned requests.  A data end whose bytes lie in a file as they
are may answer reads with :class:`FileRange` parts: the server sends them
with sendfile (:mod:`.filesend`), never copying them.  docs/serve.md is the user's reference for
what each option and command does.
"""

from .server import Export, FileRange, NbdCommandError, NbdServer, ReadChunk, WouldWait

__all__ = ["Export", "FileRange", "NbdCommandError", "NbdServer", "ReadChunk", "WouldWait"]
