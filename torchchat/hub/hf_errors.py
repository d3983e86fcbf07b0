"""Turn huggingface_hub and network exceptions into one-line TorchchatErrors that say what to do."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

from torchchat.errors import TorchchatError


def _chain(e: BaseException) -> Iterator[BaseException]:
    """e, then its causes: huggingface_hub often wraps the HTTP error in a cache-lookup error."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


def hub_error(
    e: BaseException, repo: str, filename: str | None, endpoint: str, token_given: bool
) -> TorchchatError | None:
    """The user-facing error for a failed hub call, or None if `e` is not a hub/network problem."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RevisionNotFoundError,
    )

    what = f"{filename} of {repo}" if filename else repo
    chain = list(_chain(e))
    http = next(
        (x for x in chain if isinstance(x, HfHubHTTPError) and x.response is not None), None
    )
    if http is not None:
        status = http.response.status_code
        code = http.response.headers.get("X-Error-Code", "")
        if status == 401 and token_given:
            return TorchchatError(
                f"Hugging Face rejected the token for {repo} (401): check HF_TOKEN or --hf-token "
                "(and the repo id: private and missing repos also answer 401)"
            )
        if status == 401:
            return TorchchatError(
                f"{repo} requires a Hugging Face token (401: gated or private repo, or no such "
                "repo): set HF_TOKEN or pass --hf-token"
            )
        if status == 403 or isinstance(http, GatedRepoError) or code == "GatedRepo":
            return TorchchatError(
                f"access to {repo} is not granted to this token (403, gated repo): accept the "
                f"licence on {endpoint}/{repo} and use a token allowed to read gated repos"
            )
        if isinstance(http, RevisionNotFoundError) or code == "RevisionNotFound":
            return TorchchatError(f"revision not found in {repo} (404)")
        if (
            status == 404
            and filename
            and (isinstance(http, EntryNotFoundError) or code != "RepoNotFound")
        ):
            return TorchchatError(f"file {filename} not found in {repo} (404)")
        if status == 404:
            return TorchchatError(
                f"repository {repo} not found on {endpoint} (404): check the name"
            )
        if status == 429:
            return TorchchatError(
                f"Hugging Face is rate-limiting requests (429): retry {repo} later"
            )
        return TorchchatError(f"Hugging Face answered HTTP {status} for {what}: retry later")
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain):
        return TorchchatError(offline_message(repo))
    transport = _transport_errors()
    net = next((x for x in chain if isinstance(x, transport)), None)
    if net is not None and "connect" in type(net).__name__.lower():
        return TorchchatError(
            f"cannot reach {endpoint} to download {repo}: you seem to be offline "
            "(check the network, a proxy, or HF_ENDPOINT)"
        )
    if net is not None or any("Consistency check failed" in str(x) for x in chain):
        reason = str(net or e).strip().splitlines()[0][:160] if str(net or e).strip() else ""
        return TorchchatError(
            f"download of {what} was interrupted ({type(net or e).__name__}: {reason}); "
            "nothing was kept: run the download again"
        )
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):
        # What hf_hub_download raises when the hub could not be reached and nothing is cached.
        return TorchchatError(f"cannot reach {endpoint} to download {what}: check the network")
    return None


def offline_message(repo: str) -> str:
    return (
        f"cannot download {repo}: Hugging Face offline mode is on (HF_HUB_OFFLINE); "
        "unset it to download"
    )
