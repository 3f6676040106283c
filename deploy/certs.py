"""The deployment's TLS certificates: made by ``deploy/gen_certs.sh``, renewed before they expire.

``gen_certs.sh`` makes a throw-away CA and the SuperLink's certificate, valid for 30 days
(``$FEDZO_CERT_DAYS``). ``up`` reuses them while both are readable and valid for at least
:data:`RENEW_WITHIN` more; otherwise it makes new ones and says why. Expiry dates are read with
``cryptography`` (a dependency of flwr).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deploy.errors import DeployError
from deploy.state import ROOT, TLS_FILES, Layout, display_path

GEN_CERTS = ROOT / "deploy" / "gen_certs.sh"
RENEW_WITHIN = timedelta(days=1)
"""A certificate that expires sooner than this is renewed (a run must not outlive it)."""
CERTIFICATES = ("ca.crt", "server.pem")
"""The files of :data:`deploy.state.TLS_FILES` that carry an expiry date."""


def expiry(path: Path) -> datetime:
    """The ``notAfter`` date (UTC) of the PEM certificate at ``path``."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def renewal_reason(certs: Path, now: datetime | None = None) -> str | None:
    """Why the TLS files in ``certs`` cannot be reused, or None if they can."""
    now = now or datetime.now(UTC)
    missing = [name for name in TLS_FILES if not (certs / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for name in CERTIFICATES:
        try:
            end = expiry(certs / name)
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({err})"
        if end <= now:
            return f"{name} expired on {end:%Y-%m-%d %H:%M} UTC"
        if end - now < RENEW_WITHIN:
            hours = RENEW_WITHIN.total_seconds() / 3600
            return f"{name} expires on {end:%Y-%m-%d %H:%M} UTC, in less than {hours:g} h"
    return None


def ensure_certs(layout: Layout) -> str | None:
    """Reuse the deployment's TLS files, or (re)generate them; a line saying why, or None.

    Raises
    ------
    DeployError
        If ``gen_certs.sh`` fails, or makes certificates that are not valid now.
    """
    reason = renewal_reason(layout.certs)
    if reason is None:
        return None
    fresh = not any((layout.certs / name).exists() for name in TLS_FILES)
    verb = "generate" if fresh else "renew"
    where = display_path(layout.certs)
    try:
        subprocess.run(
            ["bash", str(GEN_CERTS), str(layout.certs)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        stderr = getattr(err, "stderr", None) or str(err)
        raise DeployError(
            f"cannot {verb} the TLS certificates in {where} ({reason}): {GEN_CERTS.name} failed: "
            f"{stderr.strip()}; it needs bash and openssl (or put valid ca.crt, server.pem and "
            f"server.key there yourself)"
        ) from None
    now = datetime.now(UTC)
    for name in CERTIFICATES:
        end = expiry(layout.certs / name)
        if end <= now:
            raise DeployError(
                f"{GEN_CERTS.name} made {where}/{name} that is not valid now (expires "
                f"{end:%Y-%m-%d %H:%M} UTC): check $FEDZO_CERT_DAYS"
            )
    until = min(expiry(layout.certs / name) for name in CERTIFICATES)
    done = "generated" if fresh else f"renewed ({reason})"
    return f"[deploy] TLS certificates in {where} {done}; valid until {until:%Y-%m-%d %H:%M} UTC"
