"""Joining Ray: the cluster in ``RAY_ADDRESS``, the one running on this machine, or a new local one;
the cluster's token; and one line (:class:`UsageError`) for every failure to reach a cluster."""

from __future__ import annotations

import os
from typing import Any

from mmcurate.errors import UsageError

# Keep idle workers for a minute (Ray's default: 1 s): the next segment or shuffle of the run then
# finds them with mmcurate imported instead of paying a cold start (about 5 s on 2 cores).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def use_cluster_token() -> None:
    """Send the cluster's token when one is where Ray looks for it (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset.

    Ray 2.60 clients send a token only in ``RAY_AUTH_MODE=token``, which ``ray start`` sets in its
    own processes only; ``RAY_AUTH_MODE=disabled`` still turns this off.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray read its configuration (the auth mode among it) at import


def auth_problem(where: str, error: Exception) -> str:
    """One line for Ray's AuthenticationError (a paragraph of advice in Ray)."""
    refused = "failed" in str(error).split(":", 1)[0]  # 403 "Authentication failed", 401 "Authentication required"
    fix = (
        "the token here is not the cluster's: copy the head's (`ray get-auth-token` on the head)"
        if refused
        else "it wants a token: put the head's (`ray get-auth-token` on the head) in ~/.ray/auth_token or RAY_AUTH_TOKEN"
    )
    mode = "" if os.environ.get("RAY_AUTH_MODE") == "token" else " (and RAY_AUTH_MODE=token to join it from a driver)"
    return f"the Ray cluster at {where} refused this client: {fix}{mode}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _running_here() -> str | None:
    """The address of the cluster that ``ray start`` started on this machine (a head node), if any."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


def connect(workers: int, **options: Any) -> bool:
    """Initialise Ray unless it is; return whether this call started it.

    Joins the cluster in ``RAY_ADDRESS`` (set inside a Ray job) or the one running on this machine
    (on a head node), else starts a local Ray with ``workers`` CPUs (``options`` go to ``ray.init``).
    """
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or _running_here()
    try:
        if address:
            ray.init(log_to_driver=False)  # Ray finds the address as above
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG, **options)
    except AuthenticationError as e:
        raise UsageError(auth_problem(address or "this machine", e)) from None
    except ConnectionError as e:
        raise UsageError(f"cannot join the Ray cluster at {address}: {first_line(e)}") from None
    return True
