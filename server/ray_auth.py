"""Ray's token authentication for the Ray clusters cachefs starts or joins.

Ray (2.52+) guards its control plane with a bearer token when `RAY_AUTH_MODE=token`.
Since 2.59 a local `ray.init()` turns that on by itself and writes `~/.ray/auth_token`;
from then on `ray start --head` requires the token as well, while `ray.init(address=...)`
sends it only when `RAY_AUTH_MODE=token` is set. Left to those guesses, a user who once
ran Ray Data locally gets a head that wants a token and a driver that sends none.

So cachefs decides the mode once (`RayAuth.decide`), starts Ray with it, connects with it,
and records it in the cluster file so that `down` and the next `up` connect the same way.
Token auth is the default for a cluster cachefs starts; `RAY_AUTH_MODE=disabled` opts out.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

from cachefs.common.errors import ConfigError

TOKEN = "token"
DISABLED = "disabled"
MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"


def default_token_path(env: Mapping[str, str]) -> Path:
    """Where Ray looks for its token when nothing else says: ~/.ray/auth_token."""
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".ray" / "auth_token"


def _token_path(env: Mapping[str, str]) -> Path:
    return Path(env[TOKEN_PATH_VAR]) if env.get(TOKEN_PATH_VAR) else default_token_path(env)


def token_available(env: Mapping[str, str]) -> bool:
    if env.get(TOKEN_VAR):
        return True
    path = _token_path(env)
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _write_token(path: Path) -> None:
    """A new random token, readable by its owner only (Ray's own file is 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


@dataclass(frozen=True)
class RayAuth:
    """How cachefs's own processes talk to Ray: the mode, and where the token is."""

    mode: str
    token_path: str = ""  # empty in token mode when RAY_AUTH_TOKEN carries the token itself

    @classmethod
    def decide(cls, env: Mapping[str, str], *, starting: bool, recorded: str = "") -> "RayAuth":
        """The mode for a cluster we start (`starting`) or join.

        `RAY_AUTH_MODE` wins when set. Otherwise a cluster we start uses tokens (a token
        is created if there is none), a cluster we started before uses what we recorded,
        and a cluster we join gets the token when one exists: a cluster without auth
        ignores it, a cluster with auth needs it.
        """
        explicit = (env.get(MODE_VAR) or "").strip().lower()
        if explicit and explicit not in (TOKEN, DISABLED):
            raise ConfigError(f"{MODE_VAR}={env[MODE_VAR]!r} is not a Ray auth mode: use 'token' or 'disabled'")
        mode = explicit or recorded or (TOKEN if starting or token_available(env) else DISABLED)
        if mode == DISABLED:
            return cls(DISABLED)
        if env.get(TOKEN_VAR):
            return cls(TOKEN)
        path = _token_path(env)
        if not token_available(env):
            if not starting:
                raise ConfigError(
                    f"Ray token authentication is on ({MODE_VAR}=token) but there is no token: put the "
                    f"cluster's token in {path} or in {TOKEN_VAR} (`ray get-auth-token` prints it on the head)")
            if env.get(TOKEN_PATH_VAR):
                raise ConfigError(f"{TOKEN_PATH_VAR} names {path}, which holds no token; write one there "
                                  f"or unset {TOKEN_PATH_VAR} to use {default_token_path(env)}")
            _write_token(path)
        return cls(TOKEN, str(path))

    def env(self) -> dict[str, str]:
        """The variables every Ray process we start, and our own driver, must see."""
        out = {MODE_VAR: self.mode}
        if self.token_path:
            out[TOKEN_PATH_VAR] = self.token_path
        return out

    def apply(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Make this process connect in this mode (before `ray.init`): Ray reads it from the
        environment, and caches its config and token, which are refreshed here."""
        environ.update(self.env())
        if environ is not os.environ:
            return
        try:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except (ImportError, AttributeError):  # an older Ray without token auth: nothing cached
            pass
