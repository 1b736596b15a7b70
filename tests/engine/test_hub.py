"""Checkpoints named by Hugging Face Hub id (engine/hub.py), through a stand-in for huggingface_hub that serves
local directories: what is fetched, and that a run set up from Hub ids is the run set up from the directories."""

import fnmatch
import os
import shutil

import huggingface_hub
import pytest

from engine import hub
from engine.tokenizer import TINY_PROMPTS
from engine.train_ppo import build_tiny_models, main
from kernels import dispatch
from tests.engine.runs import SMALL, no_timing


class FakeHub:
    """list_repo_files / snapshot_download over local directories, into a cache directory; records the calls."""

    def __init__(self, repos: dict[str, str], cache):
        self.repos, self.cache, self.calls, self.config_calls = repos, cache, [], []

    offline = False
    config_calls: list

    def hf_hub_download(self, repo, filename, revision=None, local_files_only=False):
        self.config_calls.append((repo, revision, local_files_only))
        dst = self.cache / repo.replace("/", "--") / f"{revision or 'main'}-{filename}"
        if not local_files_only:
            if self.offline or repo not in self.repos:
                raise OSError(f"cannot fetch {repo}")
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(self.repos[repo], filename), dst / filename)
        if not (dst / filename).exists():
            raise FileNotFoundError(f"{repo}/{filename}: not in the local cache")
        return str(dst / filename)

    def model_info(self, repo, revision=None):
        """The commit a revision names: a hash of (repo, revision, the number of pushes so far)."""
        import hashlib
        from types import SimpleNamespace

        if self.offline:
            raise OSError("Cannot reach https://huggingface.co/api/models: offline mode is enabled")
        if repo not in self.repos:
            raise OSError(f"404 Client Error: Repository Not Found for url: .../api/models/{repo}")
        key = f"{repo}@{revision or 'main'}#{self.pushes.get(repo, 0)}"
        return SimpleNamespace(sha=hashlib.sha1(key.encode()).hexdigest())

    pushes: dict = {}

    def list_repo_files(self, repo, revision=None):
        if self.offline:
            raise OSError("Cannot reach https://huggingface.co/api/models: offline mode is enabled")
        if repo not in self.repos:
            # (as huggingface_hub's: the status first, the explanation on later lines)
            raise OSError(f"404 Client Error. (Request ID: Root=1-a)\n\nRepository Not Found for url: .../{repo}.")
        return sorted(os.listdir(self.repos[repo]))

    def snapshot_download(self, repo, revision=None, allow_patterns=None, local_files_only=False):
        import fnmatch

        self.calls.append((repo, revision, tuple(allow_patterns), local_files_only))
        dst = self.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / (revision or "main")  # (HF's layout)
        if local_files_only and not dst.exists():
            raise FileNotFoundError(f"{repo}: no snapshot in the local cache")
        if local_files_only and repo in self.repos:  # (huggingface_hub checks the cached snapshot is whole)
            wanted = [f for f in os.listdir(self.repos[repo]) if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
            missing = [f for f in wanted if not (dst / f).exists()]
            if missing:
                raise FileNotFoundError(f"{repo}: {len(missing)} file(s) are missing from the cached snapshot")
        if not local_files_only:
            files = self.list_repo_files(repo, revision)  # (raises for a repo it does not have, before any directory)
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                if any(fnmatch.fnmatch(f, pat) for pat in allow_patterns):
                    shutil.copy(os.path.join(self.repos[repo], f), dst / f)
        return str(dst)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    build_tiny_models(str(tmp_path / "src"), seed=0)
    open(tmp_path / "src/policy/training_args.bin", "wb").close()  # a trainer's file: not fetched
    open(tmp_path / "src/policy/pytorch_model.bin", "wb").close()  # the other weight format: not fetched
    fake = FakeHub({"org/policy": str(tmp_path / "src/policy"), "org/rm": str(tmp_path / "src/reward")},
                   tmp_path / "cache")  # fmt: skip
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
    fake.pushes = {}
    return fake


def test_is_repo_id(tmp_path, monkeypatch):
    assert hub.is_repo_id("allenai/tulu-2-13b") and hub.is_repo_id("allenai/tulu-v2.5-13b-uf-rm@main")
    (tmp_path / "a").mkdir()
    assert not hub.is_repo_id(str(tmp_path / "a")) and not hub.is_repo_id("runs/ppo/checkpoint-000010/policy")
    assert not hub.is_repo_id("./policy") and not hub.is_repo_id("~/policy")  # (a path, not an org)
    (tmp_path / "models/llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_repo_id("models/llama")  # a relative local directory shaped like an id: the directory


def test_a_local_file_shaped_like_an_id_is_named_as_a_file_not_fetched(tmp_path, monkeypatch):
    """`--policy policy/model.safetensors` beside a checkpoint: a local file, named as one with the directory to give
    instead, not asked of the Hub as the repo `model.safetensors` of an org `policy`."""
    from engine.preflight import check_paths
    from engine.state import RunConfig

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy/model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_repo_id("policy/model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"--policy policy/model.safetensors: no such directory .*: name the "
                       r"directory that holds it, policy$"):  # fmt: skip
        check_paths(RunConfig(policy="policy/model.safetensors"))


def test_a_broken_link_shaped_like_an_id_is_named_as_one_not_fetched(tmp_path, monkeypatch):
    """`--policy models/llama` where models/llama is a symbolic link to a checkpoint since moved: named as a broken
    link, not asked of the Hub as the repo `llama` of an org `models` (os.path.exists is False for a broken link)."""
    from engine.preflight import check_paths
    from engine.state import RunConfig

    (tmp_path / "models").mkdir()
    (tmp_path / "models/llama").symlink_to(tmp_path / "moved/away")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_repo_id("models/llama")
    with pytest.raises(FileNotFoundError, match=rf"--policy models/llama: no such directory .*: a broken symbolic "
                       rf"link to {tmp_path}/moved/away$"):  # fmt: skip
        check_paths(RunConfig(policy="models/llama"))


def test_the_weights_fetched_are_the_top_level_ones_of_one_format():
    """Safetensors before pickles, by name, the top level only: a subfolder's copy (a Trainer's last-checkpoint/, an
    original/ folder) is not fetched beside them, and a repo whose safetensors are all in a subfolder gets the
    top-level .bin that loads; a name with glob characters matches itself only."""
    assert hub.weight_patterns(["model.safetensors", "pytorch_model.bin", "config.json"]) == ["model.safetensors"]
    shards = ["pytorch_model-00002-of-00002.bin", "pytorch_model-00001-of-00002.bin"]
    assert hub.weight_patterns([*shards, "training_args.bin"]) == sorted(shards)
    listing = [
        "model-00001-of-00002.safetensors",
        "last-checkpoint/model.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert hub.weight_patterns(listing) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hub.weight_patterns(["onnx/model.safetensors", "pytorch_model.bin"]) == ["pytorch_model.bin"]
    assert hub.weight_patterns(["m[1].safetensors"]) == ["m[[]1].safetensors"]
    assert fnmatch.fnmatch("m[1].safetensors", "m[[]1].safetensors")
    assert not fnmatch.fnmatch("m1.safetensors", "m[[]1].safetensors")
    assert hub.weight_patterns(["README.md"]) == []
    # what the loader reads alone, as transformers does: not an adapter beside it, nor a .bin's shards
    assert hub.weight_patterns(["adapter_model.safetensors", "model.safetensors"]) == ["model.safetensors"]
    assert hub.weight_patterns(["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"]) == ["pytorch_model.bin"]
    # .bin shards with their index beside another safetensors file (an adapter): the shards, as the loader reads them
    bin_shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    listing = ["adapter_model.safetensors", "pytorch_model.bin.index.json", *bin_shards]
    assert hub.weight_patterns(listing) == bin_shards
    assert hub.weight_patterns([*listing, "model.safetensors.index.json", "model-00001-of-00001.safetensors"]) == [
        "adapter_model.safetensors",
        "model-00001-of-00001.safetensors",
    ]
    # given the index's reader: only the shards it names (what engine.checkpoint reads), in either format
    named = {"model.safetensors.index.json": ["model-00001-of-00001.safetensors"], "pytorch_model.bin.index.json": []}
    listing = [*listing, "model.safetensors.index.json", "model-00001-of-00001.safetensors"]
    assert hub.weight_patterns(listing, named.get) == ["model-00001-of-00001.safetensors"]
    named["pytorch_model.bin.index.json"] = bin_shards[:1]
    assert hub.weight_patterns([*bin_shards, "pytorch_model.bin.index.json"], named.get) == bin_shards[:1]
    assert hub.weight_patterns(["model.safetensors", "adapter_model.safetensors"], named.get) == ["model.safetensors"]


def test_a_sharded_repo_fetches_the_shards_its_index_names_and_nothing_beside_them(tmp_path, fake_hub, monkeypatch):
    """An index's repo fetched every top-level safetensors: an adapter, a consolidated.safetensors (a second full copy
    of the weights, as Mistral's repos hold) and a stale shard of an earlier sharding came too, none of them read.
    Now the index is fetched first and the shards it names alone; another local rank, or an offline node, finds them
    in the cache, and a cached snapshot short of a shard is named."""
    from transformers import AutoModelForCausalLM

    from engine.checkpoint import checkpoint_files

    src = tmp_path / "src/sharded"
    AutoModelForCausalLM.from_pretrained(tmp_path / "src/policy").save_pretrained(src, max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(src) if f.startswith("model-"))
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(src)
    for extra in ("consolidated.safetensors", "adapter_model.safetensors", "model-00001-of-00099.safetensors"):
        shutil.copy(src / shards[0], src / extra)
    fake_hub.repos["org/sharded"] = str(src)
    (path,) = hub.resolve(["org/sharded"])
    assert sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) == shards
    assert checkpoint_files(path).keys() == checkpoint_files(src).keys()
    fake_hub.calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hub.resolve(["org/sharded"]) == [path]
    assert fake_hub.calls[-1][2] == tuple(hub.KEEP + shards)
    os.remove(os.path.join(path, shards[-1]))  # (a download cut short)
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the \d+ weight files its index names \(a download cut"):
        hub.resolve(["org/sharded"])


def run(out, *flags):
    with dispatch.reference_ops():
        return main(["--output-dir", str(out), "--prompts", TINY_PROMPTS,
                     "--max-iterations", "1", "--eval-prompts", "", *SMALL, *flags])  # fmt: skip


def test_a_run_from_hub_ids_is_the_run_from_the_directories(tmp_path, fake_hub):
    local = run(tmp_path / "local", "--policy", str(tmp_path / "src/policy"), "--reward", str(tmp_path / "src/reward"))
    remote = run(tmp_path / "remote", "--policy", "org/policy", "--reward", "org/rm@v1")
    assert no_timing(remote) == no_timing(local)
    # configs and tokenizer files first (checked before any weight is fetched), then the weights
    # each id pinned to the commit its revision names (configs and weights from one commit, on every node)
    policy, rm = (fake_hub.model_info(r, v).sha for r, v in (("org/policy", None), ("org/rm", "v1")))
    assert [c[:3] for c in fake_hub.calls[:2]] == [
        ("org/policy", policy, tuple(hub.KEEP)),
        ("org/rm", rm, tuple(hub.KEEP)),
    ]
    assert [c[:2] for c in fake_hub.calls[2:]] == [("org/policy", policy), ("org/rm", rm)]
    assert all("model.safetensors" in c[2] and "pytorch_model.bin" not in c[2] for c in fake_hub.calls[2:])
    fetched = sorted(os.listdir(tmp_path / f"cache/models--org--policy/snapshots/{policy}"))
    assert "training_args.bin" not in fetched and {"config.json", "model.safetensors", "tokenizer.json"} <= set(fetched)


def test_a_reward_model_with_another_tokenizer_is_refused_before_its_weights_are_fetched(tmp_path, fake_hub):
    from tests.engine.test_tokenizer import _swap_vocab, _tokenizer_copy

    shutil.copytree(tmp_path / "src/reward", tmp_path / "src/other")
    _tokenizer_copy(tmp_path / "src/other", _swap_vocab)
    fake_hub.repos["org/other"] = str(tmp_path / "src/other")
    with pytest.raises(ValueError, match=r"the reward model's tokenizer \(.*org--other.*\) maps id"):
        run(tmp_path, "--policy", "org/policy", "--reward", "org/other")
    assert fake_hub.calls and all(c[2] == tuple(hub.KEEP) for c in fake_hub.calls)  # no weights fetched


def test_ids_are_pinned_to_the_commit_their_revision_names(fake_hub, tmp_path):
    """Global rank 0 pins each Hub id to a commit (a push after it changes nothing this run fetches); a pinned id, a
    local directory, and (offline) an id the Hub does not answer for stay as they are."""
    local = str(tmp_path / "src/policy")
    pinned = hub.pin_revisions(["org/policy", "org/rm@v1", local, None], rank=0)
    assert pinned[0] == "org/policy@" + fake_hub.model_info("org/policy").sha and pinned[2:] == [local, None]
    assert pinned[1] == "org/rm@" + fake_hub.model_info("org/rm", "v1").sha and hub.is_repo_id(pinned[1])
    fake_hub.pushes["org/policy"] = 1  # a push: main names another commit now
    assert hub.pin_revisions(pinned, rank=0) == pinned  # (already pinned: unchanged)
    assert hub.pin_revisions(["org/policy"], rank=0) != pinned[:1]
    assert hub.pin_revisions(["org/policy"], rank=1) == ["org/policy"]  # (another rank waits for rank 0's answer)
    fake_hub.offline = True
    assert hub.pin_revisions(["org/policy", "org/missing"], rank=0) == ["org/policy", "org/missing"]


def test_unknown_repo_is_named(tmp_path, fake_hub):
    named = r"org/missing is not a local directory, could not be fetched from the Hugging Face Hub "
    with pytest.raises(FileNotFoundError, match=named + r"\(OSError: 404 Client Error.*\) and is not in the .* cache"):
        run(tmp_path, "--policy", "org/missing", "--reward", "org/rm")


def test_the_first_id_that_cannot_be_had_is_named_and_nothing_after_it_is_fetched(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match=r"^org/q-missing is not a local directory, .*\(OSError: 404 Client"):
        hub.resolve(["org/policy", "org/q-missing", "org/rm"])
    assert [c[0] for c in fake_hub.calls] == ["org/policy", "org/q-missing"]  # (org/rm: not downloaded in vain)


def test_a_tokenizer_named_by_hub_id_is_pinned_and_fetched_as_the_checkpoints_are(tmp_path, fake_hub):
    from engine.state import RunConfig

    run = hub.resolve_run(hub.pin_run(RunConfig(policy="org/policy", reward="org/rm", tokenizer="org/rm@v1")))
    sha = fake_hub.model_info("org/rm", "v1").sha
    assert run.tokenizer == str(tmp_path / f"cache/models--org--rm/snapshots/{sha}")
    assert os.path.exists(os.path.join(run.tokenizer, "tokenizer_config.json"))


def test_the_tokenizer_files_and_chat_template_are_fetched(tmp_path, fake_hub):
    for name in ("chat_template.jinja", "tokenizer.model", "special_tokens_map.json"):
        (tmp_path / "src/policy" / name).write_text("x")
    (path,) = hub.resolve(["org/policy"], weights=False)
    fetched = set(os.listdir(path))
    assert {"chat_template.jinja", "tokenizer.model", "special_tokens_map.json", "config.json"} <= fetched
    assert not any(f.endswith((".safetensors", ".bin")) for f in fetched)


def test_a_bpe_tokenizers_merges_are_fetched_with_its_vocabulary(tmp_path, fake_hub):
    """A tokenizer of vocab.json + merges.txt (no tokenizer.json: one load_tokenizer reads, and save_pretrained copies
    whole) named by Hub id comes whole: vocab.json alone fails to load, naming neither file."""
    from engine.tokenizer import TINY_DIR, load_tokenizer
    from tests.engine.test_tokenizer import bpe_tokenizer_files

    src = bpe_tokenizer_files(tmp_path / "src/bpe", load_tokenizer(TINY_DIR))
    fake_hub.repos["org/bpe"] = str(src)
    (path,) = hub.resolve(["org/bpe"], weights=False)
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(path))
    text = "How do I reverse a list in Python?"
    assert load_tokenizer(path)(text)["input_ids"] == load_tokenizer(src)(text)["input_ids"]


def test_other_local_ranks_and_offline_nodes_read_the_cache(tmp_path, fake_hub, monkeypatch):
    """Local rank 0 of a node fetches; the others only look the snapshot up in the cache. Without a network, local
    rank 0 too uses what the cache holds, and a repo it does not hold is named."""
    local, cached = str(tmp_path / "src/reward"), str(tmp_path / "cache/models--org--policy/snapshots/main")
    assert hub.resolve(["org/policy"]) == [cached]  # local rank 0: fetched
    fake_hub.calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hub.resolve(["org/policy", None, local]) == [cached, None, local]
    # the weight format the cached snapshot holds (a repo with both formats: only the one local rank 0 fetched)
    assert fake_hub.calls == [("org/policy", None, tuple(hub.KEEP), True),
                              ("org/policy", None, tuple(hub.KEEP + ["model.safetensors"]), True)]  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "0")
    fake_hub.offline = True
    assert hub.resolve(["org/policy"]) == [cached]
    named = r"org/rm is not a local directory, .*\(OSError: Cannot reach .*\) and is not in the Hugging Face cache"
    with pytest.raises(FileNotFoundError, match=named):
        hub.resolve(["org/rm"])
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank whose cache lacks what local rank 0 fetched (another filesystem)
    with pytest.raises(FileNotFoundError, match=r"^a checkpoint local rank 0 fetched is not whole in this rank's"):
        hub.resolve(["org/rm"])


def test_memory_is_planned_from_config_json_before_any_weight_is_fetched(tmp_path, fake_hub, monkeypatch, capsys):
    """setup() plans (and refuses) from each Hub id's config.json alone, before the checkpoints are downloaded; the
    other local ranks read the configs from the cache; a config that cannot be had skips the plan (the download
    that follows names the problem)."""
    import torch

    from engine import state as state_mod
    from engine.config import PPOConfig
    from engine.distributed import ProcessGrid
    from engine.preflight import check_memory
    from engine.state import RunConfig

    order = []
    monkeypatch.setattr(state_mod, "check_memory", lambda *a: order.append(list(fake_hub.calls)))
    with pytest.raises(FileNotFoundError, match="org/missing is not a local directory"):
        run(tmp_path, "--policy", "org/missing", "--reward", "org/rm")
    assert order == [[]]  # planned before anything was downloaded
    capsys.readouterr()
    monkeypatch.setattr(state_mod, "check_memory", check_memory)
    fake_hub.calls.clear()
    cuda, run_cfg = torch.device("cuda", 0), RunConfig(policy="org/policy", reward="org/rm@v1")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 10**9))
    with pytest.raises(ValueError, match=r"the models and optimizer state need .* of 0\.0 GiB free per GPU"):
        check_memory(PPOConfig(), run_cfg, ProcessGrid(), cuda)
    assert fake_hub.calls == [] and sorted(fake_hub.config_calls) == [
        ("org/policy", None, False),
        ("org/rm", "v1", False),
    ]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 10 * 2**30))
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake_hub.config_calls.clear()
    check_memory(PPOConfig(), run_cfg, ProcessGrid(), cuda)
    assert capsys.readouterr().out.startswith("memory plan: ")
    assert sorted(fake_hub.config_calls) == [("org/policy", None, True), ("org/rm", "v1", True)]  # the cache only
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_memory(PPOConfig(), RunConfig(policy="org/missing", reward="org/rm"), ProcessGrid(), cuda)
    assert "memory plan" not in capsys.readouterr().out  # skipped: resolve_run names org/missing


def test_a_wordpiece_vocabulary_is_fetched_with_the_tokenizer_files(tmp_path, fake_hub):
    """WordPiece's vocab.txt (a tokenizer without tokenizer.json) comes with the configs, as merges.txt does."""
    (tmp_path / "src/policy/vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (tmp_path / "src/policy/README.txt").write_text("x")  # (a text file the engine does not read: not fetched)
    (path,) = hub.resolve(["org/policy"], weights=False)
    assert "vocab.txt" in os.listdir(path) and "README.txt" not in os.listdir(path)


def test_a_reference_named_by_hub_id_is_pinned_and_fetched(tmp_path, fake_hub):
    """--reference by Hub id, like --policy and --reward: pinned to its revision's commit and made a directory."""
    from engine.state import RunConfig

    run = hub.resolve_run(hub.pin_run(RunConfig(policy="org/policy", reference="org/rm@v1", reward="org/rm")))
    sha = fake_hub.model_info("org/rm", "v1").sha
    assert run.reference == str(tmp_path / f"cache/models--org--rm/snapshots/{sha}") and os.path.isdir(run.reference)
    assert hub.model_dirs(run)["reference"] == run.reference


def test_only_a_full_commit_hash_counts_as_pinned(fake_hub):
    """A revision that merely looks like hex (a branch "deadbeef", an abbreviated commit) is pinned to the full
    commit it names now; only 40 hex digits are left as they are."""
    pinned = hub.pin_revisions(["org/rm@deadbeef", "org/rm@" + "a" * 40], rank=0)
    assert pinned == ["org/rm@" + fake_hub.model_info("org/rm", "deadbeef").sha, "org/rm@" + "a" * 40]


def test_what_the_cache_cannot_stand_in_for_is_named(tmp_path, fake_hub, monkeypatch):
    """A full disk while fetching is said as one (not hidden behind "not in the cache"); a cached snapshot without
    its weights (a download cut short, or memory planning's configs alone) is named as such; an unpinned id whose
    cache holds commits but no ref (a pinned run fetches by commit, which writes none) names the commits to give."""
    import errno

    import huggingface_hub.constants

    real = fake_hub.snapshot_download

    def full(repo, revision=None, allow_patterns=None, local_files_only=False):
        if not local_files_only:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(repo, revision, allow_patterns, local_files_only)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] fetching org/policy into the Hugging Face cache: No space left"):
        hub.resolve(["org/policy"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    assert hub.resolve(["org/policy"], weights=False)  # (the configs and tokenizer alone in the cache)
    fake_hub.offline = True
    with pytest.raises(FileNotFoundError, match=r"org/policy is not a local directory, could not be fetched .* and its "
                       r"copy in the Hugging Face cache cannot be used \(ValueError: the cached snapshot .* holds no "
                       r"weights \(a download cut short\?\)\)$"):  # fmt: skip
        hub.resolve(["org/policy"])
    sha = "a" * 40
    (tmp_path / "hf/models--org--rm/snapshots" / sha).mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=rf"and is not in the Hugging Face cache under that revision \(it holds "
                       rf"{sha}: name one, org/rm@{sha}\)$"):  # fmt: skip
        hub.resolve(["org/rm"])


def test_a_pin_the_hub_refuses_is_said_and_a_missing_repo_left_to_resolve(fake_hub, monkeypatch, capsys):
    """A pin that fails for another reason than HF_HUB_OFFLINE or a repo that is not there (a 503, a rate limit)
    leaves the id unpinned, which is said: each node then takes what the revision names when it fetches."""

    class RepositoryNotFoundError(OSError):
        pass

    def busy(repo, revision=None):
        if repo == "org/gone":
            raise RepositoryNotFoundError("404")
        if repo == "org/away":  # (no network, a compute node: the cache is used as it is, unsaid)
            raise ConnectionError("[Errno -2] Name or service not known")
        raise OSError("503 Service Unavailable")

    monkeypatch.setattr(huggingface_hub, "model_info", busy)
    assert hub.pin_revisions(["org/policy", "org/gone", "org/away"], 0) == ["org/policy", "org/gone", "org/away"]
    assert capsys.readouterr().out == (
        "warning: org/policy is not pinned to a commit (OSError: 503 Service Unavailable): each node takes what its "
        "revision names when it fetches it\n"
    )


def test_a_name_local_on_some_nodes_only_is_refused(monkeypatch):
    """check_same_sources: `--policy org/policy` a directory on one node and a Hub id on another (each rank's verdict
    agreed, here another rank's stood in for) is refused naming the flag; alike everywhere, it goes on."""
    from engine.state import RunConfig

    run_cfg = RunConfig(policy="org/policy", reward="org/rm")
    hub.check_same_sources(run_cfg)  # (one process: alike)
    monkeypatch.setattr(
        hub, "agree", lambda values, op: [1 if op == "max" and k == 0 else v for k, v in enumerate(values)]
    )
    with pytest.raises(ValueError, match=r"^--policy org/policy: a local directory on some nodes and not on others, "
                       r"where it would be fetched .*\(\./org/policy keeps it local\)$"):  # fmt: skip
        hub.check_same_sources(run_cfg)


def test_a_resume_fetches_the_commits_its_run_fetched(tmp_path, fake_hub, capsys):
    """--resume with the same Hub ids after a push to them: the frozen models' ids (the reference, here the policy's
    id, and the reward model) are pinned to the commits the checkpoint's run fetched (read from the snapshot paths it
    saved), not to what main names now (the new commit's weights fetched, then refused as other models)."""
    flags = ["--policy", "org/policy", "--reward", "org/rm", "--save-every", "1"]
    run(tmp_path / "out", *flags)
    before = {r: fake_hub.model_info(r).sha for r in ("org/policy", "org/rm")}
    fake_hub.pushes = {"org/policy": 1, "org/rm": 1}  # (main names other commits now)
    fake_hub.calls.clear()
    capsys.readouterr()
    with dispatch.reference_ops():
        main(["--output-dir", str(tmp_path / "out"), "--prompts", TINY_PROMPTS, "--max-iterations", "2",
              "--eval-prompts", "", *SMALL, *flags, "--resume"])  # fmt: skip
    assert {(repo, revision) for repo, revision, *_ in fake_hub.calls} == set(before.items())
    said = capsys.readouterr().out
    for field, repo in (("policy", "org/policy"), ("reward", "org/rm")):
        assert f"--{field} {repo}: resuming with commit {before[repo]}, the one the run fetched" in said
    assert hub.saved_commit("org/rm", f"/c/hub/models--org--rm/snapshots/{before['org/rm']}") == before["org/rm"]
    assert hub.saved_commit("org/rm", f"/c/hub/models--org--other/snapshots/{before['org/rm']}") is None
    assert hub.saved_commit("org/rm", "/ckpt/local/rm") is None
    assert hub.saved_commit("org/rm", f"/ckpt/models--x--y/org--rm/{before['org/rm']}") is None  # (no cache's snapshot)


def test_a_resume_pins_only_the_ids_no_commit_names_yet(capsys):
    """pin_as_saved on its own: an id without a commit is pinned to the snapshot the checkpoint's run read; one the
    command pins to a commit itself (another model, with --resume-other-models) keeps it, and so do a local path and
    a role the checkpoint saved no record of; the reference's record pins --policy where no --reference is named."""
    from engine.state import RunConfig

    old, new = "a" * 40, "b" * 40
    saved = {
        "reference": {"path": f"/c/hub/models--org--policy/snapshots/{old}"},
        "reward": {"path": f"/c/hub/models--org--rm/snapshots/{old}"},
    }
    pinned = hub.pin_as_saved(RunConfig(policy="org/policy", reward="org/rm@main"), saved)
    assert (pinned.policy, pinned.reference, pinned.reward) == (f"org/policy@{old}", None, f"org/rm@{old}")
    said = capsys.readouterr().out
    assert f"--policy org/policy: resuming with commit {old}" in said and "--reward org/rm@main: resuming" in said
    kept = RunConfig(policy="org/policy", reward=f"org/rm@{new}")
    assert hub.pin_as_saved(kept, saved).reward == f"org/rm@{new}"
    assert "--reward" not in capsys.readouterr().out
    assert (
        hub.pin_as_saved(RunConfig(policy="org/policy", reward="org/rm"), {"reference": saved["reference"]}).reward
        == "org/rm"
    )
    ref = hub.pin_as_saved(RunConfig(policy="org/policy", reference="org/ref", reward="./local/rm"), saved)
    assert (ref.policy, ref.reference, ref.reward) == ("org/policy", "org/ref", "./local/rm")  # (no org--ref snapshot)


def test_a_resume_with_its_own_reference_fetches_no_policy_weights(tmp_path, fake_hub):
    """A resumed run's policy is the checkpoint's: with another --reference, --policy's configs and tokenizer files
    are fetched (they are read) but not its weights (a 13B's 26 GB, fetched for nothing), and the run resumes as
    one that had them."""
    fake_hub.repos["org/ref"] = fake_hub.repos["org/policy"]
    flags = ["--policy", "org/policy", "--reference", "org/ref", "--reward", "org/rm", "--save-every", "1"]
    run(tmp_path / "out", *flags)
    fake_hub.calls.clear()
    fake_hub.pushes = {"org/policy": 1}  # (main names another commit now: a snapshot of its own)
    with dispatch.reference_ops():
        main(["--output-dir", str(tmp_path / "out"), "--prompts", TINY_PROMPTS, "--max-iterations", "2",
              "--eval-prompts", "", *SMALL, *flags, "--resume"])  # fmt: skip
    fetched = {(repo, patterns == tuple(hub.KEEP)) for repo, _, patterns, _ in fake_hub.calls}
    assert fetched == {("org/policy", True), ("org/ref", True), ("org/ref", False), ("org/rm", True), ("org/rm", False)}
    policy = tmp_path / "cache/models--org--policy/snapshots" / fake_hub.model_info("org/policy").sha
    assert "model.safetensors" not in os.listdir(policy) and "config.json" in os.listdir(policy)
