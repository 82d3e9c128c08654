"""Passwords and session cookies of the worklist, with the standard library only.

Passwords are stored as `scrypt$N$r$p$<salt>$<hash>` (base64 salt and hash, 16-byte random salt per
user), so the cost can be raised later without breaking stored hashes. Session cookies are
`<user id>.<session generation>.<issued at>.<seen at>.<HMAC-SHA256>` signed with
`Settings.web_secret_key`; the user is looked up on every request and the generation compared, so
logout, a password change or disabling a user ends their sessions at once. CSRF tokens are the HMAC
of a random per-browser cookie. `LoginThrottle` slows password guessing down.

Nothing here imports FastAPI, so the `gatekeeper users` command stays light.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from service.settings import Settings

log = logging.getLogger(__name__)

# scrypt cost: N=2**14, r=8 takes 16 MiB and about 50 ms per check on one core.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_LENGTH = 8
MIN_SECRET_KEY_LENGTH = 32


class InsecureSettings(Exception):
    """The settings would make the web app unsafe (e.g. no secret key outside development)."""


def hash_password(password: str) -> str:
    """Return the salted scrypt hash of `password`, in the stored `scrypt$N$r$p$salt$hash` form.

    Raises:
        ValueError: the password is shorter than MIN_PASSWORD_LENGTH characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password has {len(password)} characters; expected at least {MIN_PASSWORD_LENGTH}")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches the `stored` hash; a malformed stored hash never matches."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, _unb64(expected))


def dummy_password_check(password: str) -> None:
    """Spend the time of one password check, so an unknown user name takes as long as a known one."""
    _scrypt(password, b"\0" * SALT_BYTES, SCRYPT_N, SCRYPT_R, SCRYPT_P)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=HASH_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_development(settings: Settings) -> bool:
    """True for the embedded single-machine setup (SQLite database), the only place defaults may be weak."""
    return make_url(settings.database_url).get_backend_name() == "sqlite"


def session_secret(settings: Settings) -> bytes:
    """The key that signs session cookies.

    With `web_secret_key` empty, the embedded development setup (SQLite) gets a random key made for
    this process (logins end when it restarts); any other setup refuses.

    Raises:
        InsecureSettings: no key is set outside development, or the key is too short.
    """
    key = settings.web_secret_key.get_secret_value()
    if key:
        if len(key) < MIN_SECRET_KEY_LENGTH:
            raise InsecureSettings(
                f"GATEKEEPER_WEB_SECRET_KEY has {len(key)} characters; expected at least "
                f"{MIN_SECRET_KEY_LENGTH} (e.g. `openssl rand -hex 32`)"
            )
        return key.encode("utf-8")
    if not is_development(settings):
        raise InsecureSettings(
            "GATEKEEPER_WEB_SECRET_KEY is empty; it must be set when the database is not the "
            "embedded SQLite one (e.g. `openssl rand -hex 32`)"
        )
    log.warning(
        "GATEKEEPER_WEB_SECRET_KEY is empty: using a random key for this process (development only; "
        "logins end on restart)"
    )
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class SessionClaims:
    """What a valid session cookie says: who, which of their session generations, issued and last seen when."""

    user_id: int
    generation: int
    issued_at: int  # unix seconds of the login
    seen_at: int  # unix seconds of the last request that refreshed the cookie


@dataclass(frozen=True)
class SessionSigner:
    """Makes and checks session cookie values and CSRF tokens.

    A cookie is `<user id>.<session generation>.<issued at>.<seen at>.<HMAC-SHA256>`. It opens a
    session while it is at most `max_age_s` seconds old, was seen at most `idle_s` seconds ago, and
    its generation equals the user's `session_generation` (checked by the caller against the
    database; raised on logout, password change and disable).
    """

    secret: bytes
    max_age_s: float
    idle_s: float

    def sign(self, user_id: int, generation: int, *, issued_at: float | None = None, now: float | None = None) -> str:
        """The cookie value for `user_id` at `generation`, issued at `issued_at` (default `now`) and seen `now`."""
        seen = int(now if now is not None else time.time())
        issued = int(issued_at) if issued_at is not None else seen
        payload = f"{int(user_id)}.{int(generation)}.{issued}.{seen}"
        return f"{payload}.{self._mac(payload)}"

    def read(self, value: str, *, now: float | None = None) -> SessionClaims | None:
        """The claims of a cookie value, or None when it is malformed, forged, expired or idle too long."""
        try:
            user_id, generation, issued, seen, mac = value.split(".")
            payload = f"{user_id}.{generation}.{issued}.{seen}"
            if not hmac.compare_digest(mac, self._mac(payload)):
                return None
            claims = SessionClaims(int(user_id), int(generation), int(issued), int(seen))
        except ValueError:
            return None
        current = now if now is not None else time.time()
        if not 0 <= current - claims.issued_at <= self.max_age_s:
            return None
        if not claims.issued_at <= claims.seen_at or not current - claims.seen_at <= self.idle_s:
            return None
        return claims

    def csrf_token(self, nonce: str) -> str:
        """The CSRF token that goes with the browser's CSRF cookie `nonce` (a form field or header)."""
        return self._mac(f"csrf.{nonce}")

    def csrf_matches(self, nonce: str | None, token: str | None) -> bool:
        """Whether `token` is the CSRF token of the cookie `nonce` (both present; constant-time)."""
        if not nonce or not token:
            return False
        return hmac.compare_digest(token.encode("ascii", "replace"), self.csrf_token(nonce).encode("ascii"))

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, payload.encode("ascii"), hashlib.sha256).digest())


def new_csrf_nonce() -> str:
    """A fresh random value for a browser's CSRF cookie."""
    return secrets.token_urlsafe(24)


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class LoginThrottle:
    """Exponential back-off of password guessing, per user name and per client address.

    Every attempt counts as a failure until `succeeded` clears it, so parallel guesses are counted
    too. After `free_failures` in a row, a name or address is locked for `lockout_s` seconds, and
    each further failure doubles that, up to `lockout_max_s`. `clock` (monotonic seconds) is an
    argument so that tests need no waiting. Held in memory: one web process, reset on restart.
    """

    #: Past this many tracked names and addresses, those idle for `lockout_max_s` are forgotten.
    MAX_ENTRIES = 10_000

    def __init__(
        self,
        *,
        free_failures: int,
        lockout_s: float,
        lockout_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if free_failures < 1 or lockout_s <= 0 or lockout_max_s < lockout_s:
            raise ValueError(
                f"free_failures {free_failures}, lockout_s {lockout_s}, lockout_max_s {lockout_max_s}: "
                "expected free_failures >= 1 and 0 < lockout_s <= lockout_max_s"
            )
        self.free_failures = free_failures
        self.lockout_s = lockout_s
        self.lockout_max_s = lockout_max_s
        self.clock = clock
        self._entries: dict[tuple[str, str], _Failures] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> LoginThrottle:
        return cls(
            free_failures=settings.web_login_free_failures,
            lockout_s=settings.web_login_lockout_s,
            lockout_max_s=settings.web_login_lockout_max_s,
            clock=clock,
        )

    def attempt(self, *, name: str, address: str) -> float:
        """Record a login attempt: 0.0 when it may go ahead, else the seconds to wait (nothing recorded)."""
        keys = self._keys(name, address)
        with self._lock:
            now = self.clock()
            wait = max((self._entries[k].locked_until - now for k in keys if k in self._entries), default=0.0)
            if wait > 0:
                return wait
            if len(self._entries) > self.MAX_ENTRIES:
                self._forget_idle(now)
            for key in keys:
                entry = self._entries.setdefault(key, _Failures())
                entry.count += 1
                entry.last = now
                if entry.count >= self.free_failures:
                    extra = entry.count - self.free_failures
                    entry.locked_until = now + min(self.lockout_max_s, self.lockout_s * 2.0 ** min(extra, 32))
            return 0.0

    def succeeded(self, *, name: str, address: str) -> None:
        """The attempt just recorded was a good password: clear the counts of its name and address."""
        with self._lock:
            for key in self._keys(name, address):
                self._entries.pop(key, None)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("name", name.strip().lower()[:128]), ("address", address)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if now - e.last > self.lockout_max_s]:
            del self._entries[key]
