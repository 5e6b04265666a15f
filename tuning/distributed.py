"""Distributed tuning: keras-tuner's chief/worker mode, read from its three variables.

keras-tuner runs a search on several processes (or machines) when every process sets

    KERASTUNER_TUNER_ID     "chief" for the process holding the oracle, "tuner0", "tuner1", ... for workers
    KERASTUNER_ORACLE_IP    the address the chief listens on / the workers connect to
    KERASTUNER_ORACLE_PORT  its port (an integer in 1..65535)

The chief only serves the oracle over gRPC (it trains nothing) and blocks until every trial
has been given out and finished; the workers ask it for trials, train them and report the
objective back. `python -m tuning.search --distributed` reads and checks these variables
with `role_from_env` (so that a typo is a one-line error instead of keras-tuner silently
running a local search, hanging on a wrong address, or taking a worker called "mischief"
for the chief), and only the chief writes `best.json`. See docs/distributed_tuning.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

TUNER_ID = "KERASTUNER_TUNER_ID"
ORACLE_IP = "KERASTUNER_ORACLE_IP"
ORACLE_PORT = "KERASTUNER_ORACLE_PORT"
VARIABLES = (TUNER_ID, ORACLE_IP, ORACLE_PORT)
CHIEF = "chief"

_EXPECTED = {
    TUNER_ID: '"chief" for the oracle process, or a worker id such as "tuner0", "tuner1", ...',
    ORACLE_IP: 'the chief\'s address, e.g. "127.0.0.1", "10.0.0.5" or "[::1]" (the chief may use "0.0.0.0")',
    ORACLE_PORT: 'an integer port in 1..65535, e.g. "8000"',
}
_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's part in a distributed search."""

    tuner_id: str
    ip: str
    port: int

    @property
    def is_chief(self) -> bool:
        return self.tuner_id == CHIEF

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def export(self, environ=None) -> None:
        """Write the checked values back where keras-tuner reads them (`os.environ`)."""
        environ = os.environ if environ is None else environ
        environ[TUNER_ID] = self.tuner_id
        environ[ORACLE_IP] = self.ip
        environ[ORACLE_PORT] = str(self.port)

    @contextlib.contextmanager
    def environment(self):
        """`os.environ` holding this role (keras-tuner reads it when a tuner is built, searches and
        saves), restored afterwards, so that a later search in the same process is a local one again."""
        saved = {name: os.environ.get(name) for name in VARIABLES}
        self.export()
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _error(name: str, problem: str) -> ValueError:
    return ValueError(f"--distributed: {name} {problem}; expected {_EXPECTED[name]}.")


def role_from_env(environ=None) -> Role:
    """The `Role` the three variables describe; `ValueError` naming the first missing or bad one."""
    environ = os.environ if environ is None else environ
    values = {}
    for name in VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            raise _error(name, "is not set" if name not in environ else "is empty")
        values[name] = value
    tuner_id, ip, port = values[TUNER_ID], values[ORACLE_IP], values[ORACLE_PORT]
    # keras-tuner takes any id *containing* "chief" for the chief: refuse those ambiguous ids.
    if tuner_id != CHIEF and (CHIEF in tuner_id or not _WORKER_ID.fullmatch(tuner_id)):
        raise _error(TUNER_ID, f"is {tuner_id!r}")
    if any(c.isspace() for c in ip) or "/" in ip:
        raise _error(ORACLE_IP, f"is {ip!r}")
    if ":" in ip and not (ip.startswith("[") and ip.endswith("]")):
        # keras-tuner joins f"{ip}:{port}": an IPv6 address needs brackets, and the port has its own variable.
        raise _error(ORACLE_IP, f"is {ip!r} (a port goes in {ORACLE_PORT}; an IPv6 address in brackets)")
    try:
        number = int(port)
    except ValueError:
        raise _error(ORACLE_PORT, f"is {port!r}, not an integer") from None
    if not 1 <= number <= 65535:
        raise _error(ORACLE_PORT, f"is {number}, out of range")
    return Role(tuner_id, ip, number)


def refuse_stray_env(environ=None) -> None:
    """Without `--distributed`, keras-tuner would still go distributed if the variables are set: refuse."""
    environ = os.environ if environ is None else environ
    if environ.get(ORACLE_IP):
        raise ValueError(
            f"{ORACLE_IP} is set ({environ[ORACLE_IP]!r}), which makes keras-tuner search distributed; "
            f"pass --distributed to run as {environ.get(TUNER_ID, '?')!r}, or unset {ORACLE_IP} "
            "for a local search."
        )
