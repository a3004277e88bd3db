"""The Hugging Face Hub: repo ids as BASE and ADAPTER, and pushing OUT.

Everything goes through huggingface_hub: its cache, its token handling (``--token``, ``HF_TOKEN``, a
stored login), ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``. Only the files a merge needs are downloaded.
Every Hub failure becomes one ``HubError`` line that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HubError, RepoNotFoundError, SourceNotFoundError, first_line
from .names import OTHER_FORMATS, PICKLED

if TYPE_CHECKING:
    from .options import PushOptions

log = logging.getLogger("lora_merge")

# files of BASE and ADAPTER that a merge never downloads (pickled weights only as an adapter's fallback)
NOT_DOWNLOADED = (*PICKLED, *OTHER_FORMATS)
LARGE_FOLDER_BYTES = 5 * 1024**3
LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token"


def wanted_files(names: list[str], role: str) -> list[str]:
    """The top-level files of a repo that a merge reads or copies; pickled weights only as a fallback."""
    top = [n for n in names if "/" not in n and not n.startswith(".")]
    if role == "ADAPTER":
        has_st = "adapter_model.safetensors" in top
        return [
            n
            for n in top
            if not n.endswith(NOT_DOWNLOADED) or (n == "adapter_model.bin" and not has_st)
        ]
    return [n for n in top if not n.endswith(NOT_DOWNLOADED)]


@dataclass(frozen=True)
class Snapshot:
    """A repo's files at one commit, in the huggingface_hub cache."""

    folder: Path
    commit: str
    cache_root: Path | None  # the repo's cache folder: the snapshot's files link into its blobs


def fetch(repo_id: str, revision: str | None, role: str, token: str | None = None) -> Snapshot:
    """Download what the merge needs from ``repo_id`` into the huggingface_hub cache."""
    from huggingface_hub import HfApi, constants, snapshot_download

    where = f"{role} {repo_id}" + (f"@{revision}" if revision else "")
    with hub_errors(where, repo_id):
        if constants.HF_HUB_OFFLINE:
            folder = _cached_snapshot(repo_id, revision)
            if folder is None:
                raise RepoNotFoundError(
                    f"{where}: offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache",
                    "run once with network access to fill the cache, or unset HF_HUB_OFFLINE",
                )
            return Snapshot(folder, folder.name, _cache_root(folder))
        info = HfApi(token=token).model_info(repo_id, revision=revision, token=token)
        names = [s.rfilename for s in info.siblings or []]
        files = wanted_files(names, role)
        _check_listing(where, names, files, role)
        # by the name the user gave, so that the cache learns the branch or tag for offline use
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=files))
    return Snapshot(folder, folder.name, _cache_root(folder))


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the huggingface_hub cache, if it is there."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    name = revision or "main"
    ref = repo_dir / "refs" / name
    commit = ref.read_text().strip() if ref.is_file() else name
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _cache_root(snapshot: Path) -> Path | None:
    """models--org--name/ for a snapshot folder of the huggingface_hub cache (its files link to ../../blobs)."""
    if snapshot.parent.name == "snapshots":
        return snapshot.parent.parent
    return None


def _check_listing(where: str, names: list[str], files: list[str], role: str) -> None:
    """Refuse before downloading when the repo cannot be merged anyway."""
    if role == "ADAPTER":
        if "adapter_config.json" not in files:
            raise SourceNotFoundError(f"{where} has no adapter_config.json", "pass the repo of a PEFT adapter")
        return
    if not any(n.endswith(".safetensors") for n in files):
        pickles = [n for n in names if n.endswith(PICKLED)]
        what = f" (only {', '.join(pickles[:3])})" if pickles else ""
        raise SourceNotFoundError(
            f"{where} has no safetensors weights{what}",
            "lora-merge never unpickles a base model; use a repo (or revision) with safetensors weights",
        )


def whoami(token: str | None = None) -> dict:
    """Who the token belongs to; raises HubError when nobody is logged in or the token is read-only."""
    from huggingface_hub import HfApi

    _online("pushing to the Hub")
    with hub_errors("the Hub login"):
        me = HfApi(token=token).whoami(token=token)
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"the Hub token of {me.get('name')!r} is read-only", "use a token with write access to push")
    return me


def push(out: Path, push: PushOptions, *, token: str | None = None) -> str:
    """Upload the folder ``out`` as ``push`` (PushOptions) says, creating the repo when missing; return the URL
    to show."""
    from huggingface_hub import HfApi, constants

    _online("pushing to the Hub")
    repo_id, revision = push.repo_id, push.revision
    api = HfApi(token=token)
    where = f"pushing to {repo_id}"
    message = push.commit_message or "Upload model merged with lora-merge"
    with hub_errors(where, repo_id):
        api.create_repo(repo_id, private=push.private, exist_ok=True, repo_type="model")
        if revision and not push.create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # Recent huggingface_hub versions make upload_folder itself the resumable, multi-commit uploader
        # for big folders; older ones offer that as upload_large_folder, which cannot open a PR.
        large = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) > LARGE_FOLDER_BYTES
        if large and not push.create_pr and hasattr(api, "upload_large_folder"):
            api.upload_large_folder(
                repo_id=repo_id,
                folder_path=out,
                repo_type="model",
                revision=revision,
                private=push.private,
                ignore_patterns=[".*"],
            )
            info = None
        else:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=out,
                revision=revision,
                create_pr=push.create_pr,
                commit_message=message,
                ignore_patterns=[".*"],
            )
    if info is not None and getattr(info, "pr_url", None):
        return info.pr_url
    url = f"{constants.ENDPOINT}/{repo_id}"
    return url + (f"/tree/{revision}" if revision else "")


def _online(what: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{what} needs the network, and offline mode is on (HF_HUB_OFFLINE=1)",
                       "unset HF_HUB_OFFLINE to push (merging alone works offline, from the local cache)")


@contextlib.contextmanager
def hub_errors(where: str, repo_id: str | None = None):
    """Turn huggingface_hub's exceptions into one HubError line with the fix; ``where`` starts the line."""
    from huggingface_hub import errors as e

    try:
        yield
    except (HubError, SourceNotFoundError):
        raise
    except e.GatedRepoError:
        raise HubError(
            f"{where}: the repo is gated",
            f"accept its conditions at https://huggingface.co/{repo_id}, then {LOGIN_HINT}",
        ) from None
    except e.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision", "check the branch, tag or commit after @") from None
    except e.RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"{where}: repo not found (or private)", f"check the repo id; for a private repo, {LOGIN_HINT}"
        ) from None
    except e.LocalTokenNotFoundError:
        raise HubError(f"{where}: not logged in to the Hub", LOGIN_HINT) from None
    except (e.OfflineModeIsEnabled, e.LocalEntryNotFoundError) as err:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise RepoNotFoundError(
                f"{where}: offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache",
                "run once with network access to fill the cache, or unset HF_HUB_OFFLINE",
            ) from None
        raise RepoNotFoundError(f"{where}: cannot reach the Hub ({first_line(err)})", _NETWORK_HINT) from None
    except e.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubError(f"{where}: the Hub refused the credentials (401)", LOGIN_HINT) from None
        if status == 403:
            raise HubError(
                f"{where}: no write access (403)",
                "use a token with write access to this namespace, or push to your own namespace",
            ) from None
        raise HubError(f"{where}: the Hub answered {status}: {first_line(err)}", _NETWORK_HINT) from None
    except Exception as err:  # transport errors: their classes depend on the HTTP library the client uses
        if _is_network_error(err):
            raise RepoNotFoundError(f"{where}: cannot reach the Hub ({type(err).__name__})", _NETWORK_HINT) from None
        raise


_NETWORK_HINT = "check the network (and HF_ENDPOINT); to use only the local cache, set HF_HUB_OFFLINE=1"


def _is_network_error(err: BaseException) -> bool:
    module = type(err).__module__.split(".")[0]
    return isinstance(err, (ConnectionError, TimeoutError)) or module in (
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
    )

