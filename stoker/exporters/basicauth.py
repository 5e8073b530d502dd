"""Basic auth for /metrics: the scraper stays fast and answered while others guess.

bcrypt is slow by design (tens of ms a check). Without limits, every login that
waits for it holds a connection: 260 clients sending wrong passwords held all
256 connection slots, and the authorised scraper got 1 answer out of 80 (0 out
of 29 when the agent had just restarted and had to check its password too). So:

- only verified (user, password) pairs are remembered: each user has one
  password, so the cache is as small as the user list and no stream of wrong
  guesses can evict the scraper's entry; a cached scrape never touches bcrypt;
- an unknown user costs the same bcrypt work as a known one (the password is
  checked against a dummy hash of the same cost), so user names cannot be found
  by timing;
- one check runs at a time (as in exporter-toolkit), in a thread off the event
  loop: failing logins cost the node at most one core, which the training
  job's data loaders need more;
- at most `QUEUE` logins wait for it, and at most one from each source address
  (an IPv6 /64 counts as one): a client that already has a login waiting, or
  has spent its budget of failures, is answered 429 at once, without bcrypt.
  Connections held by logins are so bounded, and an address's turn comes after
  at most one check of each other address. When the queue is full, a newcomer
  takes the place of the waiting login whose address has failed the most (the
  scraper, which does not fail, is the last to be turned away); otherwise 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import bcrypt

QUEUE = 16
"""Logins waiting for bcrypt, all clients together: about a second of work at cost 10."""
BCRYPT_MAX_BYTES = 72
"""bcrypt reads 72 bytes of a password; bcrypt 5 raises on longer ones instead of ignoring the rest."""
FAILURES_BURST = 10
FAILURES_PER_SECOND = 0.2
"""An address may fail 10 logins in a row, then one every 5 s: a person mistyping or a Prometheus with
an old password (a failure per scrape) never notices; a guesser gets 0.2 bcrypt checks a second."""
ADDRESSES = 4096
"""Addresses whose failures are remembered (the least recently failed are forgotten beyond)."""

OK, DENIED, TOO_MANY = 200, 401, 429


class Failures:
    """Per-address budget of failed logins: a token bucket that only failures draw from."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._left: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (budget left, when)

    def left(self, address: str) -> float:
        budget, when = self._left.get(address, (FAILURES_BURST, 0.0))
        return min(FAILURES_BURST, budget + (self._clock() - when) * FAILURES_PER_SECOND)

    def failed(self, address: str) -> None:
        budget = self.left(address) - 1
        self._left.pop(address, None)
        self._left[address] = (budget, self._clock())
        if len(self._left) > ADDRESSES:
            self._left.popitem(last=False)


@dataclass(eq=False)
class _Login:
    address: str
    user: str
    password: bytes
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """True or False once checked, None if turned away for a newcomer."""


class Logins:
    """Checks Basic credentials against `users` (name -> bcrypt hash); `dummy` is a hash as costly
    as the costliest user's, for unknown users."""

    def __init__(self, users: dict[str, bytes], dummy: bytes, clock=time.monotonic):
        self._users = users
        self._dummy = dummy
        self._verified: set[tuple[str, bytes]] = set()
        self._failures = Failures(clock)
        self._queue: list[_Login] = []  # in arrival order; the one being checked is not in it
        self._waiting: set[str] = set()  # addresses with a login queued or being checked
        self._worker: asyncio.Task | None = None
        self._closed = False

    def close(self) -> None:
        """Turn away every login still waiting, and any that comes (the server is stopping); the one
        in bcrypt finishes in its thread, alone."""
        self._closed = True
        for login in self._queue:
            login.outcome.set_result(None)
        self._queue.clear()

    async def check(self, address: str, header: str) -> int:
        """OK, DENIED (no or wrong credentials) or TOO_MANY (not checked: try again later)."""
        found = credentials(header)
        if found is None:
            return DENIED  # no user name, so nothing to hide by spending bcrypt on it
        key = (found[0], hashlib.sha256(found[1]).digest())
        if key in self._verified:
            return OK
        address = _source(address)
        if (self._closed or address in self._waiting or self._failures.left(address) < 1
                or not self._make_room(address)):
            return TOO_MANY
        login = _Login(address, *found)
        self._queue.append(login)
        self._waiting.add(address)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        try:
            matches = await login.outcome
        finally:
            self._waiting.discard(address)
            if login in self._queue:  # its client went away (or the server is stopping)
                self._queue.remove(login)
        if matches is None:
            return TOO_MANY
        if matches:
            self._verified.add(key)
            return OK
        self._failures.failed(address)
        return DENIED

    def _make_room(self, address: str) -> bool:
        if len(self._queue) < QUEUE:
            return True
        worst = min(self._queue, key=lambda login: self._failures.left(login.address))
        if self._failures.left(worst.address) >= self._failures.left(address):
            return False
        self._queue.remove(worst)
        worst.outcome.set_result(None)
        return True

    async def _work(self) -> None:
        while self._queue:
            login = self._queue.pop(0)
            matches = await asyncio.to_thread(self._bcrypt, login.user, login.password)
            if not login.outcome.done():
                login.outcome.set_result(matches)

    def _bcrypt(self, user: str, password: bytes) -> bool:
        hashed = self._users.get(user)
        matches = bcrypt.checkpw(password, hashed if hashed is not None else self._dummy)
        return matches and hashed is not None


def _source(address: str | None) -> str:
    """The client's address as one budget: an IPv6 /64 is one host's (SLAAC hands a host a whole /64)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def credentials(header: str) -> tuple[str, bytes] | None:
    """User and password of a Basic Authorization header (the password cut to what bcrypt reads),
    or None when there is none."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        if not sep:
            return None
        return user.decode(), password[:BCRYPT_MAX_BYTES]
    except (binascii.Error, UnicodeDecodeError):
        return None
