"""Passwords and session cookies of the worklist, with the standard library only.

Passwords are stored as `scrypt$N$r$p$<salt>$<hash>` (base64 salt and hash, 16-byte random salt per
user), so the cost can be raised later without breaking stored hashes. Session cookies are
`<user id>.<issued at, unix seconds>.<HMAC-SHA256>` signed with `Settings.web_secret_key`; the user is
looked up on every request, so disabling a user ends their sessions at once.

Nothing here imports FastAPI, so the `gatekeeper users` command stays light.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
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
class SessionSigner:
    """Makes and checks session cookie values: which user logged in, and when.

    `max_age_s` is how long a login lasts, in seconds.
    """

    secret: bytes
    max_age_s: float

    def sign(self, user_id: int, *, now: float | None = None) -> str:
        """The cookie value for `user_id`, issued at `now` (unix seconds; default: the current time)."""
        payload = f"{int(user_id)}.{int(now if now is not None else time.time())}"
        return f"{payload}.{self._mac(payload)}"

    def user_id(self, value: str, *, now: float | None = None) -> int | None:
        """The user id in a cookie value, or None when it is malformed, forged or expired."""
        try:
            user_id, issued, mac = value.split(".")
            payload = f"{user_id}.{issued}"
            if not hmac.compare_digest(mac, self._mac(payload)):
                return None
            age = (now if now is not None else time.time()) - int(issued)
        except ValueError:
            return None
        if not 0 <= age <= self.max_age_s:
            return None
        return int(user_id)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, payload.encode("ascii"), hashlib.sha256).digest())
