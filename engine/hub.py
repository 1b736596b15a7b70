"""Checkpoints named by Hugging Face Hub id: --policy allenai/tulu-2-13b works as a local directory does.

A name that is not a local path but reads as a Hub repo id ("org/name", optionally "org/name@revision") is
downloaded into the Hugging Face cache (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE work as usual): only what the engine
reads, the configs, tokenizer files and the top-level weights in one format (safetensors when the repo has them, else
pytorch_model*.bin). On each node local rank 0 downloads while the other ranks wait; they then read the cache.
Without a network (a compute node) a repo already in the cache is used as it is (`hf download` it on
a machine that has one). With a network, global rank 0 first pins each id to the commit its revision names then
("org/name@<sha>"), so every node, and the configs and weights of one node, come from one commit even if the repo
changes during the downloads.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re

import torch.distributed as dist

from engine.distributed import agree, print0, raise_together
from engine.errors import InvalidInput, MissingInput, first_line

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# configs, index files, tokenizer files (a BPE tokenizer's vocab.json needs its merges.txt: without it transformers
# refuses the vocabulary with a message naming neither file; WordPiece's vocab.txt), chat template
KEEP = ["*.json", "tokenizer*", "*.model", "*.jinja", "merges.txt", "vocab.txt"]


def is_repo_id(name: str) -> bool:
    """Whether `name` is fetched from the Hub: it reads as a repo id and is no local path (a directory, or a file of
    a checkpoint that check_paths names as one: `policy/model.safetensors` is no repo of an org `policy`)."""
    return not os.path.lexists(name) and bool(REPO_ID.match(name))  # (a broken link is a local path too)


def weight_patterns(files: list[str], shards_of=None) -> list[str]:
    """The weights to fetch from a repo's file list, as engine.checkpoint.checkpoint_files reads them (transformers'
    order): model.safetensors alone, else the shards model.safetensors.index.json names, else pytorch_model.bin
    alone, else the shards pytorch_model.bin.index.json names, else (no index) the top-level safetensors, else the
    top-level pytorch_model*.bin; each by its own name (a pattern would match a subfolder's copy too: a Trainer's
    last-checkpoint/, say, fetching the weights twice; a repo whose safetensors are all in a subfolder gets its
    top-level .bin, which is what loads). Not fetched: a file beside the weights read that is not read, such as an
    adapter_model.safetensors or a consolidated.safetensors (a second full copy) beside model.safetensors or beside
    indexed shards.

    shards_of(index file name) -> the file names its weight_map names (engine.checkpoint reads those alone); without
    it, an index stands for every top-level file of its format."""
    from engine.checkpoint import BIN_INDEX_FILE, BIN_SINGLE_FILE, INDEX_FILE, SINGLE_FILE

    top = sorted(f for f in files if "/" not in f)
    tensors = [f for f in top if f.endswith(".safetensors")]
    pickles = [f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")]
    for name, names in ((SINGLE_FILE, [SINGLE_FILE]), (INDEX_FILE, tensors), (BIN_SINGLE_FILE, [BIN_SINGLE_FILE]),
                        (BIN_INDEX_FILE, pickles)):  # fmt: skip
        if name in top:
            if shards_of is not None and name in (INDEX_FILE, BIN_INDEX_FILE):
                names = shards_of(name)
            return [glob.escape(f) for f in names]
    return [glob.escape(f) for f in tensors or pickles]


SHA = re.compile(r"^[0-9a-f]{40}$")
RUN_FIELDS = ("policy", "reference", "reward", "tokenizer")  # the RunConfig fields that name a checkpoint


# huggingface_hub's errors a pin meets that need no word of their own: HF_HUB_OFFLINE=1 (the cache is used as it
# is), a repo or revision that is not there or is gated (resolve() names the id when it cannot fetch it)
QUIET_PIN_ERRORS = (
    "OfflineModeIsEnabled",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "GatedRepoError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "TimeoutException",
    "LocalEntryNotFoundError",
)
# (and any ConnectionError or TimeoutError: no network, a compute node, where the cache is used as it is)


def pin_revisions(names: list[str | None], rank: int) -> list[str | None]:
    """Each Hub id as "org/name@<commit>" of the revision it names now (global rank 0 asks the Hub, every rank gets its
    answer); a local directory, an id already pinned, or one the Hub does not answer for (offline, a typo: resolve()
    names it) stays as it is. Under torchrun every rank must call this."""
    pinned = list(names)
    if rank == 0:
        from huggingface_hub import model_info

        for k, n in enumerate(names):
            if n and is_repo_id(n) and not SHA.match(n.partition("@")[2]):
                repo, _, revision = n.partition("@")
                try:
                    pinned[k] = f"{repo}@{model_info(repo, revision=revision or None).sha}"
                except Exception as e:  # (offline: the cache is used as it is; resolve() names a repo not to be had)
                    if type(e).__name__ not in QUIET_PIN_ERRORS and not isinstance(e, (ConnectionError, TimeoutError)):
                        print(f"warning: {n} is not pinned to a commit ({type(e).__name__}: {first_line(e)}): each "
                              "node takes what its revision names when it fetches it")  # fmt: skip
                    continue
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(pinned, src=0)
    # (rank 0's answer for the Hub ids alone: a local directory is this node's own name of it, as check_paths and
    # check_checkpoints read it here, not rank 0's, which another node may lack or hold another copy under)
    return [p if n and is_repo_id(n) else n for n, p in zip(names, pinned)]


def check_same_sources(run) -> None:
    """Every rank reads each checkpoint name alike (a collective): `--policy org/policy` that is a local directory
    on one node only would load that node's model there and the Hub's repo of that id on the others, silently.
    Refused on every rank, naming the flag."""
    names = [getattr(run, f) for f in RUN_FIELDS]
    local = [int(bool(n) and not is_repo_id(n)) for n in names]
    lo, hi = agree(local, "min"), agree(local, "max")
    for field, name, a, b in zip(RUN_FIELDS, names, lo, hi):
        if a != b:
            raise InvalidInput(
                f"--{field} {name}: a local directory on some nodes and not on others, where it would be fetched from "
                f"the Hugging Face Hub as a repo id: give a directory every node has (./{name} keeps it local)"
            )


def saved_commit(name: str, path: str | None) -> str | None:
    """The commit of Hub id `name` a run fetched, from the snapshot directory it read (.../models--org--name/
    snapshots/<commit>, as a checkpoint saves its frozen models' paths); None where `path` is no snapshot of it."""
    parts = os.path.normpath(path or "").split(os.sep)
    folder = name.partition("@")[0].replace("/", "--")
    if len(parts) > 2 and SHA.match(parts[-1]) and parts[-2] == "snapshots" and parts[-3] == f"models--{folder}":
        return parts[-1]
    return None


def pin_as_saved(run, saved: dict | None):
    """--resume: `run` (engine.state.RunConfig) with each Hub id of its frozen models (the reference, which is the
    policy's id without --reference, and the reward model) pinned to the commit the checkpoint's run fetched
    (`saved`: the checkpoint's models record), not to what its revision names now: a push to the repo since would
    otherwise fetch the new commit's weights, then refuse them as other models. Said where it pins."""
    changes = {}
    for role, field in (("reference", "reference" if run.reference else "policy"), ("reward", "reward")):
        name, record = getattr(run, field), (saved or {}).get(role)
        if not name or not is_repo_id(name) or SHA.match(name.partition("@")[2]) or not isinstance(record, dict):
            continue
        commit = saved_commit(name, record.get("path"))
        if commit:
            changes[field] = f"{name.partition('@')[0]}@{commit}"
            print0(f"--{field} {name}: resuming with commit {commit}, the one the run fetched (another: name it, "
                   "with --resume-other-models)")  # fmt: skip
    return dataclasses.replace(run, **changes) if changes else run


def model_dirs(run) -> dict[str, str]:
    """{policy, reference, reward}: the checkpoints a run (engine.state.RunConfig) reads; the reference defaults to
    the policy (the recipe's)."""
    return {"policy": run.policy, "reference": run.reference or run.policy, "reward": run.reward}


def pin_run(run):
    """`run` (engine.state.RunConfig) with its Hub ids pinned to their commits (pin_revisions)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    values = pin_revisions([getattr(run, f) for f in RUN_FIELDS], rank)
    return dataclasses.replace(run, **dict(zip(RUN_FIELDS, values)))


def config_dir(name: str, local_only: bool = False) -> str:
    """A directory holding a Hub repo's config.json alone (fetched into the cache, without the weights)."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = name.partition("@")
    return os.path.dirname(hf_hub_download(repo, "config.json", revision=revision or None, local_files_only=local_only))


def config_sources(names: list[str | None]) -> list[str | None] | None:
    """For planning memory before any weight is fetched: the names as they are, with each Hub id replaced by a
    directory that holds its config.json alone (each node's local rank 0 fetches it, then the others read the
    cache); None when one cannot be had (resolve() names the problem when it fetches the checkpoints). Every rank
    under torchrun calls this."""
    remote = sorted({n for n in names if n and is_repo_id(n)})
    if not remote:
        return names
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dirs, ok = {}, True
    for turn in (0, 1):  # local rank 0 fetches, then the other ranks read the cache
        if (local_rank == 0) == (turn == 0):
            try:
                dirs = {n: config_dir(n, local_only=turn == 1) for n in remote}
            except Exception:  # (offline and not cached, a typo, a gated repo)
                ok = False
        if turn == 0 and dist.is_initialized():
            dist.barrier()
    return [dirs.get(n, n) if n else n for n in names] if ok else None


def _download(name: str, local_only: bool, weights: bool = True) -> str:
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    from engine.checkpoint import weight_map

    repo, _, revision = name.partition("@")
    revision = revision or None
    if not weights:
        return snapshot_download(repo, revision=revision, allow_patterns=KEEP, local_files_only=local_only)
    if local_only:  # the weight format the cached snapshot holds (what local rank 0 fetched, or a full download)
        cached = snapshot_download(repo, revision=revision, allow_patterns=KEEP, local_files_only=True)
        held = os.listdir(cached)
        found = weight_patterns(held, lambda index: sorted(set(weight_map(os.path.join(cached, index)).values())))
        missing = [f for f in found if not glob.glob(os.path.join(glob.escape(cached), f))]
        if not found or missing:  # (a download cut short, or the configs alone memory planning fetched)
            what = f"lacks {len(missing)} of the {len(found)} weight files its index names" if found else ""
            raise ValueError(f"the cached snapshot {cached} {what or 'holds no weights'} (a download cut short?)")
    else:

        def index_shards(index: str) -> list[str]:  # (the index fetched alone first: the shards it names are read)
            return sorted(set(weight_map(hf_hub_download(repo, index, revision=revision)).values()))

        found = weight_patterns(list_repo_files(repo, revision=revision), index_shards)
    return snapshot_download(repo, revision=revision, allow_patterns=KEEP + found, local_files_only=local_only)


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a download's errors the cache cannot stand in for


def _cached_commits(name: str) -> str:
    """For an unpinned id the cache has no ref for (a run that pinned it fetched by commit, which writes none): the
    commits it holds, to name one."""
    from huggingface_hub import constants

    repo, _, revision = name.partition("@")
    snapshots = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"), "snapshots")
    held = os.listdir(snapshots) if not revision and os.path.isdir(snapshots) else []
    held.sort(key=lambda c: os.path.getmtime(os.path.join(snapshots, c)))  # (the newest fetched last)
    return f" under that revision (it holds {', '.join(held)}: name one, {repo}@{held[-1]})" if held else ""


def resolve(names: list[str | None], weights: bool = True) -> list[str | None]:
    """Local directories for checkpoint names (None stays None): a local directory as it is; a Hub repo id fetched
    into the cache by each node's local rank 0, then found there by the other ranks (without `weights`, only its
    configs and tokenizer files: the same snapshot directory, its weights fetched by a later call). Under torchrun
    every rank must call this (a failed download stops every rank, none waits); a name neither local nor on the Hub
    is named."""
    remote = sorted({n for n in names if n and is_repo_id(n)})
    if not remote:
        return names
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    paths, error = {}, None
    if local_rank == 0:
        for n in remote:
            try:
                paths[n] = _download(n, local_only=False, weights=weights)
            except OSError as e:
                if e.errno in FULL:  # (a full disk or quota, a read-only cache: not a reason to try the cache)
                    error = OSError(e.errno, f"fetching {n} into the Hugging Face cache: {e.strerror or e}")
                    break
                fetched = e
            except Exception as e:
                fetched = e
            else:
                continue
            try:  # offline (a compute node): the cache may hold it (downloaded on a login node)
                paths[n] = _download(n, local_only=True, weights=weights)
            except Exception as cached:  # (a gated repo, a typo, not cached, a cached copy cut short): named
                if isinstance(cached, FileNotFoundError) and type(cached).__name__ != "IncompleteSnapshotError":
                    there = f"is not in the Hugging Face cache{_cached_commits(n)}"
                else:
                    why = f"{type(cached).__name__}: {first_line(cached)}"
                    there = f"its copy in the Hugging Face cache cannot be used ({why})"
                error = MissingInput(f"{n} is not a local directory, could not be fetched from the Hugging Face Hub "
                                     f"({type(fetched).__name__}: {first_line(fetched)}) and {there}")  # fmt: skip
                break
    # (by hand, not `together`: the error shared is the input error built above, not the download's own; every
    # exception is caught, so no rank is left waiting)
    raise_together(error, "fetching checkpoints")
    if local_rank != 0:
        try:
            paths = {n: _download(n, local_only=True, weights=weights) for n in remote}
        except Exception as e:  # (every rank learns of it: none is left waiting in a collective)
            error = FileNotFoundError(f"a checkpoint local rank 0 fetched is not whole in this rank's cache: {e}")
    raise_together(error, "finding the fetched checkpoints in the cache")  # (by hand: the error said as what it means)
    return [paths.get(n, n) if n else n for n in names]


def resolve_run(run, weights: bool = True, configs_only: tuple[str, ...] = ()):
    """`run` (engine.state.RunConfig) with its checkpoint and tokenizer names made local directories (without
    `weights`: holding a Hub id's configs and tokenizer files alone, to check before the weights are fetched; the
    fields in `configs_only` so either way: a resume's --policy, whose weights the checkpoint holds)."""
    fields = [f for f in RUN_FIELDS if f not in configs_only]
    values = resolve([getattr(run, f) for f in fields], weights)
    light = resolve([getattr(run, f) for f in configs_only], weights=False) if configs_only else []
    return dataclasses.replace(run, **dict(zip(fields, values)), **dict(zip(configs_only, light)))
